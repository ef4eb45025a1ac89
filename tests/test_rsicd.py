"""The real-data check of the README: on RSICD aerial images, training with the true images must beat
the image-blind control. Uses ../shared/data/rsicd-subset beside the project; skips where it is absent."""
import json
from pathlib import Path

import pytest

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


def test_true_images_beat_image_blind(tmp_path):
    """500 steps each (about a minute apiece on 2 idle cores); the README's run uses 1,500."""
    import train
    scores = {}
    for name, extra in (("true", []), ("blind", ["--blind"])):
        train.main(["--data", str(RSICD), "--skip-bad", "--out", str(tmp_path / name), "--steps", "500",
                    "--eval-every", "500", "--save-every", "1000", "--eval-samples", "218", *extra])
        log = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
        scores[name] = next(r for r in log if "test_after" in r)
        scores[name]["image_gap"] = [r["image_gap"] for r in log if "image_gap" in r][-1]
    true, blind = scores["true"], scores["blind"]
    assert true["test_after"]["CIDEr-D"] > 1.2 * blind["test_after"]["CIDEr-D"], scores
    assert true["test_after"]["BLEU-4"] > blind["test_after"]["BLEU-4"], scores
    assert true["image_gap"] > 0.02 > abs(blind["image_gap"]), scores  # only the true run's loss needs its image
