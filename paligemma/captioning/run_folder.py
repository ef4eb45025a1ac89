"""The run folder OUT of train.py: one run per folder, checkpoints that resume exactly (and refuse what
they cannot continue), what a user keeps (the adapter or model), the metrics log and W&B.

    OUT/checkpoint/   state.pt (+ adapter/), step.json: the last save, for --resume (swapped in whole)
    OUT/best/         the best validation step's adapter or model, best.json (validation.py)
    OUT/adapter/ or OUT/final/, metrics.jsonl, loss.png
"""
import json
import os
import pickle
import random
import warnings
from pathlib import Path

import torch

from ..atomic import atomic_dir, named_full_disk
from .training import Batches, trainable_state


class ResumeError(ValueError):
    """A run folder that --resume cannot continue, or that a new run would overwrite."""


# Settings that change what a checkpoint's weights, optimizer state and data position mean: a resumed
# run must use the saved ones. (--steps, --lr, --eval-every, --save-every, --device ... may change.)
# weight_decay too: the optimizer state's param_groups would silently put the saved value back.
MUST_MATCH = ("model", "data", "prompt", "finetune", "lora", "lora_r", "lora_alpha", "lora_dropout", "rslora",
              "train_modules", "freeze", "batch_size", "grad_accum", "seed", "first_caption_only", "max_length",
              "dtype", "quantize", "weight_decay", "blind", "overfit_batch")


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
                    **cuda_rng_state(device_of(model)), "args": args, "extra": extra or {}}, tmp / "state.pt")
        if not full:
            import lora
            lora.save(model, tmp / "adapter", base_model_name_or_path=args.get("model"))
        (tmp / "step.json").write_text(json.dumps({"step": step}))


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def cuda_rng_state(device: torch.device) -> dict:
    """{"cuda_rng": the generator state of the model's GPU} on CUDA, where dropout draws its masks (the CPU
    generator does not); {} on other devices. Each DDP rank restores it into its own GPU's generator:
    equal shards draw equal amounts, so rank 0's state stands for every rank's."""
    return {"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}


def restore_cuda_rng(state: dict, device: torch.device):
    """The saved GPU generator, when there is one and the run is on a GPU now (a CPU checkpoint resumed on a
    GPU, or the reverse, --device being free to change, continues with the generator as it is)."""
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


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
    """--resume with other settings than the checkpoint's would continue a different run: name them. A
    setting a checkpoint does not hold (written before the flag existed) is not checked."""
    def same(key):
        a, b = saved.get(key), current.get(key)
        if key not in saved:
            return True
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
    restore_cuda_rng(state, device_of(model))
    return state["step"], state.get("extra", {})


def export(model, full: bool, base: str, folder: Path, state: dict | None = None):
    """What a user keeps: a hub-layout checkpoint + tokenizer (full), or a PEFT adapter (LoRA), in
    `folder`. `state`: the whole state gathered from FSDP shards. The model and its tokenizer are swapped
    in together: a model folder without its tokenizer cannot be loaded."""
    import shutil
    import lora
    from ..weights import resolve
    if full:
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            shutil.copyfile(resolve(base) / "tokenizer.model", tmp / "tokenizer.model")
    else:
        lora.save(model, folder, base_model_name_or_path=base)


class LogError(ValueError):
    """A metrics.jsonl line that is not a record, before its last line (so not a write cut short)."""


def read_log(log: Path) -> list[dict]:
    """metrics.jsonl's records. A last line that is not JSON is a write that a kill or a full disk cut
    short: it is left out, with a warning; a bad line before it is damage, named by file:line."""
    lines = Path(log).read_text().splitlines()
    last = max((i for i, l in enumerate(lines, 1) if l.strip()), default=0)
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < last:
                raise LogError(f"{log}:{i}: not a JSON record ({e}); the lines after it are whole, so this is no "
                               "interrupted write: repair or remove the line") from None
            warnings.warn(f"{log}:{i}: the last line is cut short (a write interrupted by a kill or a full disk): "
                          "left out")
    return records


def trim_log(log: Path, step: int):
    """A resumed run logs again the steps after its checkpoint: drop the first run's records of them (and a
    last line a kill cut short)."""
    if log.exists():
        from ..atomic import atomic_file
        keep = [r for r in read_log(log) if r.get("step", 0) <= step]
        with atomic_file(log) as f:
            f.write("".join(json.dumps(r) + "\n" for r in keep))


def set_aside(log: Path) -> Path | None:
    """A new run starts a new log; an earlier run's (killed before its first checkpoint) is user work, kept
    beside it as metrics.jsonl.old (.old.2, ... when that is taken). Returns where it went, or None."""
    if not log.exists():
        return None
    kept, n = log.with_name(log.name + ".old"), 1
    while kept.exists():
        n += 1
        kept = log.with_name(f"{log.name}.old.{n}")
    os.replace(log, kept)
    return kept


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
    """One record appended and on disk. A kill or a full disk may cut the line short: read_log leaves such a
    last line out, and the next append first cuts it off (glued to the record after it, it would hide that
    one too). A full disk is named."""
    with named_full_disk(path), open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(end - 1, 0))
        if end and f.read(1) != b"\n":
            f.seek(0)
            whole = f.read().rfind(b"\n") + 1
            f.truncate(whole)
            warnings.warn(f"{path}: cut off its last line, left unfinished by a kill or a full disk "
                          f"({end - whole} bytes)")
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
