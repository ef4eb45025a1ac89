"""Detection scores as COCO computes them: AP per class at IoU 0.5 and averaged over IoU 0.50:0.05:0.95.

A small numpy copy of pycocotools' `COCOeval` for boxes (`evaluate` -> `evaluateImg`, `accumulate`,
`summarize`), restricted to what a PaliGemma answer has: no crowd regions, one area range ("all"),
at most 100 detections per image and class. It follows pycocotools step for step, so the numbers
are equal to its (tested to 1e-6), quirks included:

- detections are ranked by score with a *stable* sort, within each image and then across images,
  so equal scores (every box read from a predictions file scores 1.0) keep their file order;
- a detection takes the unmatched reference of highest IoU >= the threshold; on equal IoU the later
  reference wins (`evaluateImg`'s `if ious[d, g] < iou: continue`);
- precision is made monotone and read at 101 recall points (0, 0.01, ..., 1), 0 past the last recall;
- a class with no reference box anywhere has no AP (`accumulate`: `npig == 0` -> -1, left out of
  the mean); its detections are not counted against any other class;
- mAP is the mean over classes (and thresholds) of those that have one.

Inputs, one entry per image, in file order: predictions [(label, box[, score]), ...] and references
[(label, box), ...], boxes (x0, y0, x1, y1) in any one coordinate system (IoU does not change when
x and y are scaled, so pixels and normalised coordinates give the same numbers).
"""
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # pycocotools Params.setDetParams: 0.5, 0.55, ..., 0.95
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100  # per image and class, pycocotools' maxDets[-1]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(D, 4) x (G, 4) boxes x0 y0 x1 y1 -> (D, G) intersection over union (0 where the union is empty)."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match(ious: np.ndarray) -> np.ndarray:
    """(D, G) IoUs, detections ranked best first -> (T, D) bool: detection d is a true positive at threshold t."""
    T, (D, G) = len(IOU_THRESHOLDS), ious.shape
    hit = np.zeros((T, D), bool)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(G, bool)
        for d in range(D):
            best, m = min(threshold, 1 - 1e-10), -1
            for g in range(G):
                if taken[g] or ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m >= 0:
                taken[m], hit[t, d] = True, True
    return hit


def precision_at_recall(hits: np.ndarray, n_references: int) -> np.ndarray:
    """(T, D) true-positive flags, all detections of a class ranked best first -> (T, 101) interpolated precision."""
    tp = np.cumsum(hits, axis=1, dtype=float)
    fp = np.cumsum(~hits, axis=1, dtype=float)
    out = np.zeros((len(hits), len(RECALL_POINTS)))
    for t in range(len(hits)):
        recall, precision = tp[t] / n_references, tp[t] / (tp[t] + fp[t] + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at this recall or beyond
        at = np.searchsorted(recall, RECALL_POINTS, side="left")
        ok = at < len(precision)
        out[t, ok] = precision[at[ok]]
    return out


def _boxes(items, image: int, what: str) -> np.ndarray:
    boxes = np.array([d[1] for d in items], dtype=float).reshape(-1, 4)
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():  # pycocotools would ignore a negative-area detection and match two empty boxes (0 / 0)
        raise ValueError(f"image {image}: {what} box {tuple(boxes[bad][0])} is empty (need x0 < x1 and y0 < y1)")
    return boxes


@dataclass
class ClassMatches:
    """One class over a set of images, each image's detections ranked and matched on its own (what does not
    change when images are drawn again: bootstrap resamples reuse it, resampled_ap.py)."""
    scores: np.ndarray  # (D,) each image's kept detections (at most MAX_DETECTIONS) best first, images in order
    hits: np.ndarray  # (T, D) bool: a true positive at IoU threshold t
    image: np.ndarray  # (D,) int: the image of each detection
    references: np.ndarray  # (N,) int: this class's reference boxes in each image
    detections: int  # detections before the per-image cap


def class_matches(predictions, references) -> dict:
    """label -> ClassMatches, for every label with a reference box somewhere (sorted)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} images of predictions but {len(references)} of references")
    labels = sorted({r[0] for refs in references for r in refs})
    out = {}
    for label in labels:
        scores, hits, images, n_refs, n_dets = [], [], [], [], 0
        for image, (preds, refs) in enumerate(zip(predictions, references)):
            g = _boxes([r for r in refs if r[0] == label], image, "reference")
            dets = [p for p in preds if p[0] == label]
            s = np.array([p[2] if len(p) > 2 else 1.0 for p in dets], dtype=float)
            order = np.argsort(-s, kind="mergesort")[:MAX_DETECTIONS]
            n_refs.append(len(g))
            n_dets += len(dets)
            scores.append(s[order])
            images.append(np.full(len(order), image))
            hits.append(match(iou(_boxes(dets, image, "predicted")[order], g)))
        out[label] = ClassMatches(np.concatenate(scores), np.concatenate(hits, axis=1), np.concatenate(images),
                                  np.array(n_refs), n_dets)
    return out


def average_precision(predictions, references) -> dict:
    """-> {"mAP@0.5", "mAP", "per_class": {label: {"AP@0.5", "AP", "references", "detections"}}}; the two
    means are None when no reference box exists."""
    return average_precision_of(class_matches(predictions, references))


def average_precision_of(matches: dict) -> dict:
    """average_precision from class_matches' label -> ClassMatches."""
    per_class = {}
    for label, m in matches.items():
        order = np.argsort(-m.scores, kind="mergesort")
        n_refs = int(m.references.sum())
        p = precision_at_recall(m.hits[:, order], n_refs)  # (T, 101)
        per_class[label] = {"AP@0.5": float(p[0].mean()), "AP": float(p.mean()), "references": n_refs,
                            "detections": m.detections}
    mean = lambda key: float(np.mean([c[key] for c in per_class.values()])) if per_class else None
    return {"mAP@0.5": mean("AP@0.5"), "mAP": mean("AP"), "per_class": per_class}
