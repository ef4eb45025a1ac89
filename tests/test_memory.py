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
