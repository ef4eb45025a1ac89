"""`python train.py --demo detect`: the tiny model learns to localise the generated objects, and the
image-blind control (every training answer paired with another image, train.py --blind) does not.

Measured (the demo's recipe, 900 steps of 16, 100 test scenes, every box scored 1.0; one thread, a loaded
machine): seed 0 true 0.217 (val 0.251 at step 900), blind 0.0023 (its best step's model 0.0142). Issue #20's bar (>= 0.5 and >= 5x blind on
3 seeds) is NOT met yet, and a variant recipe (spacing=16, 1,200 steps) stayed at 0.004 on seed 0: the
tiny model escapes the answer prior late (step ~400) or not at all. This test holds the recipe to
what seed 0 showed, with margin (0.10, 3x blind); it runs the demo twice (minutes), so only where
PALIGEMMA_DEMO_TESTS is set (the full suite has to stay under 10 minutes)."""
import json
import os

import pytest


def test_detection_demo_localises_and_its_blind_control_does_not(tmp_path):
    if not os.environ.get("PALIGEMMA_DEMO_TESTS"):
        pytest.skip("set PALIGEMMA_DEMO_TESTS=1 to run the detection demo twice (minutes on 2 CPU cores)")
    import train

    def run(name, *extra):
        out = tmp_path / name
        train.main(["--demo", "detect", "--out", str(out), "--val-captions", "0", *extra])
        return next(json.loads(l) for l in open(out / "metrics.jsonl") if "test_after" in l)["test_after"]
    true, blind = run("true"), run("blind", "--blind")
    assert true["mAP@0.5"] >= 0.10, true
    assert true["mAP@0.5"] >= 3 * blind["mAP@0.5"] + 0.02, (true, blind)
