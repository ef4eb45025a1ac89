"""What the task metrics' 95 % intervals cost: detection (mAP on every resample) at 100 images and at
RISC's test-set size, 4,452; a VQA-sized mean for comparison.

    flock /tmp/heavy.lock python benchmarks/task_intervals.py [--images 100 4452] [--resamples 1000]

Detection sets are generated: 1-6 objects per image over 5 classes, 20 % missed, some duplicated, false
alarms, 10 % empty images; scores either distinct (the model's <loc> confidences) or all 1.0 (a
--predictions file: every detection of an image and class ties, the case resampled_ap.py expands).
Timed, one after another: the per-image matching (once per row, also without intervals), the
resampled mAP (resampled_ap.resampled_map), and at 100 images the slow way it replaces (average_precision
on each explicitly resampled image list).
"""
import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paligemma.captioning.bootstrap import resample_counts, resample_draws  # noqa: E402
from paligemma.tasks.average_precision import average_precision, class_matches  # noqa: E402
from paligemma.tasks.resampled_ap import resampled_map  # noqa: E402
from paligemma.tasks.resampling import intervals, statistics  # noqa: E402

LABELS = ["plane", "ship", "tank", "car", "bridge"]


def detection_set(n: int, tied: bool, seed: int = 0):
    rng = random.Random(seed)
    preds, refs = [], []
    for _ in range(n):
        r, p = [], []
        for _ in range(0 if rng.random() < 0.1 else rng.randint(1, 6)):
            x, y = rng.uniform(0, 400), rng.uniform(0, 400)
            box = (x, y, x + rng.uniform(10, 80), y + rng.uniform(10, 80))
            label = rng.choice(LABELS)
            r.append((label, box))
            if rng.random() < 0.2:
                continue
            d = rng.uniform(-6, 6)
            p.append((label, (box[0] + d, box[1], box[2] + d, box[3] + d)))
            if rng.random() < 0.1:
                p.append((label, (box[0] + 2, box[1] + 2, box[2], box[3])))
        for _ in range(rng.randint(0, 2)):
            x, y = rng.uniform(0, 400), rng.uniform(0, 400)
            p.append((rng.choice(LABELS), (x, y, x + 30, y + 30)))
        preds.append([(l, b, 1.0 if tied else rng.random()) for l, b in p])
        refs.append(r)
    return preds, refs


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[100, 4452])
    p.add_argument("--resamples", type=int, default=1000)
    args = p.parse_args()
    print(f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("| images | scores | detections | matching (once) | mAP x resamples, fast | slow (explicit lists) | interval |")
    print("|---:|---|---:|---:|---:|---:|---|")
    B = args.resamples
    for n in args.images:
        for tied in (False, True):
            preds, refs = detection_set(n, tied)
            matches, t_match = timed(lambda: class_matches(preds, refs))
            got, t_fast = timed(lambda: resampled_map(matches, resample_counts(n, B, 0)))
            slow = "-"
            if n <= 100:
                def explicit():
                    return [average_precision([preds[i] for i in d], [refs[i] for i in d])["mAP"]
                            for d in np.sort(resample_draws(n, B, 0))]
                want, t_slow = timed(explicit)
                assert np.allclose(want, got["mAP"], atol=1e-9, rtol=0)
                slow = f"{t_slow:.2f} s"
            lo, hi = intervals(statistics(average_precision(preds, refs), {}, refs, matches), B, 0)["mAP@0.5"]
            print(f"| {n} | {'all 1.0' if tied else 'distinct'} | {sum(map(len, preds))} | {t_match:.2f} s | "
                  f"{t_fast:.2f} s | {slow} | mAP@0.5 [{lo:.3f}, {hi:.3f}] |", flush=True)
    n = max(args.images)
    values = np.random.default_rng(0).random(n)
    stats = statistics({"VQA accuracy": float(values.mean())}, {"VQA accuracy": (values, np.ones(n))}, list(range(n)))
    _, t = timed(lambda: intervals(stats, B, 0))
    print(f"\na per-item mean (VQA accuracy, ANLS, miou, ...) at {n} items, {B} resamples: {t:.2f} s")


if __name__ == "__main__":
    main()
