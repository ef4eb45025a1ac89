"""oneDNN-packed linear layers: the same numbers as the plain model (bit for bit in bf16), and no silent training."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import batch
from paligemma import PaliGemma
from paligemma.packing import PackedLinear, bf16_packs, pack

# oneDNN packs bfloat16 only on CPUs with AVX512 BW / VL / DQ or AVX-NE-CONVERT; elsewhere packing.packable
# says no and bf16 layers stay plain (test_a_cpu_that_cannot_pack_bf16_keeps_layers_plain, below, runs anywhere)
bf16_packing = pytest.mark.skipif(not bf16_packs(), reason="this CPU cannot pack bfloat16 (AVX2 only): layers stay plain")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=bf16_packing)])
def test_packed_model_computes_the_same_function(pg2_dir, dtype):
    plain = PaliGemma.from_pretrained(pg2_dir, dtype=dtype).eval()
    packed = pack(PaliGemma.from_pretrained(pg2_dir, dtype=dtype))
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 6 + 3 * 7 + 1
    inputs = batch(16, prompt_lens=(5, 3), suffix_len=2)
    with torch.no_grad():
        a, b = plain(**inputs), packed(**inputs)
    if dtype == torch.bfloat16:  # the dtype packing is for: the same oneDNN kernel, the same bits
        assert torch.equal(a, b)
    else:  # float32 with few rows takes another oneDNN kernel: equal up to rounding
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    gen = dict(max_new_tokens=6, eos_id=-1)
    assert torch.equal(plain.generate(**inputs, **gen), packed.generate(**inputs, **gen))


def test_packed_state_dict_is_the_plain_one(pg1_dir, tmp_path):
    from paligemma.weights import save_pretrained
    plain = PaliGemma.from_pretrained(pg1_dir)
    packed = pack(PaliGemma.from_pretrained(pg1_dir))
    sa, sb = plain.state_dict(), packed.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    save_pretrained(packed, tmp_path / "again")  # a packed model still saves a loadable checkpoint
    again = PaliGemma.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(sa[k], again[k]) for k in sa)


def test_packed_model_refuses_to_train(pg1_dir):
    model = pack(PaliGemma.from_pretrained(pg1_dir))
    model.train()
    with pytest.raises(RuntimeError, match="packed layers are for inference"):
        model.loss(**batch(16, suffix_len=2), labels=batch(16, suffix_len=2)["input_ids"])


@bf16_packing
def test_pack_frees_each_plain_weight_before_packing_the_next(pg2_dir, monkeypatch):
    """pack()'s transient memory is one layer, not a second copy of the model: when the k-th weight
    is reordered, the k weights packed before it are already gone (measured at 3B: +1.06 GB during
    pack, the head's packed copy, where holding every source gave +4.8 GB)."""
    import gc
    import weakref
    from paligemma import packing
    model = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16)
    sources = [weakref.ref(m.weight) for m in model.modules() if type(m) is torch.nn.Linear]
    alive, reorder = [], packing._reorder

    def counting_reorder(weight):
        gc.collect()
        alive.append(sum(r() is not None for r in sources))
        return reorder(weight)

    monkeypatch.setattr(packing, "_reorder", counting_reorder)
    pack(model)
    n = len(sources)
    assert alive == [n - k for k in range(n)] + [0]  # the last call is the head's copy of the embedding


@bf16_packing
def test_from_pretrained_for_inference_is_packed_frozen_and_the_same(pg2_dir):
    from paligemma.packing import PackedHead
    plain = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16)
    fast = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16, inference=True)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert isinstance(fast.language_model.lm_head, PackedHead)
    inputs = batch(16, prompt_lens=(5, 3), suffix_len=2)
    gen = dict(max_new_tokens=6, eos_id=-1)
    with torch.no_grad():
        assert torch.equal(plain(**inputs), fast(**inputs))
    assert torch.equal(plain.generate(**inputs, **gen), fast.generate(**inputs, **gen))


@bf16_packing
def test_inference_load_packs_each_weight_as_it_is_read_through_one_buffer(pg2_dir, monkeypatch):
    """from_pretrained(inference=True) on a float32 file: every linear weight is converted to bf16 into
    one reused buffer and reordered from there (no plain bf16 copy of the model, no fresh pages per
    weight); the buffer moves only when a larger weight needs it to grow."""
    from paligemma import packing
    seen, reorder = [], packing._reorder

    def recording_reorder(weight):
        seen.append((weight.data_ptr(), weight.numel()))
        return reorder(weight)

    monkeypatch.setattr(packing, "_reorder", recording_reorder)
    model = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16, inference=True)
    assert model.language_model.lm_head.packed is None  # the head's copy waits for its AFTER-th call
    linears = seen
    plain = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16)
    assert len(linears) == sum(type(m) is torch.nn.Linear for m in plain.modules())
    largest = linears[0][1]
    for (ptr, n), (prev, _) in zip(linears[1:], linears):
        if ptr != prev:  # moved: only to grow
            assert n > largest
        largest = max(largest, n)
    assert len({ptr for ptr, _ in linears}) < len(linears) / 4


@bf16_packing
def test_layers_mapped_from_a_bf16_file_pack_themselves_on_their_after_th_call(pg2_dir, tmp_path, monkeypatch):
    """bf16 files: inference=True keeps each linear weight a view of the file, computes one-row products
    with torch.mv (uncounted) and packs a layer on its AFTER-th product with more rows (a one-off
    caption never pays for the copy); every output before, during and after the switch is the plain
    model's, bit for bit."""
    from paligemma import packing
    from paligemma.packing import PackedHead
    from paligemma.safetensors_io import mapped
    PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    monkeypatch.setattr(packing, "AFTER", 4)
    plain = PaliGemma.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    fast = PaliGemma.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, inference=True)
    layers = [m for m in fast.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.packed is None and mapped(m.plain) for m in layers)
    gen = dict(max_new_tokens=6, eos_id=-1)
    one = batch(16, prompt_lens=(5,))  # batch 1: decode steps are one-row products, through torch.mv
    assert torch.equal(plain.generate(**one, **gen), fast.generate(**one, **gen))
    assert all(m.packed is None and m.calls_left == 3 for m in layers)  # only the prefill counted
    assert fast.language_model.lm_head.packed is None
    inputs = batch(16, prompt_lens=(5, 3))  # batch 2: 1 prefill + 5 two-row steps, past AFTER = 4
    assert torch.equal(plain.generate(**inputs, **gen), fast.generate(**inputs, **gen))
    decoder = [m for n, m in fast.named_modules() if isinstance(m, PackedLinear) and "language_model" in n]
    assert all(m.packed is not None and m.plain is None for m in decoder)
    assert fast.language_model.lm_head.packed is not None and isinstance(fast.language_model.lm_head, PackedHead)
    vision = [m for n, m in fast.named_modules() if isinstance(m, PackedLinear) and "vision_tower" in n]
    assert all(m.packed is None and m.calls_left == 2 for m in vision)  # two image batches: one call each
    with torch.no_grad():
        assert torch.equal(plain(**inputs), fast(**inputs))
    pack(fast)  # packs the rest now
    assert all(m.packed is not None for m in layers)
    with torch.no_grad():
        assert torch.equal(plain(**inputs), fast(**inputs))


@bf16_packing
def test_layers_not_yet_packed_refuse_to_train_too(pg2_dir):
    from paligemma.packing import AFTER
    model = pack(PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16), after=AFTER)
    assert all(m.packed is None for m in model.modules() if isinstance(m, PackedLinear))
    model.train()
    with pytest.raises(RuntimeError, match="packed layers are for inference"):
        model.loss(**batch(16, suffix_len=2), labels=batch(16, suffix_len=2)["input_ids"])


# --- issue #28: the countdown's call, the one-row bias, training mode without gradients ---

def rows(n: int, seed: int = 0, in_features: int = 24, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(n, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)


@bf16_packing
@pytest.mark.parametrize("after", [1, 2, 3])
def test_a_layer_packs_itself_on_exactly_its_after_th_multi_row_call(after):
    """after = k: multi-row calls 1 .. k-1 run on the plain weight, call k reorders it (and frees the
    plain one); one-row calls before, between and after never count. Every output is F.linear's, bit
    for bit (bf16)."""
    w, b = rows(16, seed=1), rows(1, seed=2, in_features=16)[0]
    layer = PackedLinear(w, b, after=after).eval()
    states = []
    with torch.no_grad():
        for k in range(1, after + 2):
            one = rows(1, seed=10 + k)
            assert torch.equal(layer(one), F.linear(one, w, b))  # uncounted
            x = rows(3, seed=k)
            assert torch.equal(layer(x), F.linear(x, w, b))
            states.append(layer.packed is not None)
    assert states == [k >= after for k in range(1, after + 2)]
    assert layer.plain is None and torch.equal(layer.weight, w)


@bf16_packing
def test_head_packs_its_copy_on_exactly_its_after_th_multi_row_call_and_always_soft_caps():
    """PaliGemma 2's head: tanh(h E^T / c) c on every path (one row through torch.mv, rented multi-row
    calls, packed), the copy made on the after-th multi-row call."""
    from paligemma.gemma import TiedHead
    from paligemma.packing import PackedHead
    table, c = rows(40, seed=3), 0.7

    def want(h):
        return torch.tanh(F.linear(h, table) / c) * c
    head = PackedHead(TiedHead(softcap=c), table, after=2).eval()
    with torch.no_grad():
        assert torch.equal(head(rows(1), table), want(rows(1))) and head.packed is None
        assert torch.equal(head(rows(2), table), want(rows(2))) and head.packed is None
        x = rows(2, seed=4)
        assert torch.equal(head(x, table), want(x)) and head.packed is not None
        assert torch.equal(head(rows(1, seed=5), table), want(rows(1, seed=5)))
        assert torch.equal(head(rows(3, seed=6), table), want(rows(3, seed=6)))


@pytest.mark.parametrize("shape", [(1, 24), (1, 1, 24), (24,)])
def test_one_row_products_add_the_bias(shape):
    """The torch.mv path (one row, not yet packed) is x W^T + b, as for any other row count: checked
    against the product written out in float64, with a bias large enough that dropping it shows."""
    w = rows(16, seed=1, dtype=torch.float32)
    b = torch.arange(16, dtype=torch.float32) * 10 - 80
    layer = PackedLinear(w, b, after=8).eval()
    x = rows(1, seed=5, dtype=torch.float32).reshape(shape)
    with torch.no_grad():
        y = layer(x)
    want = (x.double() @ w.double().T + b.double()).float()
    assert y.shape == want.shape and layer.packed is None and layer.calls_left == 8
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("after", [pytest.param(0, marks=bf16_packing), 8])
def test_training_mode_is_refused_without_gradients_too(after):
    """model.train() is refused even under torch.no_grad() (a dropout-free eval loop that forgot
    model.eval() would otherwise silently run on frozen packed weights); eval mode runs with gradients
    enabled as long as the input does not need them (a plain `model(x)`), and refuses when it does."""
    w = rows(16, seed=1)
    layer = PackedLinear(w, after=after)
    for x in (rows(1), rows(3)):  # the torch.mv path and the multi-row one
        layer.train()
        with torch.no_grad(), pytest.raises(RuntimeError, match="packed layers are for inference"):
            layer(x)
        layer.eval()
        layer(x)  # grad mode on, input without grad: inference
        with pytest.raises(RuntimeError, match="packed layers are for inference"):
            layer(x.clone().requires_grad_(True))


@bf16_packing
def test_the_head_refuses_training_mode_without_gradients_too():
    from paligemma.gemma import TiedHead
    from paligemma.packing import PackedHead
    table = rows(40, seed=3)
    for after in (0, 8):
        head = PackedHead(TiedHead(softcap=None), table, after=after).train()
        with torch.no_grad(), pytest.raises(RuntimeError, match="packed layers are for inference"):
            head(rows(2), table)


# --- issue #24: tensors an add-on made move with the model, or the move is refused ------------------

@bf16_packing
def test_a_packed_model_refuses_to_move_or_cast(pg1_dir):
    """oneDNN's packed weights exist only on the CPU (they cannot even go to `meta`) and are no buffers:
    model.to(...) on a packed model is refused by name instead of leaving them behind; staying on the
    CPU in the same dtype is fine. Every layer kind: packed at once, and still counting down."""
    from paligemma.packing import AFTER
    for after in (0, AFTER):
        model = pack(PaliGemma.from_pretrained(pg1_dir, dtype=torch.bfloat16).requires_grad_(False), after=after)
        model.to("cpu")
        for move in (lambda m: m.to("meta"), lambda m: m.float()):
            with pytest.raises(RuntimeError, match=r"Packed(Linear|Head): packed for CPU inference in torch.bfloat16"):
                move(model)


def test_a_cpu_that_cannot_pack_bf16_keeps_layers_plain(pg2_dir, monkeypatch):
    """On a CPU without bf16 packing (AVX2 only: oneDNN's reorder raises there) from_pretrained(inference=True)
    in bf16 packs nothing and computes the plain model's function, while float32 still packs. Forced here
    by what packing.bf16_packs answers, so it runs on any CPU."""
    from paligemma import packing
    monkeypatch.setattr(packing, "bf16_packs", lambda: False)
    assert not packing.packable("cpu", torch.bfloat16) and packing.packable("cpu", torch.float32)
    monkeypatch.setattr(packing, "_reorder", lambda w: pytest.fail("reordered a weight it cannot pack"))
    plain = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16)
    fast = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16, inference=True)
    assert not any(isinstance(m, PackedLinear) for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters())
    inputs = batch(16, prompt_lens=(5, 3), suffix_len=2)
    with torch.no_grad():
        assert torch.equal(plain(**inputs), fast(**inputs))
    gen = dict(max_new_tokens=6, eos_id=-1)
    assert torch.equal(plain.generate(**inputs, **gen), fast.generate(**inputs, **gen))
