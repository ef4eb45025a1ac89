"""What train.py's loop promises, checked by value against hand computations or equivalent runs:
gradient accumulation, the learning-rate schedule at its boundaries, resume with every source of
randomness in use, and the loss normalised per label token."""
import json
import math
import random

import pytest
import torch

from paligemma.captioning.training import lr_at
from tests.helpers import Crash, crash_after


def run_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--batch-size", "8", "--eval-every", "100",
            "--eval-samples", "2", "--save-every", "100", "--lr", "1e-3", "--warmup", "2", *extra]


def logged(out) -> list[dict]:
    return [json.loads(l) for l in open(out / "metrics.jsonl") if '"loss"' in l]


# --- learning-rate schedule ------------------------------------------------------------------------

def test_lr_schedule_boundaries_by_hand():
    """warm-up 10, 110 steps, peak 1, floor 0.1: the loop calls lr_at(step) for step = 0 .. 109."""
    peak, warmup, total = 1.0, 10, 110
    # warm-up climbs by peak / warmup per step and reaches the peak on its last step (step 9) ...
    assert [lr_at(s, peak, warmup, total) for s in range(warmup)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    # ... and the cosine starts at the peak on the step after (progress 0), not one notch below it
    assert lr_at(warmup, peak, warmup, total) == pytest.approx(1.0, abs=1e-12)
    assert lr_at(warmup + 1, peak, warmup, total) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 100)))
    # the last step the loop takes (109) is one notch above the floor; the floor itself is at `total`
    assert lr_at(total - 1, peak, warmup, total) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_at(total, peak, warmup, total) == pytest.approx(0.1)
    assert lr_at(total + 50, peak, warmup, total) == pytest.approx(0.1)  # stays at the floor past the end


@pytest.mark.parametrize("warmup,total", [(0, 7), (1, 2), (3, 3), (5, 4), (30, 600), (10, 11)])
def test_lr_never_above_peak_rises_then_falls(warmup, total):
    lrs = [lr_at(s, 2e-4, warmup, total) for s in range(total + 3)]
    assert max(lrs) <= 2e-4 * (1 + 1e-12)
    assert min(lrs[warmup:]) >= 0.1 * 2e-4 * (1 - 1e-12)  # after warm-up, never below the floor
    top = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:top], lrs[1:top + 1]))  # rises to the peak
    assert all(a >= b for a, b in zip(lrs[top:], lrs[top + 1:]))  # then never rises again
    if 0 < warmup <= total:
        assert lrs[warmup - 1] == pytest.approx(2e-4)  # the peak is reached when warm-up ends


def test_logged_lr_is_the_schedule_of_each_step(tiny_run, tmp_path):
    """The optimizer runs step s (logged as s + 1) at lr_at(s), warm-up included."""
    import train
    model, data = tiny_run
    train.main(run_args(model, data, tmp_path, "--steps", "5", "--warmup", "3", "--finetune", "lora",
                        "--lora-r", "2", "--eval-samples", "1"))
    got = [(r["step"], r["lr"]) for r in logged(tmp_path)]
    assert got == [(s + 1, pytest.approx(lr_at(s, 1e-3, 3, 5), rel=1e-12)) for s in range(5)]


# --- gradient accumulation and the loss normalisation ----------------------------------------------

def test_grad_accumulation_equals_one_big_batch(tiny_run, tmp_path):
    """2 micro-batches of 4 take the same steps as 1 batch of 8: same logged loss and gradient norm,
    same weights. The two micro-batches hold different numbers of label tokens (the synthetic captions
    differ in length), so dividing each by its own count would not give the big batch's mean.
    float32 so that only summation order differs."""
    import train
    model, data = tiny_run
    common = ("--steps", "3", "--amp", "none", "--finetune", "full", "--eval-samples", "1")
    one = train.main(run_args(model, data, tmp_path / "one", *common))
    args = run_args(model, data, tmp_path / "accum", *common, "--grad-accum", "2")
    args[args.index("--batch-size") + 1] = "4"
    accum = train.main(args)
    a, b = logged(tmp_path / "one"), logged(tmp_path / "accum")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    # weights: the two runs' updates differ by summation order only. Element-wise that is not small:
    # Adam divides by sqrt(v), so a weight whose gradient is pure rounding noise (SigLIP's k_proj biases:
    # softmax ignores a key bias) moves by a noise-sized step either way (1.2e-5 measured against a
    # 1e-5 atol). Over all weights: |one - accum| / |one - init| measured 8.4e-6; dividing each
    # micro-batch by its own label count (the bug this test found) gives 0.061.
    from paligemma import PaliGemma
    init = PaliGemma.from_pretrained(model).state_dict()
    sa, sb = one.state_dict(), accum.state_dict()
    apart = sum(float((sa[k] - sb[k]).float().norm()) ** 2 for k in sa) ** 0.5
    moved = sum(float((sa[k] - init[k]).float().norm()) ** 2 for k in sa) ** 0.5
    assert apart / moved < 1e-3


def first_batch_by_hand(model_dir, data, batch_size, seed=0):
    """The first training batch as train.py builds it, and the loss summed over its label tokens."""
    from paligemma import PaliGemma
    from paligemma.captioning.data import load_examples
    from paligemma.captioning.training import Batches, collate
    from paligemma.processor import IGNORE, Processor
    model = PaliGemma.from_pretrained(model_dir).eval()
    processor = Processor.from_pretrained(model_dir)
    examples, _ = load_examples(data, "train")
    batch = collate(processor, Batches(examples, batch_size, seed).next(), "caption en", random.Random(seed))
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).double()  # (B, T, V)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE  # (B, T-1)
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * keep
    return nll.sum(1), keep.sum(1)  # per row: summed token losses, label-token counts


def ragged_captions(data, out):
    """tiny_run's set with one caption per image, alternately 2 words and three captions end to end
    (~5 vs ~90 label tokens), so that a per-row mean and a per-token mean are far apart."""
    import csv
    from pathlib import Path
    data = Path(data).parent  # tiny_run gives the CSV
    with open(data / "captions.csv") as f:
        rows = list(csv.DictReader(f))
    out.mkdir()
    (out / "images").symlink_to(data / "images")
    with open(out / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["split", "image", "caption_1"])
        w.writeheader()
        for i, r in enumerate(rows):
            long = ", ".join(r[f"caption_{j}"] for j in (1, 2, 3))
            w.writerow(dict(split=r["split"], image=r["image"],
                            caption_1=" ".join(r["caption_1"].split()[:2]) if i % 2 else long))
    return str(out)


def test_loss_is_the_mean_over_label_tokens(tiny_run, tmp_path):
    """The first logged loss (before any update) is sum over every label token / their count, computed
    here from the logits: long captions weigh more than in a mean of per-row means."""
    import train
    model, _ = tiny_run
    data = ragged_captions(tiny_run[1], tmp_path / "data")
    train.main(run_args(model, data, tmp_path / "run", "--steps", "1", "--amp", "none", "--finetune", "full",
                        "--eval-samples", "1"))
    sums, counts = first_batch_by_hand(model, data, 8)
    assert len(set(counts.tolist())) > 1, "the test needs captions of different lengths"
    per_token = float(sums.sum() / counts.sum())
    per_row = float((sums / counts).mean())
    assert abs(per_token - per_row) > 1e-4 * per_token  # the two conventions are told apart (10x the tolerance) ...
    assert logged(tmp_path / "run")[0]["loss"] == pytest.approx(per_token, rel=1e-5)  # ... far beyond rounding


# --- resume --------------------------------------------------------------------------------------

def test_resume_equals_uninterrupted_with_all_randomness(tiny_run, tmp_path):
    """LoRA dropout draws from torch's generator, captions are sampled from five, the data order is
    shuffled; each generator and the data position must be saved and restored, or the resumed run
    drifts from the uninterrupted one (a dropout mask or a caption drawn differently changes the
    weights in their first bits)."""
    import train
    model, data = tiny_run
    mode = ("--steps", "4", "--finetune", "lora", "--lora", "all", "--lora-r", "4", "--lora-dropout", "0.3",
            "--batch-size", "4", "--grad-accum", "2", "--save-every", "2", "--seed", "3", "--eval-samples", "1")
    a = train.main(run_args(model, data, tmp_path / "a", *mode))
    with crash_after(train, 2), pytest.raises(Crash):
        train.main(run_args(model, data, tmp_path / "b", *mode))
    b = train.main(run_args(model, data, tmp_path / "b", *mode, "--resume"))
    sa, sb = a.state_dict(), b.state_dict()
    assert [k for k in sa if "lora_B" in k] and all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = logged(tmp_path / "a"), logged(tmp_path / "b")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # steps 1, 2 before the crash; 3, 4 after
