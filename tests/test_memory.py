"""benchmarks/memory.py's pieces: the shape-only loss its fake-tensor trace runs is model.loss, and a
fake trace of a tiny step counts what the step holds (weights, Adam's two float32 moments)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
memory = pytest.importorskip("memory")


def test_fake_loss_is_model_loss(pg1_dir, monkeypatch):
    from paligemma import PaliGemma
    monkeypatch.setattr(memory, "BATCH", 2)
    model = PaliGemma.from_pretrained(pg1_dir)
    config = model.config.to_dict()
    config["vision_config"]["image_size"] = model.config.vision.image_size
    data = memory.batch(config, "cpu")
    data["input_ids"][:, -memory.CAPTION - memory.PROMPT:] = torch.randint(3, 290, (2, memory.CAPTION + memory.PROMPT))
    data["labels"] = torch.where(data["token_type_ids"].bool(), data["input_ids"], torch.full_like(data["input_ids"], -100))
    data["pixel_values"] = torch.rand_like(data["pixel_values"]) * 2 - 1
    with torch.no_grad():
        assert torch.equal(memory.fake_loss(model, **data), model.loss(**data))


def test_fake_trace_counts_weights_and_adam_state(monkeypatch):
    """Full fine-tuning of the small shape: float32 weights, and two float32 moments per weight at the
    second step's peak."""
    monkeypatch.setattr(memory, "BATCH", 1)
    config = memory.hub_config("small", 1, 1)
    r = memory.measure_fake(config, memory.RECIPES["full"], checkpointing=False)
    n = r["trainable"]
    assert r["by_kind"]["Parameter"] == 4 * n
    assert r["by_kind"]["Optstate"] >= 2 * 4 * n  # exp_avg, exp_avg_sq (+ the step counters)
    assert r["peak_bytes"] >= 12 * n


@pytest.mark.parametrize("kernels, differ", [("cpu", {"layer_norm"}), ("cuda", set())])
def test_trace_computes_in_cudas_autocast_dtypes(monkeypatch, kernels, differ):
    """Every call of the forward (both towers trained: LoRA everywhere) replayed on fake CUDA tensors
    under CUDA's autocast: on this CPU only SigLIP's layer_norm comes out in another dtype (float32 on
    CUDA, bf16 here), and with memory.cuda_kernels nothing does."""
    monkeypatch.setattr(memory, "BATCH", 1)
    config = memory.hub_config("small", 1, 1)
    assert memory.autocast_differences(config, memory.RECIPES["lora-all"], kernels) == differ


def test_prepared_adam_state_is_what_a_first_step_creates():
    """The fake trace skips the first step by giving AdamW its state; a real first step must create
    the same keys, shapes and dtypes."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    real = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98))
    for p in params:
        p.grad = torch.randn_like(p)
    real.step()
    prepared = memory.adam_with_state(params)
    for p in params:
        a, b = real.state[p], prepared.state[p]
        assert a.keys() == b.keys()
        assert all((a[k].shape, a[k].dtype, a[k].device) == (b[k].shape, b[k].dtype, b[k].device) for k in a)


def test_peak_tracker_gives_memtrackers_peak(monkeypatch):
    """The trace's shortcut (global peak only) against torch's MemTracker itself, on one LoRA row."""
    from torch.distributed._tools.mem_tracker import MemTracker
    monkeypatch.setattr(memory, "BATCH", 1)
    config = memory.hub_config("small", 1, 1)
    ours = memory.measure_fake(config, memory.RECIPES["lora-all"], checkpointing=True)
    monkeypatch.setattr(memory, "peak_tracker", MemTracker)
    theirs = memory.measure_fake(config, memory.RECIPES["lora-all"], checkpointing=True)
    assert ours == theirs and ours["by_kind"]["Activation"] > 0


@pytest.mark.parametrize("row", ["lora-all", "qlora-nf4-decoder"])
def test_fake_trace_counts_what_a_real_step_holds(monkeypatch, row):
    """The fake trace (no values, fake_loss, the CPU's kernels) against a real CPU step's tensors under
    the same tracker (real values, model.loss): measured 3-4 KB apart in 73-90 MB (0.004-0.006 %)."""
    monkeypatch.setattr(memory, "BATCH", 2)
    config = memory.hub_config("small", 1, 1)
    fake = memory.measure_fake(config, memory.RECIPES[row], checkpointing=False, kernels="cpu")
    real = memory.measure_real(config, memory.RECIPES[row], checkpointing=False, device="cpu")
    assert real["trainable"] == fake["trainable"]
    assert real["peak_bytes"] == pytest.approx(fake["peak_bytes"], rel=0.005)
    assert real["by_kind"]["Parameter"] == fake["by_kind"]["Parameter"]
