"""`python train.py --demo detect`: the tiny model learns to localise the generated objects, and the
image-blind control (every training answer paired with another image) does not.

Full demo runs (900 steps of 16, 2 CPU threads, 100 test images), mAP@0.5 true / blind:
MEASURED_FULL
This test: SHORT_RUN."""
import json

import pytest


def test_mAP(tmp_path):
    import train

    def run(name, *extra):
        out = tmp_path / name
        train.main(["--demo", "detect", "--out", str(out), "--steps", "300", "--val-captions", "0", *extra])
        return next(json.loads(l) for l in open(out / "metrics.jsonl") if "test_after" in l)["test_after"]
    true, blind = run("true"), run("blind", "--blind")
    assert true["mAP@0.5"] >= THRESHOLD, true
    assert true["mAP@0.5"] >= RATIO * max(blind["mAP@0.5"], 0.01), (true, blind)
