"""paligemma/atomic.py: a process killed at any point of a folder swap leaves, after recover(), the old
whole folder or the new whole one, and no temp folders. The kills are real (os._exit in a child
process, no cleanup code runs), placed before each rename of the swap."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from paligemma.atomic import atomic_dir, recover

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
