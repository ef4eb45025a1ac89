"""paligemma/atomic.py: a process killed at any point of a folder swap leaves, after recover(), the old
whole folder or the new whole one, and no temp folders. The kills are real (os._exit in a child
process, no cleanup code runs), placed before each rename of the swap."""
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from paligemma import atomic
from paligemma.atomic import atomic_dir, atomic_file, recover

ROOT = Path(__file__).resolve().parents[1]


def swap_and_die(folder: Path, die_before_rename: int | None):
    """In a child process: replace `folder` (holding old.txt) with one holding new.txt; os._exit just
    before the given os.replace call of the swap (1: temp -> .new, 2: live -> .old, 3: .new -> live)."""
    code = textwrap.dedent(f"""
        import os
        from paligemma import atomic
        calls, real = [0], os.replace
        def replace(src, dst):
            calls[0] += 1
            if calls[0] == {die_before_rename!r}:
                os._exit(137)
            real(src, dst)
        atomic.os.replace = replace
        with atomic.atomic_dir({str(folder)!r}) as tmp:
            (tmp / "new.txt").write_text("new")
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode


@pytest.mark.parametrize("kill, survivor", [(1, "old"), (2, "new"), (3, "new"), (None, "new")])
def test_kill_during_swap_recovers_a_whole_folder(tmp_path, kill, survivor):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    assert swap_and_die(folder, kill) == (0 if kill is None else 137)
    if kill == 3:
        assert not folder.exists()  # the moment issue #14 describes: the live folder moved aside
    recover(folder)
    assert sorted(p.name for p in folder.iterdir()) == [f"{survivor}.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no .tmp, .new or .old left


def test_failed_block_leaves_old_folder_and_no_temp(tmp_path):
    folder = tmp_path / "best"
    with atomic_dir(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("disk full")
    assert (folder / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["best"]


def test_next_swap_after_a_kill_keeps_the_newest(tmp_path):
    """A save after a kill between the renames (no recover() call by the user) starts from the
    recovered folder, so the folder killed mid-swap is never deleted as if it were stale."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    swap_and_die(folder, 3)
    with atomic_dir(folder) as tmp:
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["checkpoint"]
        (tmp / "newer.txt").write_text("newer")
    assert [p.name for p in folder.iterdir()] == ["newer.txt"]


# --- issue #27: a full disk during any save keeps the previous version and says so, with the path ---

# what each writer raises on a full disk, as measured on a 64 KiB tmpfs (torch 2.13, safetensors 0.7)
FULL = {"python": OSError(errno.ENOSPC, "No space left on device"),
        "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        "safetensors": Exception("Error while serializing: I/O error: No space left on device (os error 28)")}


def nearly_full(monkeypatch):
    """torch.save's error does not say why its write came short: the disk's free space does."""
    real = atomic.shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))


@pytest.mark.parametrize("writer", list(FULL))
def test_full_disk_in_a_folder_save_is_named_and_keeps_the_old_folder(tmp_path, monkeypatch, writer):
    folder = tmp_path / "checkpoint"
    with atomic_dir(folder) as tmp:
        (tmp / "state.pt").write_text("old")
    nearly_full(monkeypatch)
    with pytest.raises(OSError, match=rf"^\[Errno 28\] no space left on device: {folder} \(the previous"), \
            atomic_dir(folder) as tmp:
        (tmp / "state.pt").write_text("half")
        raise FULL[writer]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"] and (folder / "state.pt").read_text() == "old"


def test_full_disk_in_a_file_save_is_named_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    real = os.fsync

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # delayed allocation: found at fsync
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError, match=rf"no space left on device: {path}"), atomic_file(path) as f:
        f.write("new")
    monkeypatch.setattr(atomic.os, "fsync", real)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_short_torch_write_with_space_left_is_named_not_called_a_full_disk(tmp_path):
    with pytest.raises(OSError, match=rf"could not write {tmp_path / 'c'} .*inline_container"), \
            atomic_dir(tmp_path / "c"):
        raise FULL["torch.save"]
    with pytest.raises(RuntimeError, match="unrelated"), atomic_dir(tmp_path / "c"):
        raise RuntimeError("unrelated")


def test_full_disk_in_save_pretrained_keeps_the_old_checkpoint(pg1_dir, tmp_path, monkeypatch):
    from paligemma import PaliGemma
    import safetensors.torch
    model = PaliGemma.from_pretrained(pg1_dir)
    model.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def full(tensors, path, metadata=None):
        raise FULL["safetensors"]
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=f"no space left on device: {tmp_path / 'm'}"):
        model.save_pretrained(tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.skipif(not os.environ.get("PALIGEMMA_FULL_DISK"), reason="set PALIGEMMA_FULL_DISK to a folder on a "
                    "small filesystem (e.g. a 64 KiB tmpfs) to run the real full-disk test")
def test_real_full_disk(tmp_path):
    """The same on a real full filesystem: torch.save, safetensors and Python writes."""
    from safetensors.torch import save_file
    root = Path(os.environ["PALIGEMMA_FULL_DISK"])
    big = {"a": torch.zeros(1 << 20)}
    with atomic_file(root / "small.json") as f:
        f.write("old")
    for name, write in [("c", lambda t: torch.save(big, t / "state.pt")),
                        ("s", lambda t: save_file(big, t / "x.safetensors"))]:
        with pytest.raises(OSError, match=f"no space left on device: {root / name}"), atomic_dir(root / name) as tmp:
            write(tmp)
    with pytest.raises(OSError, match=f"no space left on device: {root / 'small.json'}"), \
            atomic_file(root / "small.json") as f:
        f.write("x" * (4 << 20))
    assert sorted(p.name for p in root.iterdir()) == ["small.json"] and (root / "small.json").read_text() == "old"


# --- issue #27: one process per folder (lock_folder) ---

HOLD = """
import sys, time
from paligemma.atomic import lock_folder
lock_folder(sys.argv[1], "train.py")
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_is_refused_naming_the_first_and_a_killed_ones_lock_is_taken_over(tmp_path):
    import signal
    import socket
    from paligemma.atomic import FolderLocked, lock_folder, unlock_folder
    folder = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLocked, match=rf"{folder} is in use by train.py \(pid {child.pid} on "
                                               rf"{socket.gethostname()}, since .*\): one run per folder"):
            lock_folder(folder, "evaluate.py")
    finally:
        child.send_signal(signal.SIGKILL)  # as a killed run: no cleanup, the lock file keeps its pid
        child.wait()
        child.stdout.close()
    note = lock_folder(folder, "train.py")
    assert note and f"took over the lock of pid {child.pid}" in note and "no longer running" in note
    assert lock_folder(folder) is None  # the same process again: a no-op
    unlock_folder(folder)
    assert not (folder / ".lock").exists()  # released cleanly: no file left
    assert lock_folder(folder) is None  # nothing to take over
    unlock_folder(folder)


def test_without_flock_a_dead_pid_is_stale_and_a_live_one_is_not(tmp_path, monkeypatch):
    import fcntl
    import json
    import socket
    from paligemma.atomic import FolderLocked, lock_folder, unlock_folder

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")  # some network filesystems
    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert "no longer running" in lock_folder(folder)
    unlock_folder(folder)
    (folder / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "x"}))
    with pytest.raises(FolderLocked, match=rf"in use by x \(pid {os.getppid()}"):
        lock_folder(folder)


# --- issue #28: a completed swap leaves nothing beside the folder ---

def test_completed_swaps_leave_no_old_new_or_temp_folder(tmp_path):
    """Without any recover() call after it, each completed swap leaves only the folder itself: the
    replaced copy (.NAME.old) is deleted by the swap, not left for the next one to clean."""
    folder = tmp_path / "best"
    for generation in ("1", "2", "3"):
        with atomic_dir(folder) as tmp:
            (tmp / "step.json").write_text(generation)
        assert [p.name for p in tmp_path.iterdir()] == ["best"]
        assert [p.name for p in folder.iterdir()] == ["step.json"] and (folder / "step.json").read_text() == generation


# --- saves readable by teammates: the umask's modes, not tempfile's private 0700 / 0600 ---

@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_saved_folders_and_files_get_the_modes_of_the_umask(tmp_path, mask, pg1_dir):
    import lora
    from tests.captioning.test_training import lora_model
    model, old = lora_model(pg1_dir), os.umask(mask)
    try:
        with atomic_dir(tmp_path / "checkpoint") as tmp:
            (tmp / "step.json").write_text("{}")
        with atomic_file(tmp_path / "best.json") as f:
            f.write("{}")
        lora.save(model, tmp_path / "adapter")
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777
    assert mode(tmp_path / "checkpoint") == 0o777 & ~mask and mode(tmp_path / "best.json") == 0o666 & ~mask
    assert [mode(p) for p in sorted((tmp_path / "adapter").iterdir())] == [0o666 & ~mask] * 2
