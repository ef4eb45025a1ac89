"""The pieces train.py is made of, small enough to test one by one."""
import dataclasses
import json
import math
import os
import pickle
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


def make_trainable(model, full: bool, args):
    """Full fine-tuning: every weight, in float32 master copies (autocast computes in bf16). LoRA: the
    adapter layers named by --lora, plus any --train-modules, in float32; the rest stays frozen."""
    import lora
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
        model.float()
        return
    try:
        lora.inject(model, args.lora, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    rslora=args.rslora)
    except ValueError as e:
        raise ValueError(f"--lora {args.lora!r}: {e}") from None
    try:
        lora.train_modules(model, args.train_modules)
    except ValueError as e:
        raise ValueError(f"--train-modules: {e}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trainable_state(model, full: bool) -> dict:
    """Full fine-tuning: every weight; otherwise only what trains (LoRA and any unfrozen modules)."""
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if full or k in trains}


class ResumeError(ValueError):
    """A run folder that --resume cannot continue, or that a new run would overwrite."""


# Settings that change what a checkpoint's weights, optimizer state and data position mean: a resumed
# run must use the saved ones. (--steps, --lr, --eval-every, --save-every, --device ... may change.)
MUST_MATCH = ("model", "data", "prompt", "finetune", "lora", "lora_r", "lora_alpha", "lora_dropout", "rslora",
              "train_modules", "batch_size", "grad_accum", "seed", "first_caption_only", "max_length", "dtype",
              "blind", "overfit_batch")


def check_run_folder(out: Path, resume: bool):
    """Before a run reads or writes OUT: finish a checkpoint swap a kill interrupted (atomic.recover),
    then refuse --resume without a checkpoint (a typo in --out must not restart from step 0) and a new
    run over an existing checkpoint (its first save would replace it). Rank 0 only."""
    from ..atomic import recover
    checkpoint = recover(out / "checkpoint")
    recover(out / "best")
    state = checkpoint / "state.pt"
    if resume and not state.exists():
        raise ResumeError(f"--resume: {state} does not exist, nothing to resume (check --out, or drop --resume "
                          "to start a new run)")
    if not resume and state.exists():
        step = json.loads((checkpoint / "step.json").read_text())["step"] if (checkpoint / "step.json").exists() else "?"
        raise ResumeError(f"{out} already holds a run (checkpoint at step {step}): pass --resume to continue it, "
                          "or choose another --out")


def save_train_state(directory, model, optimizer, step: int, batches: Batches, rng: random.Random, full: bool,
                    args: dict, states: tuple[dict, dict] | None = None, extra: dict | None = None):
    """Everything needed to continue exactly: weights that train, optimizer, step, data position, RNGs,
    the settings, and `extra` (the best-model tracker). Only tensors and plain Python values, so that
    load_train_state reads it with torch.load(weights_only=True). Written to a temp folder and swapped
    in (atomic.py), so `directory` is always a whole checkpoint. `states`: (model, optimizer) state
    already gathered from shards (FSDP)."""
    model_state, optimizer_state = states or (trainable_state(model, full), optimizer.state_dict())
    with atomic_dir(directory) as tmp:
        torch.save({"model": model_state, "optimizer": optimizer_state, "step": step,
                    "data": batches.state(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                    "args": args, "extra": extra or {}}, tmp / "state.pt")
        if not full:
            import lora
            lora.save(model, tmp / "adapter", base_model_name_or_path=args.get("model"))
        (tmp / "step.json").write_text(json.dumps({"step": step}))


def read_train_state(directory) -> dict:
    """state.pt, unpickled with weights_only=True: tensors and plain values only, never code. A file this
    program did not write, or a damaged one, is refused by name."""
    path = Path(directory) / "state.pt"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise ResumeError(f"{path}: refused: it holds more than tensors and plain values, so it was not written by "
                          f"train.py and loading it could run code ({str(e).splitlines()[0]}). Run folder: "
                          f"{Path(directory).parent}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ResumeError(f"{path}: unreadable checkpoint, damaged or truncated ({str(e).splitlines()[0]}). "
                          f"Run folder: {Path(directory).parent}") from None
    want = {"model", "optimizer", "step", "data", "rng", "torch_rng", "args"}
    if not isinstance(state, dict) or not want <= set(state):
        raise ResumeError(f"{path}: not a train.py checkpoint (expected keys {sorted(want)})")
    return state


def check_same_data(saved: dict | None, current: dict, directory):
    """--resume on other rows than the checkpoint's would continue a different order without a word
    (the data position is an index into the rows): name what changed, per split. `saved`/`current`:
    split -> data.fingerprint. A checkpoint written before fingerprints were saved is not checked."""
    if not saved:
        return
    changes = []
    for split in sorted(set(saved) | set(current)):
        a, b = saved.get(split, []), current.get(split, [])
        if a == b:
            continue
        was, now, old = {n for n, _ in a}, {n for n, _ in b}, {(n, h) for n, h in a}
        added, removed = sorted(now - was), sorted(was - now)
        edited = sorted(n for n, h in b if n in was and (n, h) not in old)
        what = [f"{len(added)} rows added (e.g. {added[:3]})" if added else "",
                f"{len(removed)} rows removed (e.g. {removed[:3]})" if removed else "",
                f"captions changed on {len(edited)} rows (e.g. {edited[:3]})" if edited else ""]
        what = [w for w in what if w] or ["the same rows in another order"]
        changes.append(f"{split} split ({len(a)} -> {len(b)} rows): {', '.join(what)}")
    if changes:
        raise ResumeError(f"{directory}: --resume on other data than the checkpoint's: {'; '.join(changes)}. "
                          "Resume with the data it was trained on, or start a new run in another --out")


def check_settings(saved: dict, current: dict, directory):
    """--resume with other settings than the checkpoint's would continue a different run: name them."""
    def same(key):
        a, b = saved.get(key), current.get(key)
        if key in ("model", "data") and a and b and Path(a).exists() and Path(b).exists():
            return Path(a).resolve() == Path(b).resolve()  # the same folder spelt another way
        return a == b
    differ = [f"--{k.replace('_', '-')} {current.get(k)!r} (checkpoint: {saved.get(k)!r})"
              for k in MUST_MATCH if not same(k)]
    if differ:
        raise ResumeError(f"{directory}: --resume with other settings than the checkpoint's: {'; '.join(differ)}")


def load_train_state(directory, model, optimizer, batches: Batches, rng: random.Random, sharded=None,
                     args: dict | None = None) -> tuple[int, dict]:
    """Restore what save_train_state wrote; returns (step, extra). `sharded`: the FSDP-wrapped model,
    whose shards are filled from the whole state. `args`: the current settings, checked against the saved."""
    state = read_train_state(directory)
    if args is not None:
        check_settings(state["args"], args, directory)
    current = model.state_dict()
    unknown = sorted(set(state["model"]) - set(current))
    shapes = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(current[k].shape)}"
              for k, v in state["model"].items() if k in current and v.shape != current[k].shape]
    if unknown or shapes:
        raise ResumeError(f"{directory}: checkpoint does not fit this model: weights it lacks {unknown[:5]}, "
                          f"wrong shapes {shapes[:5]}")
    if sharded is not None:
        from .distributed import load_full_state
        load_full_state(sharded, optimizer, state["model"], state["optimizer"])
    else:
        with torch.no_grad():
            for k, v in state["model"].items():  # only the trained subset is stored
                current[k].copy_(v)
        optimizer.load_state_dict(state["optimizer"])
    batches.load(state["data"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state.get("extra", {})


def export(model, full: bool, base: str, folder: Path, state: dict | None = None):
    """What a user keeps: a hub-layout checkpoint + tokenizer (full), or a PEFT adapter (LoRA), in
    `folder`. `state`: the whole state gathered from FSDP shards."""
    import shutil
    import lora
    from ..weights import resolve
    if full:
        model.save_pretrained(folder, state_dict=state)
        shutil.copyfile(resolve(base) / "tokenizer.model", Path(folder) / "tokenizer.model")
    else:
        lora.save(model, folder, base_model_name_or_path=base)


def trim_log(log: Path, step: int):
    """A resumed run logs again the steps after its checkpoint: drop the first run's records of them."""
    if log.exists():
        from ..atomic import atomic_file
        keep = [l for l in log.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        with atomic_file(log) as f:
            f.write("".join(l + "\n" for l in keep))


def wandb_run(project: str | None, config: dict, rank: int, folder: Path | None = None):
    """A W&B run on rank 0 when --wandb is given; None otherwise. Its files go under `folder` (the run
    folder, OUT/wandb), not into the working directory."""
    if not project or rank:
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=project, config=config, dir=None if folder is None else str(folder))


def append_jsonl(path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
