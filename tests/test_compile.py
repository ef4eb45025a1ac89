"""generate(compile=True): the one-token step under torch.compile (inductor on CPU) gives the tokens of
eager greedy decoding, in one graph for all 20 steps (no graph break, no recompilation), and a second
call reuses it. A first compile costs seconds to minutes here (inductor builds C++ kernels; later runs
hit its on-disk cache), so these are the only compiled tests."""
import pytest
import torch

from paligemma import PaliGemma, generation, quantize
from tests.helpers import batch

STEPS = 20


@pytest.fixture
def counters():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["pg1", "pg2"])
def test_compiled_decode_equals_eager_in_one_graph(request, family, counters):
    model = PaliGemma.from_pretrained(request.getfixturevalue(f"{family}_dir")).eval()
    inputs = batch(16, prompt_lens=(3, 7), seed=1)  # left-padded; PG2 crosses its sliding window of 8
    eager = model.generate(**inputs, max_new_tokens=STEPS + 1, eos_id=-1)  # never stops: STEPS steps
    compiled = model.generate(**inputs, max_new_tokens=STEPS + 1, eos_id=-1, compile=True)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    again = model.generate(**inputs, max_new_tokens=STEPS + 1, eos_id=-1, compile=True)  # a new cache, same shapes
    assert torch.equal(again, eager) and counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_decode_equals_eager_in_one_graph(pg1_dir, mode, counters):
    """The CPU inference set-up: int8 layers on fbgemm (which dynamo reaches through quantize.fbgemm_int8)
    or int4 on torch's kernel, and the head's int8 (fbgemm too) or int4 copy."""
    model = PaliGemma.from_pretrained(pg1_dir, dtype=torch.bfloat16, quantize=mode, inference=True)
    assert isinstance(model.language_model.lm_head, quantize.Int8Head if mode == "int8" else quantize.Int4Head)
    inputs = batch(16, prompt_lens=(3, 7), seed=1)
    eager = model.generate(**inputs, max_new_tokens=STEPS + 1, eos_id=-1)
    compiled = model.generate(**inputs, max_new_tokens=STEPS + 1, eos_id=-1, compile=True)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert not quantize.fbgemm_ready() or not any(
        isinstance(m, quantize.FbgemmInt8) and m.qweight is not None for m in model.modules()), "int8 ran on fbgemm"


def test_the_counter_sees_recompiles(pg1_dir, counters, monkeypatch):
    """The control: a step that reads the cache's host count (as the model did before slots became
    tensors) recompiles at every position, and the counter above shows it (dynamo's eager backend:
    no kernels to build)."""
    model = PaliGemma.from_pretrained(pg1_dir).eval()

    def host_count_step(model, cache, token, slot):
        return generation.decode_step(model, cache, token, torch.arange(cache.length - 1, cache.length))
    step = torch.compile(host_count_step, backend="eager")
    monkeypatch.setattr(generation, "compiled_step", lambda model, mode, device: step)
    model.generate(**batch(16, prompt_lens=(3,)), max_new_tokens=5, eos_id=-1, compile=True)
    assert counters["stats"]["unique_graphs"] == 4


def test_compile_refuses_beams(pg1_dir):
    model = PaliGemma.from_pretrained(pg1_dir).eval()
    with pytest.raises(ValueError, match="compile=True compiles the greedy"):
        model.generate(**batch(16), max_new_tokens=3, num_beams=2, compile=True)


def test_compile_unpacks_packed_layers(pg1_dir, counters, monkeypatch):
    """caption / evaluate --compile load with inference=True, which packs on CPU: the compiled step turns
    the packed layers back into plain ones (dynamo's eager backend here: no kernels to build) and decodes
    the packed model's tokens."""
    from paligemma import packing
    model = packing.pack(PaliGemma.from_pretrained(pg1_dir, inference=True))
    inputs = batch(16, prompt_lens=(3, 7), seed=1)
    eager = model.generate(**inputs, max_new_tokens=6, eos_id=-1)
    monkeypatch.setattr(generation, "_compiled", lambda mode: torch.compile(generation.decode_step, backend="eager",
                                                                             fullgraph=True))
    compiled = model.generate(**inputs, max_new_tokens=6, eos_id=-1, compile=True)
    assert torch.equal(compiled, eager)
    assert not any(isinstance(m, (packing.PackedLinear, packing.PackedHead)) for m in model.modules())
    assert counters["stats"]["unique_graphs"] == 1
