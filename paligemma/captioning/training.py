"""The pieces train.py is made of, small enough to test one by one."""
import dataclasses
import json
import math
import os
import random
import warnings
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..processor import IGNORE
from .data import sample_caption
from .distributed import shard


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_ratio * lr` at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Batches:
    """Shuffled batches, epoch after epoch, with a position that a checkpoint can restore.

    The order of epoch e is a permutation seeded by (seed, e), so resuming needs only (epoch, index).
    """

    def __init__(self, examples, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.index = 0, 0

    def order(self):
        perm = list(range(len(self.examples)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(perm)
        return perm

    def next(self):
        order = self.order()
        if self.index + self.batch_size > len(order):  # drop the ragged tail: every batch has the same size
            self.epoch, self.index = self.epoch + 1, 0
            order = self.order()
        batch = [self.examples[i] for i in order[self.index:self.index + self.batch_size]]
        self.index += self.batch_size
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict):
        self.epoch, self.index = state["epoch"], state["index"]


def collate(processor, examples, prompt: str, rng: random.Random, first_only=False, max_length=None,
            rank: int = 0, world: int = 1) -> dict:
    """Captions are drawn for the whole global batch, so every rank's rng stays in step; then each rank
    keeps its slice."""
    captions = [sample_caption(e, rng, first_only) for e in examples]
    examples, captions = shard(examples, rank, world), shard(captions, rank, world)
    batch = processor([e.image for e in examples], [prompt] * len(examples), captions, max_length=max_length)
    check_labels(batch, examples)
    return batch


def blind(examples, seed: int) -> list:
    """The image-blind control: the same captions, each paired with another example's image."""
    images = [e.image for e in examples]
    random.Random(seed).shuffle(images)
    return [dataclasses.replace(e, image=im) for e, im in zip(examples, images)]


def check_labels(batch: dict, examples=None):
    """Every example must keep at least one label token, or it trains on nothing (and a batch of such
    examples gives a NaN loss)."""
    n = (batch["labels"] != IGNORE).sum(1)
    bad = [i for i, k in enumerate(n.tolist()) if k == 0]
    if bad:
        names = [str(examples[i].image) if examples else str(i) for i in bad]
        raise ValueError(f"examples {names} have no unmasked label token (suffix empty or truncated away)")


def first_loss_check(loss: float, vocab_size: int, pretrained: bool) -> str:
    """The study sat at 11.57 ~ ln(257,216): a pretrained model that starts there is not being used."""
    uniform = math.log(vocab_size)
    msg = f"first batch loss {loss:.3f} (uniform over {vocab_size:,} tokens would be {uniform:.3f})"
    if pretrained and loss > 0.9 * uniform:
        msg += ("\nWARNING: a pretrained PaliGemma should start far below ln(vocab). Check the prompt layout, "
                "the label masking and that the checkpoint actually loaded.")
        warnings.warn(msg)
    return msg


@torch.no_grad()
def image_reliance(model, batch: dict) -> tuple[float, float]:
    """Loss with each caption's own image vs with images rolled across the batch.
    A decoder that ignores the image shows no gap."""
    own = model.loss(**batch).item()
    shuffled = dict(batch, pixel_values=batch["pixel_values"].roll(1, dims=0))
    return own, model.loss(**shuffled).item()


def trainable_state(model, full: bool) -> dict:
    """Full fine-tuning: every weight; otherwise only what trains (LoRA and any unfrozen modules)."""
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if full or k in trains}


def save_train_state(directory, model, optimizer, step: int, batches: Batches, rng: random.Random, full: bool,
                    args: dict, states: tuple[dict, dict] | None = None):
    """Everything needed to continue exactly: weights that train, optimizer, step, data position, RNGs.
    Written to a temp folder and renamed, so `directory` is always a whole checkpoint. `states`:
    (model, optimizer) state already gathered from shards (FSDP)."""
    model_state, optimizer_state = states or (trainable_state(model, full), optimizer.state_dict())
    with atomic_dir(directory) as tmp:
        torch.save({"model": model_state, "optimizer": optimizer_state, "step": step,
                    "data": batches.state(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                    "args": args}, tmp / "state.pt")
        if not full:
            import lora
            lora.save(model, tmp / "adapter", base_model_name_or_path=args.get("model"))
        (tmp / "step.json").write_text(json.dumps({"step": step}))


def load_train_state(directory, model, optimizer, batches: Batches, rng: random.Random, sharded=None) -> int:
    """Restore what save_train_state wrote; `sharded`: the FSDP-wrapped model, whose shards are filled
    from the whole state."""
    state = torch.load(Path(directory) / "state.pt", weights_only=False)
    missing = set(state["model"]) - set(model.state_dict())
    if missing:
        raise ValueError(f"{directory}: checkpoint has weights this model lacks: {sorted(missing)[:5]}")
    if sharded is not None:
        from .distributed import load_full_state
        load_full_state(sharded, optimizer, state["model"], state["optimizer"])
    else:
        current = model.state_dict()
        with torch.no_grad():
            for k, v in state["model"].items():  # only the trained subset is stored
                current[k].copy_(v)
        optimizer.load_state_dict(state["optimizer"])
    batches.load(state["data"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def wandb_run(project: str | None, config: dict, rank: int):
    """A W&B run on rank 0 when --wandb is given; None otherwise."""
    if not project or rank:
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=project, config=config)


def append_jsonl(path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
