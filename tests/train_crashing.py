"""train.py that dies right after its checkpoint of step N is on disk, as a killed run would:

    torchrun ... tests/train_crashing.py N <train.py arguments>

The crash is placed by wrapping train.save_train_state, so train.py itself carries no test-only flag."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import crash_after  # noqa: E402

if __name__ == "__main__":
    import train
    step = int(sys.argv.pop(1))
    with crash_after(train, step):
        train.main(sys.argv[1:])
