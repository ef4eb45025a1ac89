"""bench.py's lines one at a time, each printed (JSON) as soon as it is measured: for a shared machine
where a long table may not finish. Same fresh-process measurement as bench.py.

    python benchmarks/lines.py --ckpt DIR --train-ckpt DIR IMPL:TASK[:BATCH[:NEW[:ckpt]]] ...
    e.g. ours:decode:1 ours:int8:decode:1 ours:int4:decode:8 ours:nf4:decode:1:2 ours:int8:train:4
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--train-ckpt", help="checkpoint for train lines (default --ckpt)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("lines", nargs="+", help="impl[:mode]:task[:batch[:new[:ckpt]]]")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"copy_bandwidth": bench.copy_bandwidth("cpu")}), flush=True)
    for line in args.lines:
        parts = line.split(":")
        quantized = parts[1] in ("int8", "int4", "nf4")
        impl = ":".join(parts[:2]) if quantized else parts[0]
        rest = parts[2:] if quantized else parts[1:]
        task, batch = rest[0], int(rest[1]) if len(rest) > 1 else 1
        new = int(rest[2]) if len(rest) > 2 else bench.NEW
        checkpointing = len(rest) > 3 and rest[3] == "ckpt"
        ckpt = args.train_ckpt or args.ckpt if task == "train" else args.ckpt
        r = bench.run_line(impl, task, ckpt, "cpu", args.reps, batch, checkpointing, new)
        print(json.dumps({"line": line, **r}), flush=True)


if __name__ == "__main__":
    main()
