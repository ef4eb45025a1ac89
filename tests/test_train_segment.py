"""train.py and evaluate.py on a tiny segmentation set with a mask file per object, end to end (#21).

The set: 64 x 64 images, one yellow rectangle each at x 8..40, y 16..48 (1024 px), its mask file beside
the JSONL; the VQ-VAE the hand-built blocky one with its encoder (tests/tasks/vae_files.py). The training
answer, by hand: box tokens round(16 / 64 * 1023) = 256, round(127.875) = 128, round(767.25) = 767,
round(639.375) = 639, and sixteen <seg001> (the crop is filled), then the label. Every row has the same
answer, which the tiny model learns in 20 steps. Written back, that answer's mask is big_vision's
truncated box, rows int(16.016) = 16 .. int(47.98) = 47 and columns int(8.008) = 8 .. int(39.98) = 39:
31 x 31 = 961 px inside the reference's 1024, so mIoU against the mask files is 961 / 1024 = 0.9385 (the
answer's own <seg> codes decoded as the reference would give 1.0)."""
import json

import pytest

from tests.tasks.mask_sets import write_mask_set
from tests.tasks.vae_files import blocky_vae, random_vae

MIOU = 961 / 1024


@pytest.fixture(scope="module")
def segment_run(tmp_path_factory):
    import train
    root = tmp_path_factory.mktemp("segtrain")
    data, vae = write_mask_set(root / "data"), blocky_vae(root / "blocky.npz", encoder=True)
    train.main(["--data", str(data), "--vae", str(vae), "--out", str(root / "out"), "--steps", "40", "--batch-size", "4",
                "--eval-every", "20", "--val-captions", "2", "--eval-samples", "2", "--lr", "3e-3", "--warmup", "2"])
    return root, data, vae


def test_train_picks_best_by_mask_iou_against_the_mask_files(segment_run):
    root, _, _ = segment_run
    records = [json.loads(l) for l in open(root / "out" / "metrics.jsonl")]
    val = [r for r in records if "val_miou" in r]
    assert [r["step"] for r in val] == [20, 40]
    assert val[-1]["val_miou"] == pytest.approx(MIOU, abs=1e-12) and val[-1]["val_boxacc/0.5"] == 1.0
    after = next(r["test_after"] for r in records if "test_after" in r)
    assert after["miou"] == pytest.approx(MIOU, abs=1e-12) and after["total"] == 2 and after["dropped"] == 0
    best = json.loads((root / "out" / "best" / "best.json").read_text())
    assert best["selected_by"] == "val_miou" and best["val_miou"] == max(r["val_miou"] for r in val)
    assert (root / "out" / "segmentations.png").stat().st_size > 0


def test_evaluate_scores_the_trained_model_against_the_mask_files(segment_run):
    import evaluate
    root, data, vae = segment_run
    (scores,) = evaluate.main(["--model", str(root / "out" / "best"), "--data", str(data), "--vae", str(vae),
                               "--out", str(root / "eval"), "--max-new-tokens", "40", "--bootstrap", "0"]).values()
    assert scores["miou"] == pytest.approx(MIOU, abs=1e-12) and scores["boxacc/0.75"] == 1.0
    rows = [json.loads(l) for l in open(root / "eval" / "predictions.jsonl")]
    answer = "<loc0256><loc0128><loc0767><loc0639>" + "<seg001>" * 16 + " rectangle"
    assert [(r["prediction"], r["references"]) for r in rows] == [(answer, ["masks/test0.png rectangle"]),
                                                                (answer, ["masks/test1.png rectangle"])]


def test_vae_faults_are_named_before_any_model_loads(tmp_path):
    """A segment set without --vae, a missing file, and a decoder-only file for mask rows: each refused
    before the (here nonexistent) model is read."""
    import numpy as np
    import train
    from paligemma.safetensors_io import CheckpointError
    data = write_mask_set(tmp_path / "data", splits=(("train", 1), ("val", 1), ("test", 1)))
    run = lambda *extra: train.main(["--model", str(tmp_path / "no-model"), "--data", str(data), "--out",
                                     str(tmp_path / "out"), *extra])
    with pytest.raises(ValueError, match=r"segmentation set \(prompt 'segment shape', e\.g\. train0\.png\) needs --vae"):
        run()
    with pytest.raises(FileNotFoundError, match=r"missing\.npz: no such file"):
        run("--vae", str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "other.npz", weight=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"other\.npz: not the mask VQ-VAE's decoder"):
        run("--vae", str(tmp_path / "other.npz"))
    with pytest.raises(CheckpointError, match=r"decoder\.npz: holds no encoder half"):
        run("--vae", str(random_vae(tmp_path / "decoder.npz", encoder=False)))
