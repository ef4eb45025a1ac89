"""The real-data check of the README: on RSICD aerial images, training with the true images must beat
the image-blind control. Uses ../shared/data/rsicd-subset beside the project; skips where it is absent."""
import json
from pathlib import Path

import pytest
import torch

RSICD = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsicd-subset"
pytestmark = pytest.mark.skipif(not (RSICD / "captions.csv").exists(), reason=f"{RSICD} not present")


def test_rsicd_layout_loads_with_its_one_bad_row():
    from paligemma.captioning.data import DataError, load_examples
    with pytest.raises(DataError, match=r"captions.csv:\d+: empty caption\(s\) \[3\] for image bridge_59.jpg"):
        load_examples(RSICD, "train")
    train, skipped = load_examples(RSICD, "train", skip_bad=True)
    val, _ = load_examples(RSICD, "val")
    test, _ = load_examples(RSICD, "test")
    assert (len(train), len(skipped.reasons), len(val), len(test)) == (1748, 1, 218, 218)
    assert all(len(e.captions) == 5 and e.image.suffix == ".jpg" for e in test)


@torch.no_grad()
def image_gap(model, processor, examples, shuffles=3, prompt="caption en", batch_size=256) -> float:
    """Validation loss of every (image, caption) pair with another image, minus with its own, in nats per
    caption token: all 5 captions of every image, each of `shuffles` derangements of the images.

    Paired over 1,090 captions, this is far steadier than train.py's logged gap (one batch of 16).
    A decoder that ignores the image scores ~0 by construction."""
    model.eval()
    n = len(examples)
    owner = torch.tensor([i for i, e in enumerate(examples) for _ in e.captions])  # (5n,) image of each caption
    captions = [c for e in examples for c in e.captions]
    batch = processor([e.image for e in examples for _ in e.captions], prompt, captions)
    images = batch["pixel_values"][::5]  # (n, 3, H, W): one per example (5 captions each)

    def loss(pixel_values):
        total, count = 0.0, 0
        for i in range(0, len(owner), batch_size):
            chunk = {k: v[i:i + batch_size] for k, v in dict(batch, pixel_values=pixel_values).items()}
            total += model.loss(**chunk, reduction="sum").item()
            count += int((chunk["labels"][:, 1:] != -100).sum())
        return total / count

    assert all(len(e.captions) == 5 for e in examples)
    own, g = loss(batch["pixel_values"]), torch.Generator().manual_seed(0)
    gaps = []
    for _ in range(shuffles):
        order = torch.randperm(n, generator=g)
        other = torch.empty_like(order)
        other[order] = order.roll(1)  # each image goes to the next in a random cycle: nobody keeps their own
        gaps.append(loss(images[other[owner]]) - own)
    return sum(gaps) / shuffles


def test_true_images_beat_image_blind(tmp_path):
    """300 steps of 16 in float32 (--amp none: on CPU bf16 autocast was 2.6x slower per step here, and it
    turns rounding changes into different runs), seed 0, once with the true images and once image-blind;
    then `image_gap` over all 218 val images x 5 captions, 3 derangements.

    Verdict: true gap > 0.004 nats and |blind gap| < 0.001 nats. The blind model ignores the image
    entirely (its gap is rounding-sized); the true one needs it. Measured with 2 processes of
    OMP_NUM_THREADS=1 on the 2 cores (seed s: the tiny model initialised with seed s and --seed s;
    measured again after the embeddings stopped drawing a random init, which moved the init stream):

        seed  true gap  blind gap   test CIDEr-D, 64 images
                                    true / blind
        0     +0.0174   +0.00009    0.266 / 0.266
        1     +0.0291   +0.00002    0.333 / 0.266
        2     +0.0270   +0.00003    0.320 / 0.318
        3     +0.0296   +0.00013    0.334 / 0.266
        4     +0.0147   -0.00004    0.291 / 0.266

    True gap 0.015..0.030 (its minimum 3.7x the threshold), |blind gap| <= 0.00013 (7.7x under its
    threshold). Before that change (other init draws) the five seeds gave 0.011..0.031 and <= 0.0003,
    and seed 0 with RMSNorm as x / sqrt(m) instead of x * rsqrt(m) (the change that flipped the old
    bf16 test) gave the same gap to 1e-4. CIDEr-D and the logged gap are printed, not asserted: at this
    budget CIDEr-D is a coin flip (on one seed of the earlier init the blind run out-scored the true
    one). Wall time of this test in the full suite on the quiet machine, 2 threads: ~110 s."""
    import train
    from paligemma.captioning.data import load_examples
    from paligemma.processor import Processor
    val, _ = load_examples(RSICD, "val")
    gap, scores = {}, {}
    for name, extra in (("true", []), ("blind", ["--blind"])):
        model = train.main(["--data", str(RSICD), "--skip-bad", "--out", str(tmp_path / name), "--steps", "300",
                            "--amp", "none", "--eval-every", "300", "--save-every", "1000", "--eval-samples", "64",
                            *extra])
        gap[name] = image_gap(model, Processor.from_pretrained(tmp_path / name / "model"), val)
        log = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
        scores[name] = next(r for r in log if "test_after" in r)["test_after"]
        print(f"{name}: image gap {gap[name]:+.5f} nats over all val captions; test CIDEr-D "
              f"{scores[name]['CIDEr-D']:.3f}, BLEU-4 {scores[name]['BLEU-4']:.3f} (64 images, not asserted)")
    assert gap["true"] > 0.004 and abs(gap["blind"]) < 0.001, gap  # only the true run's loss needs its image
