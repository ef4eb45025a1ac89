"""CPU kernels for (quantized) linear layers at PaliGemma-3B decoder shapes: time and read bandwidth.

    python benchmarks/kernels.py [--threads 1 2] [--rows 1 8 268] [--copies 2] [--compile] [--out FILE.md]

One "pass" runs every linear layer of a decoder layer (q, k, v, o, gate, up, down) once, for
`--copies` copies of that layer with different weights, so that each weight comes from memory and
not from the 32 MB cache (2 copies: 440 MB of bf16, 220 MB of int8, ~120 MB of int4). Per kernel and
row count: median time of a pass over `--reps` interleaved rounds (every kernel once per round, so
that a neighbour's load hits all of them alike), the weight bytes read per second, the ratio to bf16
F.linear, and the relative error of the output against the float32 product with the unquantized
weights. Rows: 1 (batch-1 decode), 8 (batch-8 decode), 16 (the routing boundary), 268
(prefill: 256 image tokens + 12), 2144 (a batch-8 prefill; `--rows 2144`).
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paligemma.int4 import Int4Linear, quantize_weight  # noqa: E402
from paligemma.packing import PackedLinear  # noqa: E402

D, FF, HEADS, KV, HEAD_DIM = 2048, 16384, 8, 1, 256  # Gemma-2B's decoder, PaliGemma-3B's
SHAPES = [(HEADS * HEAD_DIM, D), (KV * HEAD_DIM, D), (KV * HEAD_DIM, D), (D, HEADS * HEAD_DIM), (FF, D), (FF, D), (D, FF)]
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")  # torch.ao's deprecation notice


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def int8_rows(w):
    s = (w.float().abs().amax(1) / 127).clamp(min=1e-12)
    return (w.float() / s[:, None]).round().clamp(-127, 127).to(torch.int8), s


class Kernel:
    """prepare(w bf16 (N, K)) -> state; run(state, x (M, K) bf16) -> (M, N); bytes(state): what a call reads."""
    def __init__(self, name, prepare, run, bytes_, rows=None):
        self.name, self.prepare, self.run, self.bytes = name, prepare, run, bytes_
        self.rows = rows  # the row counts it runs at (None: all)

    def runs_at(self, rows: int) -> bool:
        return self.rows is None or rows in self.rows


def fbgemm(reduce_range: bool):
    """torch.ao's dynamic int8 linear (fbgemm, the x86 engine): activations quantized per tensor to uint8
    on every call, int8 x uint8 -> int32 (VPDPBUSD), float32 in and out."""
    def prepare(w):
        q, s = int8_rows(w)
        qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(len(s), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None), nbytes(q, s), s.bfloat16()
    return Kernel(f"int8 fbgemm dynamic (activations per tensor{', 7-bit' if reduce_range else ''})", prepare,
                  lambda st, x: torch.ops.quantized.linear_dynamic(x.float(), st[0], reduce_range).to(x.dtype),
                  lambda st: st[1])


def onednn_prepare(w):
    q, s = int8_rows(w)
    return torch.ops.onednn.qlinear_prepack(q, None), s.float(), torch.zeros(len(s), dtype=torch.long), nbytes(q, s)


def onednn_run(st, x):
    """oneDNN's int8 linear (inductor's x86 quantization backend), activations quantized here per tensor."""
    xf = x.float()
    scale = float(xf.abs().amax().clamp(min=1e-12)) / 127
    xq = (xf / scale).round_().clamp_(-127, 127).add_(128).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(xq, scale, 128, st[0], st[1], st[2], None, 1.0, 0, x.dtype, "none", [], "")


def int4_prepare(group):
    def prepare(w):
        parts = quantize_weight(w, group)
        return parts["qweight"], parts["scales_and_zeros"]
    return prepare


def int4_layer(w):
    layer = Int4Linear(w.shape[1], w.shape[0], False, dtype=w.dtype)
    for k, v in quantize_weight(w).items():
        setattr(layer, k, v)
    return layer


def embedding_bag_prepare(w, group: int = 64):
    """fbgemm's 4-bit embedding-bag table for W x: row j * K + k holds W[j*G:(j+1)*G, k] (G outputs of one
    input), 4-bit codes with a float16 scale and bias after them (fbgemm's fused rowwise layout)."""
    n, k = w.shape
    t = w.float().t().reshape(k, n // group, group).transpose(0, 1).reshape(-1, group)  # (n / G * k, G)
    lo, hi = t.amin(1, keepdim=True), t.amax(1, keepdim=True)
    scale, bias = ((hi - lo) / 15).clamp(min=1e-8).half(), lo.half()
    q = ((t - bias.float()) / scale.float()).round_().clamp_(0, 15).to(torch.uint8)
    table = torch.cat([q[:, 0::2] | (q[:, 1::2] << 4), scale.view(torch.uint8), bias.view(torch.uint8)], 1)
    bags = n // group
    return table, torch.arange(bags * k, dtype=torch.int32), torch.arange(0, bags * k + 1, k, dtype=torch.int32), bags


def embedding_bag_run(st, x):
    """y = W x as n / G bags of k rows each, weighted by x: one call, its sum in float32."""
    table, indices, offsets, bags = st
    y = torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(table, indices, offsets, False, 0, False,
                                                               x[0].float().repeat(bags), None, True)
    return y.reshape(1, -1).to(x.dtype)


def fbgemm_dequantize(st, x):
    """The int8 weight back out of fbgemm's packed form (linear_unpack), times its scales, then bf16 F.linear."""
    q = torch.ops.quantized.linear_unpack(st[0])[0].int_repr()
    return F.linear(x, q.to(x.dtype) * st[2][:, None])


def int_mm(st, x):
    """int8 x int8 -> int32 (torch._int_mm, M > 16), activations per row."""
    xf = x.float()
    sx = (xf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    acc = torch._int_mm((xf / sx).round().clamp(-127, 127).to(torch.int8), st[0].t())
    return (acc.float() * sx * st[1]).to(x.dtype)


def compiled_int8(x, q, s):
    """What inductor makes of a dequantize-and-reduce written in torch: a fused loop over int8 weights."""
    return ((x.float()[:, None, :] * q.float()[None]).sum(-1) * s.float()).to(x.dtype)


def compiled_int8_blocked(x, q, s):
    """The same, the reduction split into blocks of 64 (more independent sums for the compiler)."""
    o, i = q.shape
    p = (x.float().view(-1, 1, i // 64, 64) * q.view(1, o, i // 64, 64).float()).sum(-1)  # (M, out, in / 64)
    return (p.sum(-1) * s.float()).to(x.dtype)


class Frozen(torch.nn.Module):
    """One layer's quantized weights as parameters, for inductor's freezing: with max-autotune it then
    benchmarks its own C++ GEMM templates (the weight-only int8 "small M" template, the AVX512 int4 one)
    against the aten kernel and keeps the faster, per shape."""
    def __init__(self, op, *tensors):
        super().__init__()
        self.op, self.ts = op, torch.nn.ParameterList(torch.nn.Parameter(t, requires_grad=False) for t in tensors)

    def forward(self, x):
        return self.op(x, *self.ts)


def autotuned(op):
    torch._dynamo.config.cache_size_limit = 64  # a module per weight: one graph each
    opts = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    return lambda *ts: torch.compile(Frozen(op, *ts).eval(), options=opts, dynamic=False)


def kernels(compile_: bool) -> list[Kernel]:
    ks = [Kernel("bf16 F.linear", lambda w: w, lambda w, x: F.linear(x, w), nbytes),
          Kernel("bf16 torch.mv", lambda w: w, lambda w, x: torch.mv(w, x[0])[None], nbytes, rows=(1,)),
          Kernel("bf16 oneDNN-packed (packing.py)", lambda w: PackedLinear(w).eval(), lambda p, x: p(x),
                 lambda p: 2 * p.in_features * p.out_features),
          Kernel("int8 torch._weight_int8pack_mm (today's)", lambda w: (lambda q, s: (q, s.to(w.dtype)))(*int8_rows(w)),
                 lambda st, x: torch._weight_int8pack_mm(x, st[0], st[1]), lambda st: nbytes(*st), rows=(1, 8, 16)),
          Kernel("int8 dequantize + bf16 F.linear (today's prefill)", lambda w: (lambda q, s: (q, s.to(w.dtype)))(*int8_rows(w)),
                 lambda st, x: F.linear(x, st[0].to(x.dtype) * st[1][:, None]), lambda st: nbytes(*st), rows=(16, 268, 2144)),
          Kernel("int8 fbgemm unpack + dequantize + bf16 F.linear", fbgemm(False).prepare, fbgemm_dequantize,
                 lambda st: st[1], rows=(16, 268, 2144)),
          Kernel("int4 dequantize + bf16 F.linear (groups of 64)", int4_layer, lambda m, x: F.linear(x, m.dequantize()),
                 lambda m: nbytes(m.qweight, m.scales_and_zeros), rows=(16, 268, 2144)),
          fbgemm(False), fbgemm(True),
          Kernel("int8 oneDNN qlinear (activations per tensor)", onednn_prepare, onednn_run, lambda st: st[3]),
          Kernel("int8 x int8 torch._int_mm (activations per row)", lambda w: int8_rows(w), int_mm,
                 lambda st: nbytes(*st), rows=(268, 2144))]
    ks.append(Kernel("int4 fbgemm 4-bit embedding bag as W x (groups of 64 outputs)", embedding_bag_prepare,
                     embedding_bag_run, lambda st: nbytes(st[0]), rows=(1,)))
    for g in (32, 64, 128):
        ks.append(Kernel(f"int4 torch._weight_int4pack_mm_for_cpu, groups of {g}", int4_prepare(g),
                         lambda st, x, g=g: torch._weight_int4pack_mm_for_cpu(x, st[0], g, st[1]), lambda st: nbytes(*st),
                         rows=None if g == 64 else (1, 8, 16)))
    if compile_:
        fn = torch.compile(compiled_int8, dynamic=False)
        ks.append(Kernel("int8 torch.compile'd dequantize-and-reduce", lambda w: (lambda q, s: (q, s.to(w.dtype)))(*int8_rows(w)),
                         lambda st, x: fn(x, st[0], st[1]), lambda st: nbytes(*st), rows=(1, 8)))
        blocked = torch.compile(compiled_int8_blocked, dynamic=False)
        ks.append(Kernel("int8 torch.compile'd dequantize-and-reduce, blocks of 64",
                         lambda w: (lambda q, s: (q, s.to(w.dtype)))(*int8_rows(w)),
                         lambda st, x: blocked(x, st[0], st[1]), lambda st: nbytes(*st), rows=(1, 8)))
        woq8 = autotuned(torch._weight_int8pack_mm)
        ks.append(Kernel("int8 _weight_int8pack_mm, inductor freezing + max-autotune",
                         lambda w: (lambda q, s: (woq8(q, s.to(w.dtype)), nbytes(q, s)))(*int8_rows(w)),
                         lambda st, x: st[0](x), lambda st: st[1], rows=(1, 8)))
        woq4 = autotuned(lambda x, q, sz: torch._weight_int4pack_mm_for_cpu(x, q, 64, sz))
        ks.append(Kernel("int4 groups of 64, inductor freezing + max-autotune",
                         lambda w: (lambda q, sz: (woq4(q, sz), nbytes(q, sz)))(*int4_prepare(64)(w)),
                         lambda st, x: st[0](x), lambda st: st[1], rows=(1, 8)))
    return ks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 268])
    p.add_argument("--copies", type=int, default=2, help="copies of a decoder layer's weights, rotated")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds (3 at 268 rows)")
    p.add_argument("--compile", action="store_true", help="also torch.compile'd / inductor kernels (need a C++ compiler)")
    p.add_argument("--only", nargs="+", help="kernels whose name contains one of these words")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=g).mul_(0.02).bfloat16() for _ in range(args.copies) for shape in SHAPES]
    ks = [k for k in kernels(args.compile) if not args.only or any(w in k.name for w in args.only)]
    states = {k.name: [k.prepare(w) for w in weights] for k in ks}
    text = [f"torch {torch.__version__}, {args.copies} copies of a 3B decoder layer's 7 linear weights "
            f"({nbytes(*weights) / 1e6:.0f} MB in bf16), median of {args.reps} interleaved rounds\n"]
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for M in args.rows:
                xs = [torch.randn(M, w.shape[1], generator=g).bfloat16() for w in weights]
                refs = [F.linear(x.float(), w.float()) for x, w in zip(xs, weights)]
                active = [k for k in ks if k.runs_at(M)]
                times = {k.name: [] for k in active}
                for k in active:  # warm-up (and torch.compile's compilation)
                    for st, x in zip(states[k.name], xs):
                        k.run(st, x)
                for _ in range(args.reps if M < 100 else max(1, min(args.reps, 3))):
                    for k in active:
                        t0 = time.perf_counter()
                        for st, x in zip(states[k.name], xs):
                            k.run(st, x)
                        times[k.name].append(time.perf_counter() - t0)
                base = statistics.median(times["bf16 F.linear"]) if "bf16 F.linear" in times else None
                text += [f"\n{threads} thread(s), {M} row(s)\n", "| kernel | ms / pass | vs bf16 F.linear | weight GB/s | rel. error |",
                         "|---|---:|---:|---:|---:|"]
                for k in active:
                    t = statistics.median(times[k.name])
                    read = sum(k.bytes(st) for st in states[k.name])
                    ys = [k.run(st, x).float() for st, x in zip(states[k.name], xs)]
                    err = max(float((y - r).norm() / r.norm()) for y, r in zip(ys, refs))
                    text.append(f"| {k.name} | {t * 1e3:.1f} | {base / t:.2f}x | {read / t / 1e9:.1f} | {err:.4f} |"
                                if base else f"| {k.name} | {t * 1e3:.1f} | | {read / t / 1e9:.1f} | {err:.4f} |")
                print("\n".join(text[-len(active) - 3:]), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
