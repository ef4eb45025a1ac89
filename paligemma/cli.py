"""What the commands (caption, probe, verify, evaluate.py, train.py) share: the dtype names, number checks
at parse time, the image commands' arguments, one caption per output line, and one-line errors.
Argument parsing only: loading and captioning are paligemma/inference.py."""
import argparse
import math
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def number(kind: type, low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse `type=` that rejects values outside [low, high] (or open ends) with one line."""
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    noun = "an integer" if kind is int else "a number"
    want = f"{noun} >{'' if low_open else '='} {low:g}" if high is None else f"{noun} in {lo}{low:g}, {high:g}{hi}"

    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(x) or x < low or (low_open and x == low) \
                or (high is not None and (x > high or (high_open and x == high))):  # nan passes every comparison
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE = number(int, 1)
NON_NEGATIVE = number(int, 0)
POSITIVE_FLOAT = number(float, 0, low_open=True)

# Ordinary bad input: our own errors (ConfigError, CheckpointError, DataError, AdapterError, ResumeError
# are ValueErrors that name the file), files that are missing or unreadable (OSError, which includes the
# hub's "not found" and offline errors), a training run that diverged. Anything else is a bug.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def run(main, prog: str, argv: list[str] | None = None):
    """Call main(argv); bad input ends the process with `prog: message` on one line and exit code 1.
    `--debug` among the arguments shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        sys.exit(f"{prog}: {e}")
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        sys.exit(f"{prog}: interrupted")


def add_image_command_args(p: argparse.ArgumentParser):
    """The arguments of the commands that run a model on image files (caption, probe)."""
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="checkpoint folder or hub repo id")
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to apply")
    p.add_argument("--prompt", default="caption en", help="task prefix (default: caption en)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")


def add_debug(parser: argparse.ArgumentParser):
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors in the input too")


def one_line(text: str) -> str:
    """Keep one caption per output line; a broken model's newlines stay visible as \\n."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")
