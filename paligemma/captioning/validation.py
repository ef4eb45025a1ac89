"""Validation during training, and the model it keeps.

Every --eval-every steps train.py measures, on fixed validation examples:
  - the loss with each caption's own image and with images rolled across the batch (the gap says
    whether the decoder reads the image at all);
  - captions of a fixed sample (--val-captions images, spread over the split), scored with CIDEr-D
    and BLEU-4 (metrics.py). The best CIDEr-D so far picks OUT/best; --early-stop N ends the run after
    N evaluations without a better one. A run of another task (its rows' prefixes say which:
    tasks/registry.py) generates its answers the same way and is scored by that task's metrics, its
    own metric picking OUT/best (mAP@0.5 for detection, VQA accuracy for questions, ANLS for OCR, mean
    mask IoU for segmentation).
Captions, not the loss, pick the model: the validation loss keeps falling while the captions stop
improving or degrade (repetition), and the study this project answers judged its models by eye.
"""
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .run_folder import export
from .training import collate, shuffled_image_losses

MAX_NEW_TOKENS = 24


def spread(examples: list, n: int) -> list:
    """n examples evenly spaced over the split, not its first rows (which are often one scene type)."""
    return examples[::max(1, len(examples) // n)][:n] if n else []


def caption_and_score(model, processor, examples, prompt: str, batch_size: int = 32, with_meteor: bool = False,
                      task: str = "caption", max_new_tokens: int = MAX_NEW_TOKENS, decoder=None):
    """(scores, health, predictions, statistics) of greedy answers for `examples`, each under its own prefix
    (or `prompt`), scored as `task`; a detection box scores the model's mean probability of its four <loc>
    tokens (tasks/confidence.py), as evaluate.py ranks them; masks (decoder: the VQ-VAE's MaskDecoder) are
    placed at each image's size and scored against its mask files where the rows have them, as evaluate.py
    scores them. Predictions are keyed by image path, and by image path and prefix where an image has
    several rows (VQA's questions). statistics: a task's per-item statistics, for its intervals
    (tasks/resampling.py; None for captions, which the Scorer measures from the predictions)."""
    from ..inference import caption
    from ..tasks.evaluation import image_sizes, measure_texts
    from .metrics import health, score_all
    model.eval()
    prompts = [prompt if e.prefix is None else e.prefix for e in examples]
    detect = task == "detect"
    out = list(caption(model, processor, [e.image for e in examples], prompts[0] if len(set(prompts)) == 1 else prompts,
                       batch_size, max_new_tokens=max_new_tokens, **({"loc_scores": True} if detect else {})))
    texts, loc_probs = ([t for t, _ in out], [p for _, p in out]) if detect else (out, None)
    keys = row_keys(examples)
    preds, refs = dict(zip(keys, texts)), {k: e.captions for k, e in zip(keys, examples)}
    if task == "caption":
        return score_all(preds, refs, with_meteor=with_meteor), health(preds, refs), preds, None
    segment = task == "segment"
    stats = measure_texts(task, texts, [e.captions for e in examples],
                          image_sizes([e.image for e in examples]) if segment else None, loc_probs,
                          decoder, [e.masks for e in examples] if segment else None)
    return flat(stats.scores), health(preds, refs), preds, stats


def row_keys(examples) -> list[str]:
    """One key per row for predictions and references: the image path, or "image | prefix" where an image
    has several rows (VQA's questions, question generation), so that no row is scored under another's key."""
    keys = [str(e.image) for e in examples]
    if len(set(keys)) < len(keys):
        keys = [f"{e.image} | {e.prefix}" for e in examples]
    return keys


def flat(scores: dict) -> dict:
    """Scores as one level of numbers for tables and logs: {"per_class": {"plane": {"AP@0.5": ..}}} ->
    {"AP@0.5 plane": ..}; None (no reference to score against) -> nan."""
    out = {}
    for k, v in scores.items():
        if k == "per_class":
            out.update({f"{m} {label}": float(x) for label, c in v.items() for m, x in c.items() if m.startswith("AP")})
        else:
            out[k] = float("nan") if v is None else v
    return out


def answer_budget(processor, examples, task: str) -> int:
    """New tokens to generate: captions keep MAX_NEW_TOKENS; other tasks' answers (a detection's four
    <loc> tokens and a label per object) get their longest training reference plus 8."""
    if task == "caption":
        return MAX_NEW_TOKENS
    return max(len(processor.tokenizer.encode(c)) for e in examples for c in e.captions) + 8


class Validation:
    """The fixed validation sets of one run, and what one evaluation measures on them."""

    def __init__(self, processor, val: list, prompt: str, batch_size: int, n_captions: int, max_length=None,
                 task: str = "caption", max_new_tokens: int = MAX_NEW_TOKENS, decoder=None):
        from ..tasks.evaluation import VAE_HELP
        from ..tasks.registry import METRICS
        if task == "segment" and decoder is None:  # its answers are scored as masks
            raise ValueError(f"train.py scores a segment set by its masks: pass --vae PATH ({VAE_HELP})")
        self.processor, self.prompt, self.batch_size = processor, prompt, batch_size
        self.task, self.max_new_tokens, self.decoder = task, max_new_tokens, decoder
        self.metric = METRICS[task][1]  # what picks OUT/best: CIDEr-D, mAP@0.5, miou, ...
        self.key = f"val_{self.metric}"
        self.second = {"caption": "BLEU-4", "detect": "mAP", "answer": "exact match", "ocr": "CER",
                       "segment": "boxacc/0.5"}.get(task)
        loss_examples = spread(val, batch_size)
        self.loss_batch = collate(processor, loss_examples, prompt, random.Random(0), True, max_length)
        self.captioned = spread(val, n_captions)

    @torch.no_grad()
    def __call__(self, model, amp: dict, step: int, rank: int = 0) -> dict:
        """One evaluation; every rank that generates must call it (FSDP), rank 0 prints."""
        model.eval()
        with torch.autocast(**amp):
            own, shuffled = shuffled_image_losses(model, {k: v.to(model.device) for k, v in self.loss_batch.items()})
        record = dict(val_loss=own, val_loss_shuffled_images=shuffled, image_gap=shuffled - own)
        preds = {}
        if self.captioned:
            t0 = time.time()
            scores, _, preds, _ = caption_and_score(model, self.processor, self.captioned, self.prompt, self.batch_size,
                                                    task=self.task, max_new_tokens=self.max_new_tokens,
                                                    decoder=self.decoder)
            record[self.key] = scores[self.metric]
            if self.second in scores:
                record[f"val_{self.second}"] = scores[self.second]
            record["val_caption_s"] = time.time() - t0  # its cost, to weigh against training time
        if rank == 0:
            gap = record["image_gap"]
            second = f", {self.second} {record['val_' + self.second]:.3f}" if f"val_{self.second}" in record else ""
            scored = (f"; {len(self.captioned)} captions ({record['val_caption_s']:.1f} s): {self.metric} "
                      f"{record[self.key]:.3f}{second}") if preds else ""
            tqdm.write(f"step {step}: val loss {own:.3f}, with shuffled images {shuffled:.3f} (gap {gap:+.3f}"
                       f"{'  <- the decoder is NOT using the image' if gap < 0.02 else ''}){scored}")
            for (k, p), e in list(zip(preds.items(), self.captioned))[:3]:
                tqdm.write(f"  {e.image.name}: {p!r}  | ref: {e.captions[0]!r}")
        return record


@dataclasses.dataclass
class Best:
    """The best validation score so far (CIDEr-D, or the task's metric), and early stopping. Saved in the
    checkpoint (state())."""
    patience: int | None = None  # --early-stop: evaluations without improvement before stopping
    step: int = 0  # 0: no evaluation yet
    score: float = -math.inf
    stale: int = 0  # evaluations since the best

    def update(self, step: int, score: float) -> bool:
        """True when `score` beats the best so far (strictly: a tie keeps the earlier, cheaper model). A resumed
        run replays the steps after its checkpoint; one at or before the best step (an OUT/best written after
        the checkpoint, load()) measures the best model again, or an older one: no evaluation since the best."""
        if score > self.score:
            self.step, self.score, self.stale = step, score, 0
            return True
        if step > self.step:
            self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state(self) -> dict:
        return {"step": self.step, "score": self.score, "stale": self.stale}

    def load(self, state: dict, best_json: Path | None = None):
        """The tracker as checkpointed. A run killed after its checkpoint may have written a better OUT/best
        since (best.json): that one stays the best, so OUT/best and the tracker never disagree, and none of
        the evaluations the checkpoint counted came after it (stale 0)."""
        self.step, self.score, self.stale = state["step"], state["score"], state["stale"]
        if best_json is not None and best_json.exists():
            kept = json.loads(best_json.read_text())
            key = kept.get("selected_by", "val_CIDEr-D")
            if kept.get(key, -math.inf) > self.score:
                self.step, self.score, self.stale = kept["step"], kept[key], 0


def save_best(folder: Path, model, full: bool, base: str, step: int, record: dict, state: dict | None = None,
              selected_by: str = "val_CIDEr-D"):
    """OUT/best: the adapter (or model + tokenizer) of the best step and best.json, swapped in whole."""
    from ..atomic import atomic_dir
    with atomic_dir(folder) as tmp:
        export(model, full, base, tmp, state)
        scores = {k: v for k, v in record.items() if k.startswith("val_") or k == "image_gap"}
        (tmp / "best.json").write_text(json.dumps({"step": step, "selected_by": selected_by, **scores}, indent=2))


def draw_answers(task: str, examples, predictions: list[str], path: Path, decoder=None, n: int = 4) -> Path:
    """The first `n` examples side by side, each image (enlarged) with what its answer says: detect, its
    predicted boxes (a colour and label per class) and its first reference's in thin white (tasks.draw);
    segment, its predicted masks tinted in, their boxes and labels (tasks.draw_segmentations, decoder: the
    VQ-VAE's MaskDecoder). One PNG."""
    from PIL import Image
    from ..tasks.boxes import draw, parse_detections
    from ..tasks.segmentation import draw_segmentations, parse_segmentations
    tiles = []
    for e, text in list(zip(examples, predictions))[:n]:
        with Image.open(e.image) as im:
            w, h = im.size
            tiles.append(draw(im, parse_detections(text, w, h), parse_detections(e.captions[0], w, h))
                         if task == "detect" else draw_segmentations(im, parse_segmentations(text, w, h, decoder)))
    return _strip(tiles, path)


def _strip(tiles: list, path: Path) -> Path:
    """Pictures side by side on grey, 4 px apart, written whole to `path`."""
    from PIL import Image
    from ..atomic import atomic_file
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)), "gray")
    for i, t in enumerate(tiles):
        strip.paste(t, (sum(x.width + 4 for x in tiles[:i]), 0))
    with atomic_file(path, "wb") as f:
        strip.save(f, format="PNG")
    return path
