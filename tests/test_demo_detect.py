"""`python train.py --demo detect`: the tiny model learns to localise the generated objects, and the
image-blind control (every training answer paired with another image, train.py --blind) does not.

Measured (the demo's recipe: one 32 px object per scene on the 16 px grid, 600 steps of 16, lr 3e-3, the
random SigLIP frozen; 100 test scenes; --val-captions 0 as below; OMP_NUM_THREADS=1, two runs at once,
machine load ~5): test mAP@0.5 true / blind seed 0 1.000 / 0.0005, seed 1 1.000 / 0.0010, seed 2
1.000 / 0.0126 (seeds 3-6: 1.000, true only); image gap at step 100 +1.64 to +2.28 on seeds 0-2. Issue
#20's bar (>= 0.5 and >= 5x blind on 3 seeds) is met on all three. This test runs seed 0 (the default)
and holds it to the bar itself, 0.5 and 5x blind + 0.05, far below the measured 1.000 / 0.0005; it runs
the demo twice (minutes), so only where PALIGEMMA_DEMO_TESTS is set (the full suite has to stay under
10 minutes)."""
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
    assert true["mAP@0.5"] >= 0.5, true
    assert true["mAP@0.5"] >= 5 * blind["mAP@0.5"] + 0.05, (true, blind)
