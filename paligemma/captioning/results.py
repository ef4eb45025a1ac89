"""An evaluation's output folder, written as the captions are made, so that nothing computed is lost.

    OUT/.partial/run.json        what is being evaluated: data, split, images, prompt, decoding, models
    OUT/.partial/captions.jsonl  one line per caption, appended a batch at a time (flushed, fsynced)
    OUT/predictions.jsonl, predictions.csv, metrics.json    the finished set

A failure anywhere (a model that does not load, scoring, a full disk, a kill) leaves the captions
made so far in OUT/.partial, and `evaluate.py --resume` continues from them: it checks that it
evaluates the same thing (run.json), drops a line a kill cut in half, and captions only what is
missing. When everything is captioned and scored, the finished files are written into .partial
first, and only then replace the old set: the old metrics.json goes first, the new one comes last.
metrics.json is the set's seal: where it exists, the predictions beside it are its own; a full
disk or a kill before the seal leaves the old set whole (or, mid-swap, unsealed), never a mix.
"""
import contextlib
import json
import os
import shutil
from pathlib import Path

from ..atomic import fsync_dir, atomic_file, named_full_disk

PARTIAL = ".partial"
FINISHED = ("predictions.jsonl", "predictions.csv", "metrics.json")
LOCK = ".lock"  # atomic.lock_folder's file, no part of the results


class ResultsError(ValueError):
    """An output folder this run cannot write into as asked (--resume / --overwrite)."""


def state_of(out: Path) -> str:
    """'empty' (or absent), 'unfinished' (a .partial run), 'finished' (a set), or 'other' files."""
    names = {p.name for p in out.iterdir()} - {LOCK} if out.is_dir() else set()
    if PARTIAL in names:
        return "unfinished"
    if "metrics.json" in names:
        return "finished"
    return "other" if names else "empty"


def check_output(out: Path, resume: bool, overwrite: bool):
    """Before anything is loaded: refuse what would lose or mix results. A new run needs an empty OUT
    (or --overwrite: the old set stays until the new one is sealed); --resume needs an unfinished one."""
    state = state_of(out)
    if resume and state != "unfinished":
        raise ResultsError(f"--resume: {out} holds no unfinished evaluation (no {PARTIAL}/): "
                           + ("its results are finished (metrics.json)" if state == "finished" else "nothing to resume")
                           + "; drop --resume to start one")
    if not resume and not overwrite and state == "unfinished":
        done = sum(1 for _ in open(out / PARTIAL / "captions.jsonl")) if (out / PARTIAL / "captions.jsonl").exists() else 0
        raise ResultsError(f"{out} holds an unfinished evaluation ({done} captions in {PARTIAL}/captions.jsonl): pass "
                           "--resume to continue it, or --overwrite to start again")
    if not resume and not overwrite and state in ("finished", "other"):
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to replace its files")


def free_space_check(out: Path, need: int):
    """Refuse a run whose files will not fit (an estimate; skipped where the disk cannot be asked)."""
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise OSError(f"{out}: about {need / 1e6:.1f} MB needed for the captions and results, {free / 1e6:.1f} MB "
                      "free: no space left on device for this evaluation")


def start(out: Path, plan: dict, resume: bool) -> dict[str, list[dict]]:
    """Open OUT/.partial for this run (writing run.json is also the check that OUT is writable, before
    the first caption); -> the captions already made, by model, when resuming. A plan other than the
    unfinished run's is refused by name. A model's captions are kept in whole batches of
    plan["batch_size"] (a batch cut short by a failure is made again, with the same sampling seed)."""
    partial = out / PARTIAL
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)  # --overwrite: a previous unfinished run is dropped
        with atomic_file(partial / "run.json") as f:
            json.dump(plan, f, indent=2)
        (partial / "captions.jsonl").touch()
        return {}
    saved = json.loads((partial / "run.json").read_text())
    differ = [f"{k}: {plan.get(k)!r} (unfinished run: {saved.get(k)!r})" for k in sorted(set(saved) | set(plan))
              if saved.get(k) != plan.get(k)]
    if differ:
        shown = [d if len(d) < 300 else d[:300] + "...)" for d in differ]
        raise ResultsError(f"--resume: {out} holds an evaluation of something else: {'; '.join(shown)}")
    done = read_captions(partial / "captions.jsonl")
    total, size = len(plan["images"]), plan["batch_size"]
    whole = {m: rows if len(rows) >= total else rows[:len(rows) - len(rows) % size] for m, rows in done.items()}
    if whole != done:
        with atomic_file(partial / "captions.jsonl") as f:
            f.write("".join(json.dumps(r) + "\n" for rows in whole.values() for r in rows))
    return whole


def read_captions(path: Path) -> dict[str, list[dict]]:
    """The appended captions by model; a last line cut by a kill or a full disk is dropped (the file
    is cut back to its last whole line)."""
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
            os.fsync(f.fileno())
        print(f"{path}: dropped a half-written last line ({len(data) - len(whole)} bytes)")
    done = {}
    for i, line in enumerate(whole.decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}:{i}: not JSON ({e}); the unfinished run is damaged: rerun with "
                               "--overwrite") from None
        done.setdefault(row["model"], []).append(row)
    return done


def append(out: Path, rows: list[dict]):
    """One batch's captions onto the log, in one write, flushed and fsynced before the next batch."""
    path = out / PARTIAL / "captions.jsonl"
    with named_full_disk(path), open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def seal(out: Path, write_files):
    """write_files(folder) writes the FINISHED files into `folder` (OUT/.partial); then they replace
    the old set, metrics.json last, and .partial goes. A failure while writing leaves the old set."""
    partial = out / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    write_files(partial)
    with contextlib.suppress(FileNotFoundError):
        (out / "metrics.json").unlink()  # from here the old set is no set: nothing can pair with it
    fsync_dir(out)
    for name in FINISHED:
        os.replace(partial / name, out / name)
    fsync_dir(out)
    shutil.rmtree(partial)
