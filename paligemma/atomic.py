"""Write files and folders so that a crash never leaves a half-written one under the final name.

A folder is replaced in four steps, each a rename or a delete, so a kill at any moment leaves
either the old whole folder or the new whole one where `recover()` finds it:

    1. fill  .NAME.<random>.tmp        incomplete until renamed: recover() deletes it
    2. rename it to .NAME.new          complete from here on
    3. rename NAME to .NAME.old        (if NAME exists)
    4. rename .NAME.new to NAME, then delete .NAME.old

recover() finishes a swap that a kill interrupted (the newest complete folder wins) and deletes the
leftovers. atomic_dir() runs it before each swap; readers of a folder that a killed process may have
been writing (train.py --resume) run it before they look.

Temp files and folders are made private (0600 / 0700) by tempfile; each is given the mode an ordinary
open() or mkdir() would have made (the umask's) before it is renamed, so that a teammate on a shared
machine can read a checkpoint as they can read any other file of ours.

A full disk is named, whoever noticed it: Python's OSError(ENOSPC), safetensors' "os error 28" and
torch.save's "[enforce fail at inline_container.cc] unexpected pos" (its writer's short write) all
become one OSError "no space left on device: <the final path>"; the old file or folder stays whole.
"""
import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

# free bytes below which a failed write is put down to a full disk (torch.save's error says only that
# its write came short); what the failed write had filled is still on the disk when this is measured
NEARLY_FULL = 64 << 20


def out_of_space(error: BaseException, path: str | Path, where: str | Path | None = None) -> OSError | None:
    """The one-line OSError to raise instead of `error` when it is a failed write: a full disk (of
    `where`, default `path`'s folder) named as such, torch.save's short write otherwise; None when
    `error` is no write error."""
    text = str(error)
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or "os error 28" in text
    short_write = isinstance(error, RuntimeError) and "inline_container" in text
    if short_write:
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(where or Path(path).parent).free < NEARLY_FULL
    detail = "" if isinstance(error, OSError) else f" ({text.splitlines()[0] if text else type(error).__name__})"
    if full:
        return OSError(errno.ENOSPC, f"no space left on device: {path} (the previous version, if any, is kept)"
                                     + detail)
    if short_write:
        return OSError(errno.EIO, f"could not write {path} (the previous version, if any, is kept){detail}")
    return None


def umask_mode(folder: bool = False) -> int:
    """The mode open() (0o666) or mkdir() (0o777) would give a new file or folder under the process's umask."""
    mask = os.umask(0)  # the only way to read it is to set it; put back at once
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


@contextlib.contextmanager
def named_full_disk(path: str | Path, where: str | Path | None = None):
    """Re-raise a full-disk error of the block as out_of_space's one-line OSError naming `path`."""
    try:
        yield
    except Exception as e:  # OSError, torch.save's RuntimeError, safetensors' SafetensorError is a plain Exception
        better = out_of_space(e, path, where)
        if better is None:
            raise
        raise better from e


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """Open a temp file beside `path`; rename it over `path` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with named_full_disk(path), os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp's is 0600 (module docstring)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _side(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}")


def recover(path: str | Path) -> Path:
    """Finish or undo a folder swap that a kill interrupted; delete temp folders. Returns `path`.

    Must not run while another process is writing `path` (the writers here are single: rank 0)."""
    path = Path(path)
    new, old = _side(path, "new"), _side(path, "old")
    if new.is_dir():  # complete (step 2 done): it is newer than NAME or .NAME.old
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(new, path)
    elif old.is_dir() and not path.exists():  # cannot happen in the sequence above, but never lose a folder
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def fsync_dir(path: Path):
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Fill a temp folder beside `path`; swap it in only when the block succeeds.

    At every moment `path` (after `recover(path)`) is either the old complete folder or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        with named_full_disk(path, where=path.parent):
            yield tmp
            for f in tmp.rglob("*"):  # the files' bytes on disk before any name points at them
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            os.chmod(tmp, umask_mode(folder=True))  # mkdtemp's is 0700 (module docstring)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    new, old = _side(path, "new"), _side(path, "old")
    os.replace(tmp, new)
    fsync_dir(path.parent)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


class FolderLocked(OSError):
    """Another live process holds the folder's lock."""


_HELD: dict[Path, int] = {}  # folder -> the open lock file's descriptor, for this process's lifetime


def lock_folder(folder: str | Path, command: str = "a run") -> str | None:
    """One process writes `folder` at a time: an exclusive flock on `folder/.lock`, which holds the
    owner's pid, host and start time for the message a second process gets (FolderLocked). The kernel
    drops the lock when its process dies (a kill, a crash), so a stale lock file is simply taken over;
    the note returned then names the dead owner (None otherwise). Held until unlock_folder or the end
    of the process; taking it again in the same process (a resumed run in one session) is a no-op.
    Where the filesystem has no flock (some network mounts), a lock whose pid is no longer running on
    this host is stale."""
    import fcntl
    import json
    import socket
    import sys
    import time
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key, path, host = folder.resolve(), folder / ".lock", socket.gethostname()
    if key in _HELD:
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        before = os.read(fd, 4096).decode("utf-8", "replace")
        try:
            owner = json.loads(before) if before.strip() else {}
        except json.JSONDecodeError:
            owner = {}
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:  # no flock here: judge by the pid
            held = owner.get("host") == host and _alive(owner.get("pid"))
        if held:
            os.close(fd)
            raise FolderLocked(errno.EBUSY, f"{folder} is in use by {owner.get('command', 'another process')} (pid "
                                            f"{owner.get('pid', '?')} on {owner.get('host', '?')}, since "
                                            f"{owner.get('started', '?')}): one run per folder at a time; wait for "
                                            f"it, stop it, or choose another folder (lock file: {path})")
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # ours; otherwise its owner unlinked it between our open and our flock: again
        os.close(fd)
    me = {"pid": os.getpid(), "host": host, "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    _HELD[key] = fd
    if owner.get("pid") and owner.get("pid") != os.getpid():
        return (f"{folder}: took over the lock of pid {owner['pid']} on {owner.get('host', '?')} (since "
                f"{owner.get('started', '?')}), which is no longer running")
    return None


def unlock_folder(folder: str | Path):
    """Release lock_folder's lock and remove its file (still holding it: a process that opened the file
    meanwhile sees it unlinked and opens a new one)."""
    folder = Path(folder)
    fd = _HELD.pop(folder.resolve(), None)
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / ".lock")
        os.close(fd)


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
