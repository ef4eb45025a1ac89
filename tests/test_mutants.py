"""benchmarks/mutants.py's planted bugs still point at code: a refactor that moves a mutant's line
makes that mutant test nothing (or the run stop an hour in), so CI names it at once. The fix is to
follow the moved line in MUTANTS, not to drop the mutant."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mutants  # noqa: E402


def test_every_mutant_applies_once_and_its_tests_exist():
    assert mutants.stale(mutants.MUTANTS) == []
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))


def test_a_stale_mutant_is_named():
    m = mutants.Mutant("gone", "paligemma/atomic.py", "text no file holds", "x", ("tests/test_atomic.py",))
    missing = mutants.Mutant("no_tests", "paligemma/atomic.py", "os.fsync(f.fileno())", "pass", ("tests/test_nothing.py",))
    errors = mutants.stale([m, missing])
    assert len(errors) == 2 and "gone" in errors[0] and "0 copies" in errors[0] and "tests/test_nothing.py" in errors[1]
