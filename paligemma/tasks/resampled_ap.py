"""mAP@0.5 and mAP of a thousand bootstrap resamples of the images at once, each equal to
average_precision.py on the resampled image list.

A resample is a vector of counts, how often each image was drawn; an image drawn twice counts its
boxes twice (its references twice in the recall's denominator, its detections twice in the ranking).
The resampled list is the images in file order, each repeated as often as drawn, so equal scores
rank as pycocotools ranks them: by image, then by copy, then by rank within the image.

Matching happens within an image, so it does not change when images are drawn again: it is done
once (average_precision.class_matches), and a resample only re-weights the ranked detections. Two
facts make a weighted cumulative sum exact, not an approximation:

- the interpolated precision at recall r is the best precision of any ranked position whose recall
  is >= r (the monotone envelope read at the first such position);
- inside a run of copies of one detection, no position beats the run's last (true positives: recall
  and precision both grow along the run) or the position before the run (false positives: recall
  stays, precision falls); so one position per run, after its weighted count, gives the same maximum.

The one case where copies of a detection are not one run: detections of one image and class with
equal scores, whose copies interleave (a b a b for an image drawn twice). Those are expanded into
one entry per possible copy, present (weight 1) in the resamples that drew the image that often.
"""
import numpy as np

from .average_precision import IOU_THRESHOLDS, RECALL_POINTS

CHUNK = 2 ** 24  # resamples x thresholds x ranked entries held at once (~130 MB of float64)


def _entries(m, copies: int):
    """The ranked entries of one class: (image (U,), copy (U,) or -1 for a whole run, hits (T, U)),
    ranked by score, then image, then copy, then rank in the image (the resampled list's stable order)."""
    D = len(m.scores)
    # a detection sharing its score with another of its image: its copies interleave with that one's
    key = np.stack([m.image.astype(float), m.scores], 1)
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    tied = counts[inverse.reshape(-1)] > 1
    index = np.concatenate([np.flatnonzero(~tied), np.repeat(np.flatnonzero(tied), copies)])
    copy = np.concatenate([np.full(int((~tied).sum()), -1), np.tile(np.arange(copies), int(tied.sum()))])
    order = np.lexsort((index, np.maximum(copy, 0), m.image[index], -m.scores[index]))
    index, copy = index[order], copy[order]
    assert len(index) == D + (copies - 1) * int(tied.sum())
    return m.image[index], copy, m.hits[:, index]


def _first_reaching(tp: np.ndarray, need: np.ndarray) -> np.ndarray:
    """tp (R, U) nondecreasing integer rows, need (R, P) -> (R, P): the first column where tp >= need (U: none).
    Integers, so rows are stacked into one sorted array exactly (row r offset by r * step)."""
    R, U = tp.shape
    step = int(max(tp.max(initial=0), need.max(initial=0))) + 1
    offset = np.arange(R, dtype=np.int64)[:, None] * step
    at = np.searchsorted((tp + offset).ravel(), (need + offset).ravel(), side="left").reshape(need.shape)
    return at - np.arange(R)[:, None] * U


def _needed(n_refs: np.ndarray) -> np.ndarray:
    """(B,) references -> (B, 101): the fewest true positives whose recall k / n (in float64, as
    precision_at_recall divides) reaches each recall point."""
    n = np.maximum(n_refs, 1).astype(float)[:, None]
    k = np.maximum(np.floor(RECALL_POINTS * n) - 1, 0)
    while (short := k / n < RECALL_POINTS).any():
        k += short
    return k.astype(np.int64)


def class_precision(m, counts: np.ndarray) -> np.ndarray:
    """One class's ClassMatches on resamples counts (B, N) -> (B, T, 101) interpolated precision
    (precision_at_recall's, for each resampled image list)."""
    B, T = len(counts), len(IOU_THRESHOLDS)
    image, copy, hits = _entries(m, int(counts.max(initial=1)))
    drawn = counts[:, image]  # (B, U)
    weight = np.where(copy < 0, drawn, drawn > copy)  # a run: its count; one copy: drawn that often or not
    need = _needed(counts @ m.references)
    out = np.zeros((B, T, len(RECALL_POINTS)))
    if not len(image):
        return out
    rows = max(1, CHUNK // (T * len(image)))
    for lo in range(0, B, rows):
        w = weight[lo:lo + rows, None, :]  # (b, 1, U)
        tp = np.cumsum(w * hits, axis=2)  # (b, T, U) integers
        fp = np.cumsum(w * ~hits, axis=2)
        precision = tp / (tp + fp + np.spacing(1))
        precision = np.maximum.accumulate(precision[..., ::-1], axis=2)[..., ::-1]  # best at this recall or beyond
        b = len(tp)
        at = _first_reaching(tp.reshape(b * T, -1), np.repeat(need[lo:lo + rows], T, axis=0))  # (b T, 101)
        flat = precision.reshape(b * T, -1)
        ok = at < flat.shape[1]
        got = np.zeros(at.shape)
        got[ok] = flat[np.nonzero(ok)[0], at[ok]]
        out[lo:lo + rows] = got.reshape(b, T, -1)
    return out


def resampled_map(matches: dict, counts: np.ndarray) -> dict:
    """class_matches' label -> ClassMatches, counts (B, N) -> {"mAP@0.5": (B,), "mAP": (B,)}: the mean over
    the classes with a reference box in that resample (a class drawn without one has no AP, as in
    average_precision); nan where a resample draws no reference box at all."""
    counts = np.asarray(counts, dtype=np.int64)
    sums, classes = np.zeros((2, len(counts))), np.zeros(len(counts))
    for m in matches.values():
        present = counts @ m.references > 0  # (B,)
        p = class_precision(m, counts)
        sums += np.where(present, np.stack([p[:, 0].mean(1), p.mean((1, 2))]), 0)
        classes += present
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / classes
    return {"mAP@0.5": means[0], "mAP": means[1]}
