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

CHUNK = 2 ** 23  # thresholds x resamples x ranked entries held at once (int64: 64 MB an array)


def _entries(m, copies: int):
    """The ranked entries of one class: (image (U,), copy (U,) or -1 for a whole run, hits (T, U)),
    ranked by score, then image, then copy, then rank in the image (the resampled list's stable order)."""
    # a detection sharing its score with another of its image: its copies interleave with that one's
    key = np.stack([m.image.astype(float), m.scores], 1)
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    tied = counts[inverse.reshape(-1)] > 1
    index = np.concatenate([np.flatnonzero(~tied), np.repeat(np.flatnonzero(tied), copies)])
    copy = np.concatenate([np.full(int((~tied).sum()), -1), np.tile(np.arange(copies), int(tied.sum()))])
    order = np.lexsort((index, np.maximum(copy, 0), m.image[index], -m.scores[index]))
    index, copy = index[order], copy[order]
    return m.image[index], copy, m.hits[:, index]


def _needed(n_refs: np.ndarray) -> np.ndarray:
    """(B,) references -> (B, 101): the fewest true positives whose recall k / n (in float64, as
    precision_at_recall divides) reaches each recall point."""
    n = np.maximum(n_refs, 1).astype(float)[:, None]
    k = np.maximum(np.floor(RECALL_POINTS * n) - 1, 0)
    while (short := k / n < RECALL_POINTS).any():
        k += short
    return k.astype(np.int64)


def _rows_precision(row: np.ndarray, weight: np.ndarray, hits: np.ndarray, need: np.ndarray) -> np.ndarray:
    """The entries present in some resamples, concatenated (row: (M,) their resample, ascending; weight (M,);
    hits (T, M)) and need (R, 101) for those R resamples -> (R, T, 101) interpolated precision.

    Cumulative sums run over all rows at once, so they are sorted: the first position of row r reaching
    k true positives is the first overall reaching k + (the sum before row r), one searchsorted of
    integers (exact). The best precision from there to the row's end is a max over the segments
    between consecutive starts (np.maximum.reduceat), then a running max from the last segment back."""
    R, T = len(need), len(hits)
    start = np.searchsorted(row, np.arange(R + 1))  # (R + 1,) where each row's entries begin
    first, end = start[:-1], start[1:, None]
    drawn = np.cumsum(weight)
    drawn = drawn - np.append(0, drawn)[first][row]  # (M,) detections ranked so far in the row
    found = np.cumsum(weight * hits, axis=1)  # (T, M) true positives so far, all rows
    before = np.concatenate([np.zeros((T, 1), np.int64), found], 1)[:, first]  # (T, R) before each row
    out = np.zeros((R, T, len(RECALL_POINTS)))
    for t in range(T):
        precision = (found[t] - before[t][row]) / (drawn + np.spacing(1))  # tp / (tp + fp + eps), as COCO
        at = np.searchsorted(found[t], need + before[t][:, None], side="left")  # (R, 101) first reaching
        at = np.clip(at, first[:, None], end)  # need 0: the row's first entry; end: none
        bounds = np.concatenate([at, end], axis=1)  # (R, 102)
        seg = np.maximum.reduceat(np.append(precision, 0.0), bounds.ravel()).reshape(R, -1)[:, :-1]
        seg[bounds[:, :-1] == bounds[:, 1:]] = 0.0  # an empty segment (reduceat returns the element there)
        out[:, t] = np.maximum.accumulate(seg[:, ::-1], axis=1)[:, ::-1]
    return out


def class_precision(m, counts: np.ndarray) -> np.ndarray:
    """One class's ClassMatches on resamples counts (B, N) -> (B, T, 101) interpolated precision
    (precision_at_recall's, for each resampled image list)."""
    B, T = len(counts), len(IOU_THRESHOLDS)
    image, copy, hits = _entries(m, int(counts.max(initial=1)))
    need = _needed(counts @ m.references)
    out = np.zeros((B, T, len(RECALL_POINTS)))
    rows = max(1, CHUNK // (T * max(len(image), 1)))
    for lo in range(0, B, rows):
        drawn = counts[lo:lo + rows, image]  # (b, U)
        weight = np.where(copy < 0, drawn, drawn > copy)  # a run: its count; one copy: drawn that often or not
        row, entry = np.nonzero(weight)  # the entries each resample draws, resample by resample
        out[lo:lo + rows] = _rows_precision(row, weight[row, entry], hits[:, entry], need[lo:lo + rows])
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
