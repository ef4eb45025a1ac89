"""Validation during training, and the model it keeps.

Every --eval-every steps train.py measures, on fixed validation examples:
  - the loss with each caption's own image and with images rolled across the batch (the gap says
    whether the decoder reads the image at all);
  - captions of a fixed sample (--val-captions images, spread over the split), scored with CIDEr-D
    and BLEU-4 (metrics.py). The best CIDEr-D so far picks OUT/best; --early-stop N ends the run after
    N evaluations without a better one.
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


def caption_and_score(model, processor, examples, prompt: str, batch_size: int = 32, with_meteor: bool = False):
    """(scores, health, predictions) of greedy captions for `examples`."""
    from ..inference import caption
    from .metrics import health, score_all
    model.eval()
    texts = caption(model, processor, [e.image for e in examples], prompt, batch_size, max_new_tokens=MAX_NEW_TOKENS)
    preds = {str(e.image): c for e, c in zip(examples, texts)}
    refs = {str(e.image): e.captions for e in examples}
    return score_all(preds, refs, with_meteor=with_meteor), health(preds, refs), preds


class Validation:
    """The fixed validation sets of one run, and what one evaluation measures on them."""

    def __init__(self, processor, val: list, prompt: str, batch_size: int, n_captions: int, max_length=None):
        self.processor, self.prompt, self.batch_size = processor, prompt, batch_size
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
            scores, _, preds = caption_and_score(model, self.processor, self.captioned, self.prompt, self.batch_size)
            record.update({"val_CIDEr-D": scores["CIDEr-D"], "val_BLEU-4": scores["BLEU-4"],
                           "val_caption_s": time.time() - t0})  # its cost, to weigh against training time
        if rank == 0:
            gap = record["image_gap"]
            scored = (f"; {len(self.captioned)} captions ({record['val_caption_s']:.1f} s): CIDEr-D "
                      f"{record['val_CIDEr-D']:.3f}, BLEU-4 {record['val_BLEU-4']:.3f}") if preds else ""
            tqdm.write(f"step {step}: val loss {own:.3f}, with shuffled images {shuffled:.3f} (gap {gap:+.3f}"
                       f"{'  <- the decoder is NOT using the image' if gap < 0.02 else ''}){scored}")
            for e in self.captioned[:3]:
                tqdm.write(f"  {e.image.name}: {preds[str(e.image)]!r}  | ref: {e.captions[0]!r}")
        return record


@dataclasses.dataclass
class Best:
    """The best validation CIDEr-D so far, and early stopping. Saved in the checkpoint (state())."""
    patience: int | None = None  # --early-stop: evaluations without improvement before stopping
    step: int = 0  # 0: no evaluation yet
    score: float = -math.inf
    stale: int = 0  # evaluations since the best

    def update(self, step: int, score: float) -> bool:
        """True when `score` beats the best so far (strictly: a tie keeps the earlier, cheaper model)."""
        if score > self.score:
            self.step, self.score, self.stale = step, score, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state(self) -> dict:
        return {"step": self.step, "score": self.score, "stale": self.stale}

    def load(self, state: dict, best_json: Path | None = None):
        """The tracker as checkpointed. A run killed after its checkpoint may have written a better OUT/best
        since (best.json): that one stays the best, so OUT/best and the tracker never disagree."""
        self.step, self.score, self.stale = state["step"], state["score"], state["stale"]
        if best_json is not None and best_json.exists():
            kept = json.loads(best_json.read_text())
            if kept.get("val_CIDEr-D", -math.inf) > self.score:
                self.step, self.score = kept["step"], kept["val_CIDEr-D"]


def save_best(folder: Path, model, full: bool, base: str, step: int, record: dict, state: dict | None = None):
    """OUT/best: the adapter (or model + tokenizer) of the best step and best.json, swapped in whole."""
    from ..atomic import atomic_dir
    with atomic_dir(folder) as tmp:
        export(model, full, base, tmp, state)
        scores = {k: v for k, v in record.items() if k.startswith("val_") or k == "image_gap"}
        (tmp / "best.json").write_text(json.dumps({"step": step, "selected_by": "val_CIDEr-D", **scores}, indent=2))
