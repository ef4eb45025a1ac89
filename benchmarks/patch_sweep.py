"""probe.patch_sweep at real shapes: its wall time against the plain loop of single-patch forwards it replaces.

    python benchmarks/patch_sweep.py --ckpt /tmp/bench/3b [--dtype bfloat16] [--batch-size 12] [--threads 2]

The checkpoint: benchmarks/checkpoint.py (random weights; the time does not depend on them). Inputs:
256 image tokens, <bos>, a prompt, a short suffix (the caption so far), one row; the corrupted input
has other pixels. Prints the time of one plain forward (what each run of the plain loop costs), the
sweep's time and its forwards, and the ratio to the plain loop's estimated time (runs x one forward;
the loop itself is not run: at 3B it would take the better part of an hour on a CPU). Peak memory is
the process's resident set (ru_maxrss).
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without `pip install -e .`


def inputs(model, prompt: int, suffix: int, seed: int) -> dict:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    N, T = c.num_image_tokens, c.num_image_tokens + 1 + prompt + suffix
    ids = torch.cat([torch.full((N,), c.image_token_index), torch.tensor([c.bos_token_id]),
                     torch.randint(3, min(c.image_token_index, c.text.vocab_size) - 1, (prompt + suffix,), generator=g)])[None]
    types = torch.zeros(1, T, dtype=torch.long)
    types[:, T - suffix:] = 1
    size = c.vision.image_size
    pixels = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    return dict(input_ids=ids, attention_mask=torch.ones(1, T, dtype=torch.long), token_type_ids=types,
                pixel_values=pixels.to(model.dtype))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (benchmarks/checkpoint.py)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--batch-size", type=int, default=12, help="patched runs per forward")
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens after <bos>")
    p.add_argument("--suffix", type=int, default=2, help="suffix tokens (the caption so far)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from paligemma import PaliGemma, probe
    t0 = time.perf_counter()
    model = PaliGemma.from_pretrained(args.ckpt, dtype=getattr(torch, args.dtype)).requires_grad_(False)
    print(f"load {time.perf_counter() - t0:.1f} s")
    clean = inputs(model, args.prompt, args.suffix, seed=0)
    corrupted = dict(clean, pixel_values=inputs(model, args.prompt, args.suffix, seed=1)["pixel_values"])
    with torch.no_grad():
        model.hidden_states(**clean)  # warm-up
        t0 = time.perf_counter()
        a = model.language_model.logits(model.hidden_states(**clean)[0, -1])
        forward = time.perf_counter() - t0
        b = model.language_model.logits(model.hidden_states(**corrupted)[0, -1])
    target = (int(a.argmax()), int((b.float() - a.float()).argmax()))
    sites = ("resid_post", "attn_out", "mlp_out")
    columns = probe.sweep_columns(model, clean)
    L, T = model.config.text.num_hidden_layers, clean["input_ids"].shape[1]
    runs = len(sites) * L * len(columns)
    chunks = L * -(-len(sites) * len(columns) // args.batch_size)
    t0 = time.perf_counter()
    sweep = probe.patch_sweep(model, clean, corrupted, target, sites=sites, batch_size=args.batch_size)
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"{args.dtype}, {args.threads} threads, T = {T} tokens, {L} layers, columns {list(columns)}")
    print(f"one plain forward (batch 1, vision tower included): {forward:.2f} s")
    print(f"sweep: {runs} patched runs in {chunks} forwards of <= {args.batch_size} rows (+2 plain): {took:.1f} s; "
          f"peak RSS {peak:.1f} GiB")
    print(f"plain loop, estimated: {runs} x {forward:.2f} s = {runs * forward:.0f} s -> sweep / loop = "
          f"{took / (runs * forward):.2f}")
    print(f"restored fraction, resid_post by layer and column:\n{sweep[0]}")


if __name__ == "__main__":
    main()
