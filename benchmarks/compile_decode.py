"""Greedy decode tokens/s, side by side in one run: ours eager, ours with `generate(compile=True)`, ours
packed (CPU's inference path), transformers; against the memory-bandwidth bound at batch 1.

    python benchmarks/compile_decode.py --ckpt DIR --device cuda --bandwidth 4800 --out FILE.json   # H200
    python benchmarks/compile_decode.py --ckpt /tmp/bench/3b --device cpu                          # here
    ... --quantize int8 nf4                                                                         # + ours quantized

Decode speed = NEW steps / (time of generate(NEW + 1) - time of generate(1)): the prefill and the
first token cancel. The first compiled call compiles (its time is reported apart); the compiled step
runs with the static cache (fixed shapes, the slot as a tensor), so it is one graph for every
position and, on CUDA, mode "reduce-overhead" replays it as a CUDA graph. Transformers runs its default
`generate` (dynamic cache, eager) in a fresh process through bench.py.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import NEW, decoder_bytes, inputs, run_line, sync  # noqa: E402


def tokens_per_s(model, data, device, reps: int, new: int, **kwargs) -> float:
    with torch.no_grad():
        first, full = [], []
        for _ in range(reps):
            for n, out in ((1, first), (new + 1, full)):
                t0 = time.perf_counter()
                model.generate(**data, max_new_tokens=n, eos_id=-1, **kwargs)  # never stops early
                sync(device)
                out.append(time.perf_counter() - t0)
    decode = statistics.median(full) - statistics.median(first)
    if decode <= 0:  # the neighbours' noise exceeded NEW steps' time (a loaded machine, few steps): no figure
        return None
    return data["input_ids"].shape[0] * new / decode


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--bandwidth", type=float, help="memory bandwidth bound in GB/s (default: measured copy)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--new", type=int, default=NEW, help="decode steps measured")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers lines")
    p.add_argument("--quantize", nargs="*", choices=["int8", "nf4"], default=[], help="also ours int8 / NF4, eager")
    p.add_argument("--out", help="write the results as JSON here (and the Markdown next to it)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from paligemma import PaliGemma, packing
    config = json.loads((Path(args.ckpt) / "config.json").read_text())
    nbytes = decoder_bytes(config)
    if args.bandwidth is None:
        from bench import copy_bandwidth
        args.bandwidth = copy_bandwidth(args.device) / 1e9
    bound = args.bandwidth * 1e9 / nbytes
    results = dict(device=args.device, torch=torch.__version__, bandwidth_gb_s=args.bandwidth, decoder_bytes=nbytes,
                   bound_tok_s_batch1=bound, mode=args.mode, lines={})
    model = PaliGemma.from_pretrained(args.ckpt, dtype=torch.bfloat16, device=args.device).eval()  # plain
    data = {b: inputs(config, b, device=args.device) for b in args.batch}
    compile_arg = args.mode or True

    def line(name, value):
        results["lines"][name] = value
        print(json.dumps({name: value}), flush=True)
        if args.out:  # as it goes: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=2))

    for b in args.batch:
        model.generate(**data[b], max_new_tokens=2, eos_id=-1)  # warm-up
        line(f"ours eager, batch {b}", tokens_per_s(model, data[b], args.device, args.reps, args.new))
        t0 = time.perf_counter()
        model.generate(**data[b], max_new_tokens=args.new + 1, eos_id=-1, compile=compile_arg)  # compiles (once per shape)
        sync(args.device)
        line(f"compile time, batch {b} (s)", time.perf_counter() - t0)
        line(f"ours compiled, batch {b}", tokens_per_s(model, data[b], args.device, args.reps, args.new,
                                                     compile=compile_arg))
    if packing.can_pack(model):  # CPU: the packed eager path the commands use (inference=True), for comparison
        packing.pack(model)
        for b in args.batch:
            model.generate(**data[b], max_new_tokens=2, eos_id=-1)
            line(f"ours packed eager, batch {b}", tokens_per_s(model, data[b], args.device, args.reps, args.new))
    del model
    for mode in args.quantize:  # weight-only int8 / NF4 (quantize.py), eager
        q = PaliGemma.from_pretrained(args.ckpt, dtype=torch.bfloat16, device=args.device, quantize=mode).eval()
        for b in args.batch:
            q.generate(**data[b], max_new_tokens=2, eos_id=-1)
            line(f"ours {mode} eager, batch {b}", tokens_per_s(q, data[b], args.device, args.reps, args.new))
        del q
    if not args.no_hf:
        for b in args.batch:
            r = run_line("hf", "decode", args.ckpt, args.device, args.reps, b, new=args.new)
            line(f"transformers eager, batch {b}", r["tokens_per_s"] if r["tokens_per_s"] > 0 else None)  # as above
    rows = ["| decode | " + " | ".join(f"batch {b}" for b in args.batch) + " |", "|---|" + "---:|" * len(args.batch)]
    for impl in ("ours eager", "ours compiled", "ours packed eager", "ours int8 eager", "ours nf4 eager",
                 "transformers eager"):
        cells = [results["lines"].get(f"{impl}, batch {b}") for b in args.batch]
        if any(c is not None for c in cells):
            rows.append(f"| {impl} | " + " | ".join(f"{c:.2f} tok/s" if c else "-" for c in cells) + " |")
    rows.append(f"| bound at batch 1: {nbytes / 1e9:.2f} GB of decoder weights at {args.bandwidth:.0f} GB/s | "
                f"{bound:.1f} tok/s |" + " |" * (len(args.batch) - 1))
    results["markdown"] = "\n".join(rows)
    print(results["markdown"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        Path(args.out).with_suffix(".md").write_text(results["markdown"] + "\n")


if __name__ == "__main__":
    main()
