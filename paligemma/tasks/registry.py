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


def names_task(prompt: str) -> bool:
    """Whether the prompt's first word is one of PaliGemma's task prefixes."""
    words = prompt.split() if isinstance(prompt, str) else []
    return bool(words) and words[0].lower() in FIRST_WORD


def task_of_rows(prefixes, prompt: str, names) -> str:
    """The one task of a set of rows: task_of of each row's prefix, or of the run's `prompt` for rows
    without one (prefix None). Rows without a prefix under a prompt that names no task ("rsicd caption")
    are captions, as every run was before rows had prompts. Rows of two tasks are refused, naming an
    example of each (names: each row's image): one metric scores a run and picks its best model."""
    free = not names_task(prompt)
    first = {}  # task -> (the first row asking for it, its prompt)
    for prefix, name in zip(prefixes, names):
        if prefix is None and free:
            task = "caption"
        else:
            try:
                task = task_of(prompt if prefix is None else prefix)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        first.setdefault(task, (name, prompt if prefix is None else prefix))
    if len(first) > 1:
        raise ValueError(f"rows of {len(first)} tasks: " + ", ".join(f"{t} (e.g. {n}: {p!r})" for t, (n, p) in first.items()))
    return next(iter(first), "caption")


def score_captions(predictions: list[str], references: list[list[str]], with_meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (captioning/metrics.py), over lists instead of dicts."""
    from ..captioning.metrics import score_all
    return score_all(dict(enumerate(predictions)), dict(enumerate(references)), with_meteor=with_meteor)


def score_detections(predictions, references) -> dict:
    """Per image [(label, box[, score])] against [(label, box)]: mAP@0.5, mAP@[.5:.95], per class."""
    from .average_precision import average_precision
    return average_precision(predictions, references)


def score_segments(predictions, references) -> dict:
    """Per image its parsed answer [Segmentation] against (box, mask) of the reference object: mIoU, box accuracy."""
    from .segmentation import score_segmentations
    return score_segmentations(predictions, references)


# task -> (function(predictions, references) -> {name: value}, the key that picks the best model). Boxes and
# masks are scored parsed (evaluation.score_split parses them: masks need the VQ-VAE decoder).
METRICS = {
    "caption": (score_captions, "CIDEr-D"),
    "detect": (score_detections, "mAP@0.5"),
    "answer": (score_answers, "VQA accuracy"),
    "ocr": (score_ocr, "ANLS"),
    "segment": (score_segments, "miou"),
}


def score(task: str, predictions, references) -> dict:
    """Scores of `task` (one of TASKS); predictions and references one entry per example, in order."""
    if task not in METRICS:
        raise ValueError(f"no metric for task {task!r}; scored tasks: {sorted(METRICS)}")
    return METRICS[task][0](predictions, references)

