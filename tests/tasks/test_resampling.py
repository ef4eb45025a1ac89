"""95 % intervals of the task metrics (tasks/resampling.py, resampled_ap.py), against independent references:

- a per-item mean (VQA accuracy, exact match, ANLS, miou, boxacc) and CER's ratio of sums against a
  hand-written numpy bootstrap with the captions' draws (rng.integers(0, N, N), seed 0 by default);
- mAP@0.5 / mAP of the fast path against average_precision.py (itself equal to pycocotools) recomputed on
  the explicitly resampled image list, resample by resample, with duplicated images, missed objects,
  false alarms, empty images, tied scores within an image and boxes on an integer grid;
- a row paired with itself: B - A is [0, 0] for every metric; a paired interval against a hand-written one.
"""
import random

import numpy as np
import pytest

from paligemma.captioning.bootstrap import resample_counts, resample_draws
from paligemma.tasks.answers import anls, levenshtein, vqa_accuracy
from paligemma.tasks.average_precision import average_precision, class_matches
from paligemma.tasks.evaluation import measure_split
from paligemma.tasks.resampled_ap import resampled_map
from paligemma.tasks.resampling import intervals, paired, statistics
from paligemma.tasks.segmentation import Segmentation, segmentation_items


def hand_interval(per_draw) -> list:
    """percentile interval of f(indices) over the captions' draws: rng.integers(0, N, N), 1000 times, seed 0."""
    return list(np.percentile(per_draw, [2.5, 97.5]))


def draws(n, resamples=1000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, n) for _ in range(resamples)]


def questions(seed=0, n=60):
    rng = random.Random(seed)
    words = ["2", "two", "3", "yes", "no", "red", "a red car"]
    refs = [[rng.choice(words) for _ in range(rng.choice([1, 3, 10]))] for _ in range(n)]
    preds = [rng.choice(r) if rng.random() < 0.6 else rng.choice(words) for r in refs]
    return preds, refs


def test_means_equal_a_hand_written_bootstrap_with_the_same_draws():
    preds, refs = questions()
    stats, _, _ = measure_split("answer", preds, refs, [str(i) for i in range(len(preds))])
    got = intervals(stats, 1000, 0)
    vqa = np.array([vqa_accuracy(p, r) for p, r in zip(preds, refs)])
    sim = np.array([anls(p, r) for p, r in zip(preds, refs)])
    want = {"VQA accuracy": hand_interval([vqa[i].mean() for i in draws(len(preds))]),
            "ANLS": hand_interval([sim[i].mean() for i in draws(len(preds))])}
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-12)
    assert got["VQA accuracy"][0] < stats.scores["VQA accuracy"] < got["VQA accuracy"][1]
    assert got["VQA accuracy"][1] - got["VQA accuracy"][0] > 0.1  # 60 questions: a wide interval, not a point
    assert intervals(stats, 300, 5) != intervals(stats, 300, 6)  # the seed is used


def test_cer_resamples_its_two_sums_not_a_mean_of_ratios():
    """CER = sum(edits) / sum(reference characters) on every resample; references of very different lengths
    make the mean of per-item ratios a different (wrong) interval."""
    rng = random.Random(1)
    refs = [["".join(rng.choice("abc") for _ in range(rng.choice([2, 40])))] for _ in range(50)]
    preds = [r[0][:-1] + "x" if rng.random() < 0.5 else r[0][1:] for r in refs]
    stats, _, _ = measure_split("ocr", preds, refs, [str(i) for i in range(50)])
    edits = np.array([levenshtein(r[0], p) for p, r in zip(preds, refs)])
    chars = np.array([len(r[0]) for r in refs])
    got = intervals(stats)["CER"]
    np.testing.assert_allclose(got, hand_interval([edits[i].sum() / chars[i].sum() for i in draws(50)]), atol=1e-12)
    mean_of_ratios = hand_interval([(edits[i] / chars[i]).mean() for i in draws(50)])
    assert abs(got[1] - mean_of_ratios[1]) > 0.05
    assert stats.scores["CER"] == edits.sum() / chars.sum()


def test_segmentation_means_resampled():
    rng = np.random.default_rng(3)
    refs, preds = [], []
    for i in range(40):
        m = np.zeros((8, 8), bool)
        m[:4, :4] = True
        refs.append(((0, 0, 4, 4), m))
        p = rng.random((8, 8)) < 0.4
        p[0, 0] = True
        preds.append([] if i % 7 == 0 else [Segmentation("", (0, 0, rng.uniform(2, 6), 4), p)])
    items, _ = segmentation_items(preds, refs)
    stats = statistics({k: float(np.mean(v)) for k, (v, _) in items.items()}, items, [str(r) for r in refs])
    got = intervals(stats, 1000, 0)
    for k in ("miou", "boxacc/0.5", "boxacc/0.75"):
        v = np.array(items[k][0])
        np.testing.assert_allclose(got[k], hand_interval([v[i].mean() for i in draws(40)]), atol=1e-12)


def detection_case(seed, tied, grid):
    """Images of 0-4 objects (two classes): missed, duplicated, false alarms, a third class only predicted,
    empty images; scores all 1.0 (tied) or one decimal (ties across and within images)."""
    rng = random.Random(seed)
    preds, refs = [], []
    for _ in range(rng.randint(8, 20)):
        r, p = [], []
        if rng.random() < 0.2:  # empty image, sometimes with a false alarm
            preds.append([("ship", (1, 1, 9, 9), 0.3)] if rng.random() < 0.5 else [])
            refs.append([])
            continue
        for _ in range(rng.randint(1, 4)):
            x, y = rng.randint(0, 60), rng.randint(0, 60)
            box = (x, y, x + rng.randint(3, 20), y + rng.randint(3, 20))
            label = rng.choice(["plane", "ship"])
            r.append((label, box))
            if rng.random() < 0.2:
                continue  # missed
            dx = rng.choice([0, 1, 2, 5]) if grid else rng.uniform(-2, 2)
            p.append((label, (box[0] + dx, box[1], box[2] + dx, box[3])))
            if rng.random() < 0.3:
                p.append((label, (box[0] + 1, box[1] + 1, box[2] + 1, box[3])))  # a duplicate
        for _ in range(rng.randint(0, 2)):
            x, y = rng.uniform(0, 60), rng.uniform(0, 60)
            p.append((rng.choice(["plane", "ship", "tank"]), (x, y, x + 8, y + 8)))
        rng.shuffle(p)
        preds.append([(l, b, 1.0 if tied else round(rng.random(), 1)) for l, b in p])
        refs.append(r)
    return preds, refs


@pytest.mark.parametrize("seed,tied,grid", [(0, False, False), (1, False, True), (2, True, False), (3, True, True),
                                            (4, False, False)])
def test_fast_map_equals_recomputing_on_the_resampled_images(seed, tied, grid, monkeypatch):
    """Resample b is the image list in file order, each image as often as draw b has it (equal scores rank
    by image, then copy, as pycocotools' stable sort ranks them in that list); the same in small chunks."""
    from paligemma.tasks import resampled_ap
    preds, refs = detection_case(seed, tied, grid)
    n, B = len(preds), 40
    got = resampled_map(class_matches(preds, refs), resample_counts(n, B, seed))
    monkeypatch.setattr(resampled_ap, "CHUNK", 700)  # a few resamples at a time
    chunked = resampled_map(class_matches(preds, refs), resample_counts(n, B, seed))
    assert all(np.array_equal(got[k], chunked[k], equal_nan=True) for k in got)
    twice = 0
    for b, d in enumerate(resample_draws(n, B, seed)):
        order = np.sort(d)
        want = average_precision([preds[i] for i in order], [refs[i] for i in order])
        for k in ("mAP@0.5", "mAP"):
            assert got[k][b] == pytest.approx(want[k], abs=1e-9, rel=0)
        twice += len(order) - len(set(order))
    assert twice > 0  # images drawn more than once
    whole = average_precision(preds, refs)
    ones = resampled_map(class_matches(preds, refs), np.ones((1, n), int))
    assert ones["mAP@0.5"][0] == pytest.approx(whole["mAP@0.5"], abs=1e-12) and 0 < whole["mAP"] < 1


def test_ties_within_an_image_interleave_when_it_is_drawn_twice():
    """One image, two planes; a hit and a false alarm with one score, the false alarm written first. Drawn
    twice the ranking is FA hit FA hit (not FA FA hit hit): precision 1/2 at recall 1/2 and 1."""
    refs = [[("plane", (0, 0, 10, 10))], [("plane", (40, 40, 50, 50))]]
    preds = [[("plane", (20, 20, 30, 30), 0.5), ("plane", (0, 0, 10, 10), 0.5)], []]
    got = resampled_map(class_matches(preds, refs), np.array([[2, 0]]))
    want = average_precision(preds[:1] * 2, refs[:1] * 2)["mAP@0.5"]
    assert got["mAP@0.5"][0] == pytest.approx(want, abs=1e-12) == pytest.approx(0.5, abs=1e-12)


def test_a_resample_without_any_reference_box_is_left_out():
    preds, refs = [[("plane", (0, 0, 5, 5), 0.9)], []], [[("plane", (0, 0, 5, 5))], []]
    got = resampled_map(class_matches(preds, refs), np.array([[0, 2], [1, 1]]))
    assert np.isnan(got["mAP"][0]) and got["mAP"][1] == pytest.approx(1.0)
    stats = statistics(average_precision(preds, refs), {}, refs, class_matches(preds, refs))
    lo, hi = intervals(stats, 200, 0)["mAP"]
    assert (lo, hi) == pytest.approx((1.0, 1.0))  # resamples with a reference all score 1; those without are not 0s


def test_a_row_paired_with_itself_is_exactly_zero():
    preds, refs = questions(2)
    names = [str(i) for i in range(len(preds))]
    for task in ("answer", "ocr", "exact"):
        stats = measure_split(task, preds, refs, names)[0]
        block = paired(stats, stats, 300, 0)
        assert set(block) == set(stats.scores)
        assert all(v["ci95"] == [0.0, 0.0] and v["difference"] == 0 and v["b_beats_a"] == 0 for v in block.values())
    boxes, truth = detection_case(5, False, False)
    det = statistics(average_precision(boxes, truth), {}, truth, class_matches(boxes, truth))
    block = paired(det, det, 300, 0)
    assert set(block) == {"mAP@0.5", "mAP"} and all(v["ci95"] == [0.0, 0.0] for v in block.values())


def test_paired_interval_equals_a_hand_written_one():
    """B - A of VQA accuracy on the same draws; a paired comparison of different references is refused."""
    preds, refs = questions(4)
    better = [r[0] if i % 3 else p for i, (p, r) in enumerate(zip(preds, refs))]
    names = [str(i) for i in range(len(preds))]
    a, b = measure_split("answer", preds, refs, names)[0], measure_split("answer", better, refs, names)[0]
    block = paired(a, b, 1000, 0)["VQA accuracy"]
    va = np.array([vqa_accuracy(p, r) for p, r in zip(preds, refs)])
    vb = np.array([vqa_accuracy(p, r) for p, r in zip(better, refs)])
    diffs = [vb[i].mean() - va[i].mean() for i in draws(len(preds))]
    np.testing.assert_allclose(block["ci95"], hand_interval(diffs), atol=1e-12)
    assert block["b_beats_a"] == pytest.approx(np.mean(np.array(diffs) > 1e-12), abs=0.005) and block["ci95"][0] > 0
    other = measure_split("answer", preds, [r[::-1] + ["x"] for r in refs], names)[0]
    with pytest.raises(ValueError, match="same references"):
        paired(a, other)
