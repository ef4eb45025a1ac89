"""Which task a prompt asks for, and the metric each task is scored by.

PaliGemma's prefixes (big_vision `configs/proj/paligemma/README.md`, the mix checkpoints' model
cards): `caption en`, `describe en`, `ocr`, `answer en <question>`, `question en <answer>`,
`detect a ; b`, `segment a`. The first word decides; anything else is an error that says so, so that
a typo in a prompt does not score a detection set with BLEU.
"""
from .answers import score_answers, score_ocr

TASKS = ("caption", "detect", "answer", "ocr", "segment")
FIRST_WORD = {"caption": "caption", "describe": "caption", "question": "caption", "detect": "detect",
              "answer": "answer", "ocr": "ocr", "segment": "segment"}


def task_of(prefix: str) -> str:
    """"detect plane ; ship" -> "detect"; "answer en how many?" -> "answer"; "caption es" -> "caption"."""
    words = prefix.split() if isinstance(prefix, str) else []
    if not words or words[0].lower() not in FIRST_WORD:
        raise ValueError(f"prefix {prefix!r}: cannot tell the task from its first word; PaliGemma's tasks start "
                         f"with one of {sorted(FIRST_WORD)} (or choose the metric explicitly)")
    return FIRST_WORD[words[0].lower()]


def score_captions(predictions: list[str], references: list[list[str]], with_meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (captioning/metrics.py), over lists instead of dicts."""
    from ..captioning.metrics import score_all
    return score_all(dict(enumerate(predictions)), dict(enumerate(references)), with_meteor=with_meteor)


def score_detections(predictions, references) -> dict:
    """Per image [(label, box[, score])] against [(label, box)]: mAP@0.5, mAP@[.5:.95], per class."""
    from .average_precision import average_precision
    return average_precision(predictions, references)


# task -> (function(predictions, references) -> {name: value}, the key that picks the best model).
# "segment" is filled in by segmentation.py (its masks need the VQ-VAE decoder).
METRICS = {
    "caption": (score_captions, "CIDEr-D"),
    "detect": (score_detections, "mAP@0.5"),
    "answer": (score_answers, "VQA accuracy"),
    "ocr": (score_ocr, "ANLS"),
}


def score(task: str, predictions, references) -> dict:
    """Scores of `task` (one of TASKS); predictions and references one entry per example, in order."""
    if task not in METRICS:
        raise ValueError(f"no metric for task {task!r}; scored tasks: {sorted(METRICS)}")
    return METRICS[task][0](predictions, references)


def score_texts(task: str, predictions: list[str], references: list[list[str]], sizes=None, loc_probs=None) -> dict:
    """Generated texts scored as `task`, one entry per example. Detection texts (predictions and each
    example's first reference) are parsed into boxes first; `sizes` [(width, height)] puts them in
    pixels (IoU does not change when both axes are scaled, so the scores do not depend on it) and
    `loc_probs` [per-<loc> probabilities] gives each predicted box its score (1.0 without it). The
    result says how many predicted pieces were malformed ("dropped")."""
    if task != "detect":
        return score(task, predictions, references)
    from .boxes import parse_detections
    sizes = sizes or [(1, 1)] * len(predictions)
    loc_probs = loc_probs or [None] * len(predictions)
    preds = [parse_detections(p, w, h, probs) for p, (w, h), probs in zip(predictions, sizes, loc_probs)]
    refs = [parse_detections(r[0], w, h) for r, (w, h) in zip(references, sizes)]
    return {**score("detect", preds, refs), "dropped": sum(p.dropped for p in preds)}
