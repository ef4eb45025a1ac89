"""mAP@0.5 and COCO mAP@[.5:.95], overall and per class, against pycocotools' COCOeval on generated
cases: several classes, missed objects, duplicates, false alarms, a class only ever predicted, empty
images, tied scores (file order), boxes on an integer grid (IoU exactly at a threshold), and more than
100 detections of one class in one image."""
import contextlib
import io
import random

import numpy as np
import pytest

from paligemma.tasks import average_precision

pycocotools = pytest.importorskip("pycocotools", reason="pycocotools is the reference for mAP: pip install pycocotools "
                                  "(in setup.cfg's test extra)")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

LABELS = ["plane", "ship", "tank"]


def coco_reference(predictions, references, labels):
    """pycocotools' numbers: overall (stats[1], stats[0]) and per class (AP@0.5, AP)."""
    cat = {l: i + 1 for i, l in enumerate(labels)}
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]
    anns = [{"image_id": i + 1, "category_id": cat[l], "bbox": xywh(b), "iscrowd": 0, "area": (b[2] - b[0]) * (b[3] - b[1])}
            for i, refs in enumerate(references) for l, b in refs]
    for n, a in enumerate(anns):
        a["id"] = n + 1  # from 1: pycocotools reads a match with id 0 as no match
    gt = COCO()
    gt.dataset = {"images": [{"id": i + 1} for i in range(len(references))], "annotations": anns,
                  "categories": [{"id": c, "name": l} for l, c in cat.items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([{"image_id": i + 1, "category_id": cat[p[0]], "bbox": xywh(p[1]),
                          "score": p[2] if len(p) > 2 else 1.0} for i, preds in enumerate(predictions) for p in preds])
        e = COCOeval(gt, dt, "bbox")
        e.evaluate(), e.accumulate(), e.summarize()
    per_class = {}
    for k, l in enumerate(labels):
        s = e.eval["precision"][:, :, k, 0, -1]  # (iou, recall) at area "all", 100 detections
        if (s > -1).any():
            per_class[l] = (s[0].mean(), s.mean())
    return e.stats[1], e.stats[0], per_class


def jitter(box, rng, amount):
    """Each edge moved by up to `amount`, the box kept at least 0.5 wide and high (parse_detections never
    returns an empty box; pycocotools would ignore one of negative area)."""
    x0, y0, x1, y1 = (v + rng.uniform(-amount, amount) for v in box)
    return min(x0, x1 - 0.5), min(y0, y1 - 0.5), max(x1, x0 + 0.5), max(y1, y0 + 0.5)


def make_case(seed, tied=False, grid=False):
    rng = random.Random(seed)
    preds, refs = [], []
    for image in range(rng.randint(8, 25)):
        r, p = [], []
        if rng.random() < 0.2:  # an empty image, perhaps with a false alarm
            refs.append(r), preds.append(p if rng.random() < 0.5 else [("ship", (1, 1, 9, 9), 0.3)])
            continue
        for _ in range(rng.randint(1, 5)):
            x, y = rng.randint(0, 80), rng.randint(0, 80)
            box = (x, y, x + rng.randint(2, 20), y + rng.randint(2, 20))
            label = rng.choice(LABELS[:2])  # "tank" is only ever predicted: no AP, not in the mean
            r.append((label, box))
            roll = rng.random()
            if roll < 0.2:
                continue  # missed
            guess = box if grid else jitter(box, rng, rng.choice([0.5, 2, 5]))
            if grid:  # shifted by whole pixels: IoU often lands exactly on 0.5, 0.6, 0.75 ...
                dx = rng.choice([0, 0, 1, 2, 5])
                guess = (box[0] + dx, box[1], box[2] + dx, box[3])
            p.append((label if rng.random() < 0.9 else rng.choice(LABELS), guess))
            if roll > 0.85:  # a duplicate of the same object
                p.append((label, jitter(box, rng, 1)))
        for _ in range(rng.randint(0, 2)):  # false alarms anywhere
            x, y = rng.uniform(0, 80), rng.uniform(0, 80)
            p.append((rng.choice(LABELS), (x, y, x + rng.uniform(1, 15), y + rng.uniform(1, 15))))
        rng.shuffle(p)
        score = (lambda: 1.0) if tied else (lambda: round(rng.random(), 1))  # ties in both
        preds.append([(l, b, score()) for l, b in p])
        refs.append(r)
    return preds, refs


@pytest.mark.parametrize("seed,tied,grid", [(s, False, False) for s in range(6)] + [(s, True, False) for s in range(6, 9)]
                         + [(s, False, True) for s in range(9, 12)] + [(12, True, True)])
def test_equals_pycocotools(seed, tied, grid):
    preds, refs = make_case(seed, tied, grid)
    ours = average_precision(preds, refs)
    map50, map_, per_class = coco_reference(preds, refs, LABELS)
    assert ours["mAP@0.5"] == pytest.approx(map50, abs=1e-6) and ours["mAP"] == pytest.approx(map_, abs=1e-6)
    assert set(ours["per_class"]) == set(per_class) == {"plane", "ship"}
    for label, (ap50, ap) in per_class.items():
        assert ours["per_class"][label]["AP@0.5"] == pytest.approx(ap50, abs=1e-6)
        assert ours["per_class"][label]["AP"] == pytest.approx(ap, abs=1e-6)
    assert 0 < ours["mAP"] < ours["mAP@0.5"] < 1  # the case is neither trivial nor hopeless


def test_more_than_100_detections_per_image_and_class():
    rng = random.Random(3)
    refs = [[("plane", (x, 0, x + 4, 4)) for x in range(0, 600, 5)]]  # 120 objects
    preds = [[("plane", jitter(b, rng, 0.4), rng.random()) for _, b in refs[0]]]
    map50, map_, _ = coco_reference(preds, refs, ["plane"])
    ours = average_precision(preds, refs)
    assert ours["mAP@0.5"] == pytest.approx(map50, abs=1e-6) and ours["mAP"] == pytest.approx(map_, abs=1e-6)
    assert ours["mAP@0.5"] < 0.9  # only the 100 best-scored count: recall stops at 100 / 120


def test_by_hand():
    # one image, two planes; three detections ranked 0.9 (hit), 0.8 (a duplicate: false), 0.7 (the other plane)
    refs = [[("plane", (0, 0, 10, 10)), ("plane", (20, 0, 30, 10))]]
    preds = [[("plane", (0, 0, 10, 10), 0.9), ("plane", (0, 0, 10, 10), 0.8), ("plane", (20, 0, 30, 10), 0.7)]]
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> interpolated 1 up to recall 0.5 (51 points), 2/3 after (50)
    want = (51 * 1 + 50 * 2 / 3) / 101
    out = average_precision(preds, refs)
    assert out["mAP@0.5"] == pytest.approx(want) and out["mAP"] == pytest.approx(want)  # exact boxes: every IoU
    assert out["per_class"]["plane"]["references"] == 2 and out["per_class"]["plane"]["detections"] == 3
    # nothing to find anywhere: no mean
    assert average_precision([[("plane", (0, 0, 1, 1))]], [[]]) == {"mAP@0.5": None, "mAP": None, "per_class": {}}


def test_tied_scores_keep_file_order():
    refs = [[("a", (0, 0, 10, 10))]]
    hit, miss = ("a", (0, 0, 10, 10)), ("a", (50, 50, 60, 60))
    assert average_precision([[hit, miss]], refs)["mAP@0.5"] == pytest.approx(1.0)  # the hit ranks first
    assert average_precision([[miss, hit]], refs)["mAP@0.5"] == pytest.approx(0.5)  # precision 1/2 at recall 1


def test_equal_iou_goes_to_the_later_reference():
    # D1 (0.9) overlaps A and B by the same IoU 0.818; pycocotools gives it the later one, B, which leaves
    # A for D2 (an exact copy of A). Taking A instead would leave D2 only B (IoU 0.667): a miss above 0.65.
    refs = [[("a", (0, 0, 10, 10)), ("a", (2, 0, 12, 10))]]
    preds = [[("a", (1, 0, 11, 10), 0.9), ("a", (0, 0, 10, 10), 0.8)]]
    want = (7 * 1 + 3 * (51 * 0.5 / 101)) / 10  # both hits up to IoU 0.8; above it D1 misses, D2 hits
    assert average_precision(preds, refs)["mAP"] == pytest.approx(want)
    assert coco_reference(preds, refs, ["a"])[1] == pytest.approx(want)


def test_empty_box_is_refused_by_image():
    with pytest.raises(ValueError, match="image 1: predicted box .* is empty"):
        average_precision([[], [("a", (5, 5, 5, 9))]], [[("a", (0, 0, 1, 1))], [("a", (0, 0, 1, 1))]])
