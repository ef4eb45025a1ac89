"""paligemma/atomic.py tested by crashing: a write that fails or is killed part-way leaves the old file
or folder whole under its name and no temp file behind; the bytes reach the disk (flush, fsync)
before any rename makes them visible under the final name. The tests name no temp file: they look
at what is left in the folder."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paligemma import atomic
from paligemma.atomic import atomic_dir, atomic_file

ROOT = Path(__file__).resolve().parents[1]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- a write that fails part-way -----------------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_file_failing_inside_the_block_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(error), atomic_file(path) as f:
        f.write("new, half written")
        f.flush()  # the partial bytes are on disk, in the temp file
        raise error()
    assert path.read_text() == "old" and names(tmp_path) == ["metrics.json"]


def test_file_failing_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="No space"), atomic_file(path) as f:
        f.write("new")
    assert path.read_text() == "old" and names(tmp_path) == ["metrics.json"]


def test_file_new_path_failing_leaves_nothing(tmp_path):
    with pytest.raises(ValueError), atomic_file(tmp_path / "sub" / "new.txt") as f:
        f.write("x")
        raise ValueError
    assert names(tmp_path / "sub") == []


def test_folder_failing_inside_the_block_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "checkpoint"
    with atomic_dir(folder) as tmp:
        (tmp / "state.pt").write_bytes(b"old" * 1000)
        (tmp / "step.json").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "state.pt").write_bytes(b"new" * 10)  # the big file written, the small one not yet
        raise RuntimeError("killed while saving")
    assert names(folder) == ["state.pt", "step.json"]
    assert (folder / "state.pt").read_bytes() == b"old" * 1000 and (folder / "step.json").read_text() == "1"
    assert names(tmp_path) == ["checkpoint"]


# --- the order of the durability steps -----------------------------------------------------------

def test_file_bytes_flushed_and_synced_before_the_rename(tmp_path, monkeypatch):
    """At fsync the temp file already holds every byte (flushed from Python's buffer); the rename
    comes after, and renames the file that was synced."""
    path = tmp_path / "out.txt"
    path.write_text("old")
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, st.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, Path(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    data = "x" * 100_000  # larger than Python's write buffer, smaller than this is all held back
    with atomic_file(path) as f:
        f.write(data)
        f.write("tail")  # still in the buffer until flushed
    kinds = [e[0] for e in events]
    assert "fsync" in kinds and kinds.index("fsync") < kinds.index("replace"), events
    synced = next(e for e in events if e[0] == "fsync")
    renamed = next(e for e in events if e[0] == "replace")
    assert synced[2] == len(data) + 4  # the whole content, not what happened to leave the buffer
    assert renamed[1] == synced[1] and renamed[2] == path  # the synced file is the one renamed in
    assert path.read_text() == data + "tail"


def test_folder_files_synced_before_it_is_renamed(tmp_path, monkeypatch):
    """Every file of the new folder is fsynced (whole) before the first rename moves the folder
    towards its final name: otherwise a power cut after the rename can leave empty files under it."""
    folder = tmp_path / "checkpoint"
    synced, first_rename = {}, []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        synced[st.st_ino] = st.st_size
        real_fsync(fd)

    def replace(src, dst):
        if not first_rename:
            first_rename.append({p.stat().st_ino: p.stat().st_size for p in Path(src).rglob("*") if p.is_file()})
        real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_dir(folder) as tmp:
        (tmp / "state.pt").write_bytes(b"s" * 300_000)
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"a" * 5000)
        (tmp / "step.json").write_text("3")
    files = first_rename[0]
    assert len(files) == 3
    assert all(synced.get(ino) == size for ino, size in files.items()), (files, synced)
    assert (folder / "adapter" / "adapter_model.safetensors").stat().st_size == 5000


# --- a process killed part-way -------------------------------------------------------------------

WRITER = """
import sys
import time
from pathlib import Path
from paligemma.atomic import atomic_dir, atomic_file
target, kind, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for gen in range(1, 10**6):
    b = bytes([gen % 251]) * size
    if kind == "file":
        with atomic_file(target, "wb") as f:
            for i in range(0, size, 65536):  # a slow writer (torch.save of a big state): kills land mid-file
                f.write(b[i:i + 65536])
                f.flush()
                time.sleep(0.003)
    else:
        with atomic_dir(target) as tmp:
            for name in ("a.bin", "b.bin", "c.bin"):
                with open(tmp / name, "wb") as f:
                    for i in range(0, size, 65536):
                        f.write(b[i:i + 65536])
                        f.flush()
                        time.sleep(0.003)
    print(gen, flush=True)
"""


def whole(path: Path, size: int) -> bool:
    data = path.read_bytes()
    return len(data) == size and data == data[:1] * size


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_sigkill_mid_save_leaves_a_whole_file_or_folder(tmp_path, kind):
    """A child rewrites the target over and over; it is SIGKILLed at spread-out moments. After each
    kill the target is absent (no save completed yet) or whole: every byte from one generation."""
    size, target = 1 << 20, tmp_path / ("out.bin" if kind == "file" else "checkpoint")
    seen_whole = 0
    for delay in (0.05, 0.13, 0.29, 0.47, 0.71):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind, str(size)], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        child.stdout.readline()  # one save completed: the target exists from here on
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        if kind == "file":
            assert whole(target, size)
        elif target.exists():  # a kill between the swap's renames leaves no folder under the name
            assert names(target) == ["a.bin", "b.bin", "c.bin"]
            assert all(whole(target / n, size) for n in names(target))
            assert len({(target / n).read_bytes()[:1] for n in names(target)}) == 1  # one generation
        seen_whole += target.exists()
    assert seen_whole >= 3
