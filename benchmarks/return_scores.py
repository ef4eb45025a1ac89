"""Decode speed with and without generate(return_scores=True), against the generate of before the option.

    PYTHONPATH=. python benchmarks/return_scores.py [--ref REV]    # REV: the git revision to compare with (main)

A small random PaliGemma (2 decoder layers of width 256, 16k vocabulary, 16 image tokens), batch 8,
32 greedy tokens, forced to run every step (no <eos>); the three variants interleaved, 7 rounds, medians;
one thread (a tiny model on a shared 2-core machine: two threads spin against the other jobs).
Prints tokens/s and ratios to the reference: return_scores=False must stay at 1.00 (noise aside)."""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from paligemma import PaliGemma
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma import generation


def reference_generate(rev: str):
    """generation.py as it is at `rev`, imported beside ours (its relative imports resolve to this tree)."""
    source = subprocess.run(["git", "show", f"{rev}:paligemma/generation.py"], capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "generation_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("paligemma.generation_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.generate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ref", default="main")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = PaliGemmaConfig(vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=16, patch_size=4),
                             text=TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                             vocab_size=16000),
                             image_token_index=15999, projection_dim=256)
    model = PaliGemma(config).init_weights().eval()
    B, T, L = 8, 16 + 8, 32
    ids = torch.randint(3, 15000, (B, T))
    ids[:, :16] = 15999
    inputs = dict(input_ids=ids, pixel_values=torch.randn(B, 3, 16, 16), attention_mask=torch.ones_like(ids))
    variants = {"reference": lambda: reference_generate(args.ref)(model, **inputs, max_new_tokens=L, eos_id=-1),
                "return_scores=False": lambda: generation.generate(model, **inputs, max_new_tokens=L, eos_id=-1),
                "return_scores=True": lambda: generation.generate(model, **inputs, max_new_tokens=L, eos_id=-1,
                                                                  return_scores=True)}
    times = {k: [] for k in variants}
    for f in variants.values():
        f()  # warm-up
    for _ in range(args.rounds):
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times["reference"])
    print(f"| variant | tokens/s | time / reference |\n|---|---:|---:|")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"| {k} | {B * L / m:.0f} | {m / ref:.3f} |")


if __name__ == "__main__":
    main()
