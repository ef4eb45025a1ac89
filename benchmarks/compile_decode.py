"""Greedy decode tokens/s at batch 1: eager vs torch.compile of the one-token step, against the
memory-bandwidth bound (decoder weight bytes per token / bandwidth).

    python benchmarks/compile_decode.py --ckpt DIR --device cuda --bandwidth 4800   # H200 HBM, GB/s

The step is the decoder on one new token with the static KV cache; the cache's fill level is a
host int, so torch.compile specialises on it at first and then (automatic dynamic shapes) compiles
one graph for every later position.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import NEW, decoder_bytes, generate, inputs, load, sync  # noqa: E402


def tokens_per_s(model, data, device, reps=3) -> float:
    with torch.no_grad():
        generate("ours", model, data, NEW + 1)  # warm-up (and compilation)
        first, full = [], []
        for _ in range(reps):
            for new, out in ((1, first), (NEW + 1, full)):
                t0 = time.perf_counter()
                generate("ours", model, data, new)
                sync(device)
                out.append(time.perf_counter() - t0)
    return NEW / (statistics.median(full) - statistics.median(first))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--bandwidth", type=float, required=True, help="memory bandwidth bound in GB/s")
    p.add_argument("--mode", default="max-autotune-no-cudagraphs", help="torch.compile mode")
    p.add_argument("--out", help="also write the Markdown lines here")
    args = p.parse_args()
    config = json.loads((Path(args.ckpt) / "config.json").read_text())
    nbytes = decoder_bytes(config)
    bound = args.bandwidth * 1e9 / nbytes
    model = load("ours", args.ckpt, args.device, pack=False)  # compile does its own weight handling
    data = inputs(config, 1, device=args.device)
    eager = tokens_per_s(model, data, args.device)
    decoder = model.language_model.model
    decoder.forward = torch.compile(decoder.forward, mode=args.mode)
    compiled = tokens_per_s(model, data, args.device)
    lines = [f"| decode batch 1 | tok/s | of the bound {bound:.0f} tok/s ({nbytes / 1e9:.2f} GB at {args.bandwidth:.0f} GB/s) |",
             "|---|---:|---:|",
             f"| eager | {eager:.1f} | {eager / bound:.0%} |",
             f"| torch.compile ({args.mode}) | {compiled:.1f} | {compiled / bound:.0%} |"]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
