"""4-bit weight-only linear layers with group-wise scales and zeros (gpt-fast's / torchao's `int4`).

Each row of W (out, in) is cut into groups of `group` input features (32, 64 or 128); each group
keeps its own affine map from 16 levels back to floats:

    W[o, g*G + j] ~= (q[o, g*G + j] - 8) * scale[g, o] + zero[g, o],     q in 0..15
    scale = (max - min) / 15,  zero = min + 8 * scale   (min, max of the group; q rounded against the
                                                          stored scale and zero, so dequantize() is exact)

That is 4 bits a weight plus two compute-dtype numbers per group: 5 bits at groups of 32, 4.5 at 64,
4.25 at 128. Asymmetric (a zero per group), unlike NF4's absmax: weights of a group that are not
centred on 0 lose no level. On CPU, `torch._weight_int4pack_mm_for_cpu` multiplies by the packed
codes directly (no dense copy), at every row count (measured faster than dequantizing, also for a
prefill); other devices and gradients dequantize and call F.linear (LoRA over an int4 base works that
way, but QLoRA's recipe is NF4: int4 is for inference).

The codes are stored in the order torch's CPU kernel reads them (`_convert_weight_to_int4pack_for_cpu`,
which `quantize_weight` calls), not re-packed on every call; `unpack` reads that order back. It is
torch's private layout (torch 2.13), which depends on the CPU: rows in blocks of B = 64 (AVX512; 32
on an AVX2-only CPU, `block_rows` probes it), each block (in, B / 2) bytes holding rows i and i + B / 2
of the block in the low and high nibble; a last block of r < B rows (in, r / 2) bytes holding rows 2j
and 2j + 1. So packed codes belong to the machine that packed them (every path here quantizes as it
loads). tests/test_quantize.py checks `unpack` against torch's packer, so a torch upgrade (or a CPU)
that changes it fails there, not silently.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .dequantize import dense_forward
from .gemma import changed, source

GROUPS = (32, 64, 128)  # sizes torch's kernel takes (256 too: too coarse for 4 bits here)
GROUP = 64  # the default, chosen by measurement (benchmarks/NOTES.md, change 12)
ROWS = 4096  # rows quantized at a time (a multiple of 64: the packed blocks of each chunk follow on)


def quantize_weight(w: torch.Tensor, group: int = GROUP) -> dict:
    """(out, in) float -> {"qweight": uint8 (out_padded, in_padded / 2) in torch's CPU order,
    "scales_and_zeros": (in_padded / group, out_padded, 2) in w's dtype}. Padded with zeros where torch's
    kernel needs it: `in` to whole groups (SigLIP's 4304 at groups of 32 or 64; the layer pads its
    input to match), `out` to a multiple of 16 (only tiny test models; the layer drops those outputs)."""
    if group not in GROUPS:
        raise ValueError(f"int4: group size {group}; expected one of {GROUPS}")
    (out_f, in_f), pad = w.shape, -w.shape[1] % group
    out_p, n_groups = out_f + -out_f % 16, (in_f + pad) // group
    qweight = torch.empty(out_p, (in_f + pad) // 2, dtype=torch.uint8, device=w.device)
    sz = torch.empty(n_groups, out_p, 2, dtype=w.dtype, device=w.device)
    for i in range(0, out_p, ROWS):
        rows = w[i:i + ROWS].float()
        rows = F.pad(rows, (0, pad, 0, min(ROWS, out_p - i) - len(rows))).view(-1, n_groups, group)  # (r, groups, G)
        lo, hi = rows.amin(-1), rows.amax(-1)
        scale = ((hi - lo).clamp(min=1e-6) / 15).to(w.dtype)
        zero = (lo + 8 * scale.float()).to(w.dtype)
        low = zero.float() - 8 * scale.float()  # level 0 of the stored pair
        q = ((rows - low[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15).to(torch.int32)
        qweight[i:i + ROWS] = torch._convert_weight_to_int4pack_for_cpu(q.view(len(rows), -1).cpu(), 1).to(w.device)
        sz[:, i:i + ROWS, 0], sz[:, i:i + ROWS, 1] = scale.t(), zero.t()
    return {"qweight": qweight, "scales_and_zeros": sz}


@functools.cache
def block_rows() -> int:
    """Rows in a block of torch's CPU int4 order on this CPU: 64 with AVX512, 32 with AVX2 (the packer
    follows its kernel's vector width). Probed once on 64 rows whose codes are row // 16: the high nibble
    of the first byte then holds row B / 2's code, B / 32."""
    codes = (torch.arange(64, dtype=torch.int32) // 16)[:, None].expand(64, 64).contiguous()
    return 32 * int(torch._convert_weight_to_int4pack_for_cpu(codes, 1)[0, 0] >> 4)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 order (out, in / 2) uint8 -> codes (out, in) uint8 in 0..15 (see the module docstring)."""
    out_f, half = qweight.shape
    codes = torch.empty(out_f, 2 * half, dtype=torch.uint8, device=qweight.device)
    flat = qweight.reshape(-1)
    b = block_rows()
    full = out_f // b * b
    blocks = flat[:full * half].view(-1, 2 * half, b // 2)  # (blocks, in, B / 2): rows i, i + B / 2 of each block
    view = codes[:full].view(-1, 2, b // 2, 2 * half)  # (blocks, low / high, B / 2, in)
    view[:, 0] = (blocks & 15).transpose(1, 2)
    view[:, 1] = (blocks >> 4).transpose(1, 2)
    if full < out_f:  # the last block: rows 2j and 2j + 1 in one byte
        tail = flat[full * half:].view(2 * half, (out_f - full) // 2)  # (in, r / 2)
        codes[full::2] = (tail & 15).t()
        codes[full + 1::2] = (tail >> 4).t()
    return codes


def fused_mm(x: torch.Tensor, module: nn.Module, group: int, in_features: int, out_features: int) -> torch.Tensor:
    """x (..., in) @ W^T through torch's CPU kernel on `module`'s packed codes (its `qweight` and
    `scales_and_zeros`) -> (..., out) in x's dtype.

    The kernel is fast in bfloat16 only: in float32 it took 30-60x as long at one row and 65x at 268 (15 s
    for one 16384 x 2048 weight; dequantizing was slower still at one row). So a float32 model's rows go
    through it in bfloat16, with a bfloat16 copy of the scales and zeros (made once, remade if they
    change), and come back in float32: int4 on CPU computes in bfloat16 (benchmarks/NOTES.md, change 16)."""
    sz = module.scales_and_zeros
    if x.dtype == torch.float32:
        if getattr(module, "_bf16", None) is None or changed(sz, module._bf16_of):
            module._bf16, module._bf16_of = sz.bfloat16(), source(sz)
        sz = module._bf16
    rows = x.reshape(-1, x.shape[-1]).to(sz.dtype).contiguous()  # the kernel refuses strided rows (a prefill's last positions)
    if module.qweight.shape[1] * 2 != in_features:
        rows = F.pad(rows, (0, 2 * module.qweight.shape[1] - in_features))  # zero columns of the padded groups
    y = torch._weight_int4pack_mm_for_cpu(rows, module.qweight, group, sz)
    if len(module.qweight) != out_features:
        y = y[:, :out_features]  # the zero rows of the padding
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)


class Int4Linear(nn.Module):
    """y = x W^T + b with W as 4-bit codes and a scale and zero per `group` input features of each row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.bfloat16, device=None,
                 group: int = GROUP):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        in_p, out_p = in_features + -in_features % group, out_features + -out_features % 16  # see quantize_weight
        self.register_buffer("qweight", torch.empty(out_p, in_p // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_p // group, out_p, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    quantize_weight = staticmethod(quantize_weight)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (that of the model it was loaded into)."""
        return self.scales_and_zeros.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with (a new tensor): (q - 8) * scale + zero in
        float32, rounded once to `dtype` (default: the compute dtype)."""
        codes = unpack(self.qweight).view(len(self.qweight), -1, self.group).float()  # (out_p, groups, G)
        scale, zero = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out_p, groups) each
        w = ((codes - 8) * scale[..., None] + zero[..., None]).view(len(self.qweight), -1)
        return w[:self.out_features, :self.in_features].to(dtype or self.dtype)

    def fused(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == self.dtype and x.dtype in (torch.bfloat16, torch.float32) \
            and not (torch.is_grad_enabled() and x.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused(x):
            # training (the kernel has no backward), other devices and dtypes. Not prefill: the fused kernel
            # is ~2.5x slower than a bf16 matmul at 268 rows, but dequantizing alone (unpacking torch's
            # layout) took 4x longer than the fused kernel (benchmarks/NOTES.md, change 12, benchmarks/kernels.py)
            return dense_forward(self, x)
        y = fused_mm(x, self, self.group, self.in_features, self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """Dense view for analysis (a new tensor on every access): `dequantize()`."""
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"
