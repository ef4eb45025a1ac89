"""CPU kernels for quantized linear layers, one 3B-width layer at a time: what each reads and how fast.

    python benchmarks/kernels.py [--threads 2]

Per kernel: median time of one call (x of M rows against a 16384 x 2048 weight, gate_proj's shape),
and for batch 1 the bytes the weight occupies / time = the read bandwidth it reaches. Prefill rows:
M = 268 (256 image tokens + 12 text), the int8 x int8 path quantizing the activations per row first.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paligemma import quantize as Q  # noqa: E402
from paligemma.packing import PackedLinear  # noqa: E402


def timed(fn, reps=20) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def int8_x_int8(x, layer):
    """Dynamic per-row int8 activations times int8 weights (VNNI), int32 accumulation, both scales after."""
    xf = x.float()
    sx = (xf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)  # (M, 1)
    xq = (xf / sx).round().clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq, layer.wt)  # (M, N) int32
    return (acc.float() * sx * layer.scales.float()).to(x.dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N, K = 16384, 2048
    dense = torch.nn.Linear(K, N, bias=False).to(torch.bfloat16).requires_grad_(False)
    packed = PackedLinear(dense.weight).eval()
    i8 = Q.quantized_linear(dense, "int8")
    i8.wt = i8.qweight.t()  # _int_mm takes (K, N): a transposed view of the row-major (N, K) weight
    nf4 = Q.quantized_linear(dense, "nf4")
    bytes_ = {"bf16": 2 * N * K, "int8": N * K + 2 * N, "nf4": N * K // 2 + 4 * N * K // 64}
    rows = []
    with torch.no_grad():
        for M in (1, 8, 268):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            lines = [("bf16 F.linear", "bf16", lambda: F.linear(x, dense.weight)),
                     ("bf16 oneDNN-packed (packing.py)", "bf16", lambda: packed(x)),
                     ("int8 torch._weight_int8pack_mm", "int8",
                      lambda: torch._weight_int8pack_mm(x, i8.qweight, i8.scales)),
                     ("int8 dequantize + F.linear", "int8", lambda: F.linear(x, i8.dequantize())),
                     ("nf4 dequantize + F.linear", "nf4", lambda: nf4(x))]
            if M > 16:  # torch._int_mm needs M > 16
                lines.append(("int8 x int8 (dynamic activations, torch._int_mm)", "int8", lambda: int8_x_int8(x, i8)))
            base = None
            for name, fmt, fn in lines:
                t = timed(fn, reps=20 if M < 100 else 5)
                base = base or t
                gbs = bytes_[fmt] / t / 1e9
                rows.append(f"| {M} | {name} | {t * 1e3:.2f} ms | {base / t:.2f}x | {gbs:.1f} GB/s |")
        x = torch.randn(268, K, dtype=torch.bfloat16)
        err = (int8_x_int8(x, i8).float() - i8(x).float()).norm() / i8(x).float().norm()
    table = ["| rows M | kernel | time | vs bf16 F.linear | weight bytes / time |", "|---:|---|---:|---:|---:|"] + rows
    text = (f"torch {torch.__version__}, {args.threads} threads, weight {N} x {K}\n\n" + "\n".join(table)
            + f"\n\nint8 x int8 vs int8-weight-only output, relative error at M = 268: {err:.4f}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
