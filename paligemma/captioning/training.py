"""The pieces of train.py's steps, small enough to test one by one: the learning-rate schedule, batches
and their labels, what trains, the loss of one optimizer step over micro-batches, and the checks that
make the study's failures loud. The run folder (checkpoints, exports, logs) is run_folder.py."""
import dataclasses
import math
import random
import warnings
from pathlib import Path

import torch

from ..processor import IGNORE
from .data import sample_caption
from .distributed import global_sum, shard


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
        if batch_size > len(examples):  # every batch would silently be the whole, smaller split
            raise ValueError(f"--batch-size {batch_size} is larger than the train split ({len(examples)} examples): "
                             f"use --batch-size {len(examples)} or less (or --grad-accum for a larger step)")
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
    """Each example under its own prefix (`prompt` where it has none), labels on its suffix only.
    Captions are drawn for the whole global batch, so every rank's rng stays in step; then each rank
    keeps its slice."""
    captions = [sample_caption(e, rng, first_only) for e in examples]
    examples, captions = shard(examples, rank, world), shard(captions, rank, world)
    prompts = [prompt if e.prefix is None else e.prefix for e in examples]
    batch = processor([e.image for e in examples], prompts, captions, max_length=max_length)
    check_labels(batch, examples)
    return batch


def check_prefixes_fit(processor, splits: dict, prompt: str, max_length: int | None, data):
    """--max-length must leave every row's prefix (image tokens, <bos>, prompt, \\n) room for one suffix token,
    or that row fails (or trains on nothing) only when its batch comes up, hours in, and again on --resume.
    So every split is checked when it is loaded; the first row that does not fit is named by file:line.
    `splits`: name -> Examples, `data`: the --data they were read from."""
    if max_length is None:
        return
    need = {}  # prompt -> prefix tokens + 1 (prompts repeat: a caption set has one)
    for examples in splits.values():
        for e in examples:
            p = prompt if e.prefix is None else e.prefix
            if p not in need:
                need[p] = len(processor.prefix_ids(p)) + 1
    longest = max(need.values(), default=0)
    if longest <= max_length:
        return
    from .data import DataError
    for split, examples in splits.items():
        bad = [e for e in examples if need[prompt if e.prefix is None else e.prefix] > max_length]
        if bad:
            p = prompt if bad[0].prefix is None else bad[0].prefix
            raise DataError(f"{row_line(data, bad[0])}: prefix {p!r} takes {need[p] - 1} tokens "
                            f"({processor.num_image_tokens} image tokens, <bos>, the prompt and \\n): with one suffix "
                            f"token it does not fit --max-length {max_length} ({len(bad)} {split} rows do not); use "
                            f"--max-length {longest} or more")


def row_line(data, example) -> str:
    """"file:line" of the row `example` was read from. An Example does not keep it; its split, prefix and
    image name one row (data.check_unique), the image as the row's path under the image folder (the
    longest such path, should one row's name end another's)."""
    from .data import read_rows, split_of
    path = Path(data) / "captions.csv" if Path(data).is_dir() else Path(data)
    image, found = Path(example.image).parts, {}
    for line, row in read_rows(path):
        name, prefix = row.get("image"), row.get("prefix")
        parts = Path(name).parts if isinstance(name, str) and name else ()
        if (parts and image[-len(parts):] == parts and split_of(row) == example.split
                and (prefix.strip() if isinstance(prefix, str) else None) == example.prefix):
            found[len(parts)] = line
    return f"{path}:{found[max(found)]}" if found else f"{path} (image {example.image})"


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
def shuffled_image_losses(model, batch: dict) -> tuple[float, float]:
    """(loss with each caption's own image, loss with the images rolled across the batch). A decoder that
    ignores the image shows no gap. (probe.image_ablation measures something else: each caption token's
    log-probability with the image features zeroed.)"""
    own = model.loss(**batch).item()
    shuffled = dict(batch, pixel_values=batch["pixel_values"].roll(1, dims=0))
    return own, model.loss(**shuffled).item()


def make_trainable(model, full: bool, *, lora_targets="all", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                   rslora: bool = False, train_modules=(), freeze=()):
    """Full fine-tuning: every weight but the modules named in `freeze` (--freeze), in float32 master
    copies (autocast computes in bf16). LoRA: the adapter layers named by `lora_targets` (--lora), plus
    whole `train_modules` (--train-modules), in float32; the rest stays frozen."""
    import lora
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
        for name in freeze:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"--freeze {name}: no such module (e.g. vision_tower, multi_modal_projector, "
                                 "language_model.model.layers.0)") from None
            module.requires_grad_(False)
        model.float()
        return
    try:
        lora.inject(model, lora_targets, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
    except ValueError as e:
        raise ValueError(f"--lora {lora_targets!r}: {e}") from None
    try:
        lora.train_modules(model, list(train_modules))
    except ValueError as e:
        raise ValueError(f"--train-modules: {e}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trainable_state(model, full: bool) -> dict:
    """Full fine-tuning: every weight; otherwise only what trains (LoRA and any unfrozen modules)."""
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if full or k in trains}


def accumulate(par, precision, micro_batches: list[dict], device) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches (gradients summed in the parameters);
    returns the step's loss and the tokens it read (all ranks). It is a sum over label tokens divided by their count over every micro-batch
    and rank, so that k micro-batches of b give the step that one batch of k x b would (micro-batches
    differ in length; dividing each by its own count would weight their tokens unequally)."""
    n_labels = global_sum(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches), device)
    loss_sum, tokens = 0.0, 0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with par.no_sync(last_micro_batch=i == len(micro_batches) - 1), precision.autocast():
            loss = par.wrapped(**batch) * par.world / n_labels  # x world: DDP averages gradients over ranks
        precision.backward(loss)
        loss_sum += loss.item() / par.world
        tokens += int(batch["attention_mask"].sum()) * par.world
    return global_sum(loss_sum, device), tokens


def check_step(step: int, loss: float, grad_norm, stepped: bool, precision, checkpoint: Path):
    """A diverged run stops with the step named (the last good checkpoint kept); under fp16 a skipped step
    is the loss scaler's business (counted in its metrics), not an error."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"step {step}: non-finite loss ({loss}); last good checkpoint: {checkpoint}")
    if not stepped and precision.mode != "fp16":
        raise FloatingPointError(f"step {step}: non-finite gradient norm ({float(grad_norm)}); last good "
                                 f"checkpoint: {checkpoint}")
