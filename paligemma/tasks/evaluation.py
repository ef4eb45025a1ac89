"""A split's answers scored by its task, as evaluate.py reports them: which task, its metrics, what each
answer parsed to (for predictions.jsonl), and the answers drawn on their images.

    task     chosen by                   metrics (metrics.json keys)
    caption  prefix "caption/describe"   BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (evaluate.py's own caption path)
    detect   prefix "detect ..."         mAP@0.5, mAP (COCO @[.5:.95]), per_class, dropped
    answer   prefix "answer ..."         VQA accuracy, exact match, ANLS
    exact    --metric exact only         exact match
    ocr      prefix "ocr"                ANLS, CER, exact match
    segment  prefix "segment ..."        miou, boxacc/0.5, boxacc/0.75, invalid, total, dropped

The task comes from each example's prompt (its own prefix, or the run's --prompt) through
registry.task_of, unless --metric names it; a split whose prompts ask for two tasks is refused (score
each task on its own). Detection and segmentation references are each example's first reference,
parsed the same way as the answers (a segmentation reference given as text is its own <seg> codes
decoded by the same VQ-VAE: the mask the model is trained to write); rows with mask files
(mask_files.py) are scored against those masks at the image's size. measure_split keeps the per-item
statistics the metrics come from, for their 95 % intervals (resampling.py).
"""
from pathlib import Path

from PIL import Image

from .answers import answer_items, exact_match, ocr_items, scores_of
from .average_precision import average_precision_of, class_matches
from .boxes import draw, parse_detections
from .mask_files import reference_segments
from .registry import task_of_rows
from .vqvae import VAE_HELP

METRIC_FLAG = {"captions": "caption", "detection": "detect", "vqa": "answer", "exact": "exact", "ocr": "ocr",
               "segmentation": "segment"}  # evaluate.py --metric -> task


def task_of_split(prefixes: list, prompt: str, names: list[str], metric: str | None = None) -> str:
    """The one task of a split, from --metric or from its rows (registry.task_of_rows: each row's prefix,
    or the run's prompt); names: each example's image, to say which prompt is unreadable or which two
    tasks are mixed."""
    if metric:
        return METRIC_FLAG[metric]
    try:
        return task_of_rows(prefixes, prompt, names)
    except ValueError as e:
        if str(e).startswith("rows of"):
            raise ValueError(f"the split mixes tasks: {str(e).split(': ', 1)[1]}; evaluate one task at a time, or "
                             "choose the metric with --metric") from None
        raise


def image_sizes(paths) -> list[tuple[int, int]]:
    """(width, height) of each image file, read from its header."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.size)
    return out


def _reference(task: str, text: str, name: str, width: int, height: int, decoder):
    """An example's first reference, parsed like an answer; a reference that does not parse is named."""
    if task == "detect":
        parsed = parse_detections(text, width, height)
        if parsed.dropped:
            raise ValueError(f"{name}: {parsed.dropped} malformed piece(s) in the reference {text[:80]!r} (expected "
                             "four <loc> tokens and a label per object, separated by ' ; ')")
        return parsed
    from .segmentation import parse_segmentations
    parsed = parse_segmentations(text, width, height, decoder)
    if not parsed or parsed.dropped or not parsed[0].mask.any():
        why = "; ".join(parsed.reasons) or ("no object" if not parsed else "its mask decodes to no pixel")
        raise ValueError(f"{name}: the reference {text[:80]!r} is no segmentation answer ({why})")
    return parsed


def parse_references(task: str, references: list[list[str]], names: list[str], sizes, decoder=None,
                     masks=None) -> list:
    """Each example's first reference as boxes (detect) or segments (segment); one that does not parse is
    named. masks: per example its mask files' objects (mask_files.MaskObject, read here) or None (its text)."""
    if task == "segment" and decoder is None:
        raise ValueError(f"a segmentation set needs --vae PATH: {VAE_HELP}")
    masks = masks or [None] * len(names)
    return [reference_segments(m) if m else _reference(task, r[0], n, w, h, decoder)
            for r, n, (w, h), m in zip(references, names, sizes, masks)]


def score_split(task: str, predictions: list[str], references: list[list[str]], names: list[str],
                sizes=None, loc_probs=None, decoder=None, masks=None) -> tuple[dict, list, list]:
    """-> (metrics, parsed predictions, parsed references), one entry per example (parsed: None for
    text tasks). sizes: (width, height) per image (detect, segment); loc_probs: per example the
    probability of each <loc> of its answer (detect; None: every box scores 1.0); decoder: a
    MaskDecoder (segment); masks: per example its reference mask files (Example.masks) or None."""
    stats, preds, refs = measure_split(task, predictions, references, names, sizes, loc_probs, decoder, masks)
    return stats.scores, preds, refs


def measure_split(task: str, predictions: list[str], references: list[list[str]], names: list[str],
                  sizes=None, loc_probs=None, decoder=None, masks=None) -> tuple:
    """score_split, with the per-item statistics its metrics come from (resampling.Statistics: .scores are
    the metrics; resampling.intervals / paired resample them) -> (statistics, parsed predictions, parsed references)."""
    from .resampling import statistics
    n = len(predictions)
    if task in ("answer", "ocr", "exact"):
        if task == "exact":
            items = {"exact match": (list(map(exact_match, predictions, references)), [1] * n)}
        else:
            items = (answer_items if task == "answer" else ocr_items)(predictions, references)
        scores = scores_of(items) if n else {"exact match": None}
        return statistics(scores, items, references), [None] * n, [None] * n
    if task not in ("detect", "segment"):
        raise ValueError(f"score_split: no metric for task {task!r}")
    refs = parse_references(task, references, names, sizes, decoder, masks)
    if task == "detect":
        loc_probs = loc_probs or [None] * n
        preds = [parse_detections(p, w, h, lp) for p, (w, h), lp in zip(predictions, sizes, loc_probs)]
        matches = class_matches(preds, refs)
        stats = statistics(average_precision_of(matches), {}, references, matches)
    else:
        from .segmentation import parse_segmentations, segmentation_items
        preds = [parse_segmentations(p, w, h, decoder) for p, (w, h) in zip(predictions, sizes)]
        items, invalid = segmentation_items(preds, [(r[0].box, r[0].mask) for r in refs])
        stats = statistics({**scores_of(items), "invalid": invalid, "total": n}, items, references)
    stats.scores["dropped"] = sum(p.dropped for p in preds)
    return stats, preds, refs


def score_texts(task: str, predictions: list[str], references: list[list[str]], sizes=None, loc_probs=None,
                decoder=None, masks=None) -> dict:
    """Generated texts scored as `task`, one entry per example (train.py's validation): score_split with
    every image at `sizes` or 1 x 1 (IoU does not change when both axes are scaled, so detection scores do
    not depend on it; masks are placed at their image's size, which segment needs); captions by their metrics."""
    if task not in ("detect", "answer", "ocr", "segment"):
        from .registry import score
        return score(task, predictions, references)
    return measure_texts(task, predictions, references, sizes, loc_probs, decoder, masks).scores


def measure_texts(task: str, predictions: list[str], references: list[list[str]], sizes=None, loc_probs=None,
                  decoder=None, masks=None):
    """score_texts of a detection / question / OCR / segmentation set, as measure_split's Statistics
    (.scores: the metrics)."""
    n = len(predictions)
    return measure_split(task, predictions, references, [str(i) for i in range(n)], sizes or [(1, 1)] * n,
                         loc_probs, decoder, masks)[0]


def row_fields(task: str, parsed) -> dict:
    """What predictions.jsonl adds to a row: the parsed boxes (pixels x0, y0, x1, y1) with their scores,
    or the segments with their mask's pixel count, and the number of malformed pieces dropped."""
    if parsed is None:
        return {}
    if task == "detect":
        return dict(boxes=[dict(label=d.label, box=list(d.box), score=d.score) for d in parsed], dropped=parsed.dropped)
    return dict(segments=[dict(label=s.label, box=list(s.box), pixels=int(s.mask.sum())) for s in parsed],
                dropped=parsed.dropped, reasons=parsed.reasons)


def draw_split(folder: Path, task: str, images: list, predictions: list, references: list):
    """Each image with its predicted boxes (and the reference's, in white) or masks, as folder/<name>.png
    (written whole: a file is there complete or not at all); named as the caption command names its
    drawings (readout.drawing_paths: images of one name get a number, an input is never written over)."""
    from ..atomic import atomic_file
    from .readout import drawing_paths
    from .segmentation import draw_segmentations
    for path, out, pred, ref in zip(images, drawing_paths(images, folder), predictions, references):
        with Image.open(path) as im:
            picture = draw(im, pred, ref) if task == "detect" else draw_segmentations(im, pred)
        with atomic_file(out, "wb") as f:
            picture.save(f, "PNG")
