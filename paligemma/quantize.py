"""Quantized linear layers, swapped in after the model is built (as gpt-fast's quantize.py does).

    model = PaliGemma.from_pretrained(path, dtype=torch.bfloat16)
    quantize.quantize(model, "int8")            # or "int4", "nf4"; or from_pretrained(..., quantize="int8")

Three formats, each weight stored small and turned back into a dense weight (or fed to a fused
kernel) when a layer runs.

- int8 (LLM.int8's per-channel absmax, without its outlier split): one float scale per output row,
  W[o, :] ~= scale[o] * q[o, :], q in [-127, 127]. Half the bytes of bf16. On CPU without
  gradients the rows run through fbgemm's int8 x uint8 kernel (activations rounded to 8 bits per call:
  FbgemmInt8), decode and prefill alike: the fastest int8 kernel measured at 1 to 268 rows
  (benchmarks/NOTES.md, change 12).
- nf4 (QLoRA, Dettmers et al. 2023, section 3): the weight, flattened, is cut into blocks of 64;
  each block is divided by its absmax and every value replaced by the nearest of 16 "NormalFloat"
  levels, the quantiles of a standard normal (the shape of trained weights), stored as 4-bit
  codes, two per byte. A quarter of the bytes of bf16 plus one float32 absmax per 64 values
  (+0.5 bit a weight; "double quantization" stores the absmaxes themselves in 8 bits: +0.127 bit).
  Dequantized per forward: on a GPU this is how QLoRA trains; on a CPU without a fused 4-bit
  kernel it costs more time than the bytes it saves (NOTES.md).
- int4 (gpt-fast's / torchao's, paligemma/int4.py): 4-bit codes with a scale and a zero per group of
  64 input features, fed to torch's fused CPU kernel: the fastest batch-1 decoder here; for inference.

What stays unquantized, and why:
- norms, biases, SigLIP's patch and position embeddings: vectors and a conv, < 0.1 % of the bytes;
- `embed_tokens`: a lookup reads 1 row per token, so its bytes do not limit anything; it is also
  the tied output head, which reads all of it every step: `head=True` adds a quantized copy for the
  logits (Int8Head for int8, Int4Head for int4 and nf4), as packing.py adds a packed one;
- LoRA's `lora_A` / `lora_B`: they are what trains (float32).
"""
import functools
import itertools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .dequantize import dense_forward
from .gemma import TiedHead, changed, source
from . import int4
from .int4 import GROUP, Int4Linear

MODES = ("int8", "int4", "nf4")
NF4_BLOCK = 64  # values per absmax (QLoRA's block size)
DQ_BLOCK = 256  # absmaxes per second-level scale (QLoRA's double quantization)
ROWS = 4096  # rows quantized at a time: the float32 temporaries stay ~32 MB at 3B widths
NF4_CHUNK = 2 ** 20  # values dequantized at a time: 4 MB of float32 stays in cache (2.5x faster than all at once)
FUSED_ROWS = 16  # matrix-vector kernels (torch._weight_int8pack_mm; the int8 head's): past ~16 rows a matmul wins


def nf4_levels() -> torch.Tensor:
    """QLoRA's 16 NormalFloat levels (Appendix E), built the way the paper describes.

    8 quantiles of N(0, 1) on the positive side and 7 on the negative side (so that 0 is exactly
    representable, for zero-padding and sparse weights), normalised into [-1, 1]. `offset`
    is the middle of 1 - 1/(2*15) and 1 - 1/(2*16): the outermost quantile, which would be
    infinite at 1 itself.
    """
    offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    f64 = dict(dtype=torch.float64, device="cpu")  # on the CPU whatever the default device: MPS has no float64
    ppf = lambda p: torch.special.ndtri(torch.tensor(p, **f64))  # noqa: E731
    pos = ppf(torch.linspace(offset, 0.5, 9, **f64)[:-1].tolist())  # 8 values > 0
    neg = -ppf(torch.linspace(offset, 0.5, 8, **f64)[:-1].tolist())  # 7 values < 0
    levels = torch.cat([neg, torch.zeros(1, **f64), pos]).sort().values
    return (levels / levels.max()).float()


NF4 = nf4_levels()  # (16,) float32, on the CPU
# every byte -> its two levels (high nibble first): dequantizing is then one gather per byte. The pair
# is read as one 8-byte item, which CPU index_select gathers ~1.7x faster than (256, 2) rows; as an
# int64, not a float64, so that the table moves to any device (MPS has no float64).
NF4_PAIRS = torch.stack([NF4.repeat_interleave(16), NF4.repeat(16)], dim=1)  # (256, 2) float32
NF4_PAIRS_AS_ONE = NF4_PAIRS.view(torch.int64).view(-1)  # (256,): the same bytes, 8 per item


class FbgemmInt8:
    """Mixin for a module with int8 `qweight` (out, in) and `scales` (out,) buffers: rows (CPU, no
    gradients) through fbgemm's dynamic int8 linear.

    fbgemm quantizes the activations on every call, per tensor, to uint8 with a zero point (scale =
    (max(x, 0) - min(x, 0)) / 255), multiplies uint8 by int8 into int32 (VPDPBUSD) and scales back to
    float32: int8 weights read at bf16's bandwidth, 1.8x torch._weight_int8pack_mm's speed at one row,
    2.2x at 8 (benchmarks/kernels.py, benchmarks/NOTES.md, change 12). What it costs is the activations' rounding,
    measured on captions in tests/test_quantize_quality.py (which decodes 64 rows at a time: per tensor
    is per row only at batch 1; a batch's rows, or a prefill's tokens, share one scale).

    fbgemm's packed copy is made at the first call (or by `pack()`) and from then on holds the only copy of the
    int8 weights (two would add the int8 model's size to the memory): `qweight` becomes None, `int8()`
    unpacks (linear_unpack: the same bytes back, tested), and state_dict(), load_state_dict() and
    `.to()` / casts put the buffer back first; the packed object is no tensor, `.to()` would not see it.

    torch.ops.quantized.linear_prepack / linear_dynamic are the ops under torch.ao's eager dynamic
    quantization, which torch marks deprecated (moving to torchao). On a torch without them, what
    replaces them: torchao's Int8DynamicActivationInt8WeightConfig (the same math: int8 weights per
    row, activations per tensor at run time), or oneDNN's torch.ops.onednn.qlinear_pointwise, which
    inductor's x86 quantization uses (measured level with fbgemm at 8 rows, 1.8x slower at 1).
    `fbgemm_ready` is the one place that decides; where it says no, torch._weight_int8pack_mm runs.
    """
    _fbgemm = None  # fbgemm's packed weights, once made
    _number = None  # and their number in PACKED, for a compiled step

    def int8(self) -> torch.Tensor:
        """(out, in) int8: the buffer, or unpacked from fbgemm's copy (a new tensor)."""
        if self._fbgemm is None:
            return self.qweight
        return torch.ops.quantized.linear_unpack(self._fbgemm)[0].int_repr()

    def decode_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) in the scales' dtype -> (rows, out), through fbgemm where it can run."""
        if torch.compiler.is_compiling() and self._number is not None:  # packed by generation.compiled_step
            return fbgemm_int8(x.float(), self._number, len(self.scales), REDUCE_RANGE).to(x.dtype)
        if not fbgemm_ready():
            return torch._weight_int8pack_mm(x, self.qweight, self.scales)  # reads int8 at half bf16's bandwidth
        if self._fbgemm is None:
            self.pack()
        return torch.ops.quantized.linear_dynamic(x.float(), self._fbgemm, REDUCE_RANGE).to(x.dtype)

    def pack(self):
        """Make fbgemm's packed copy, which from then on holds the only copy of the int8 weights, and
        give it its number in PACKED."""
        if self._fbgemm is None and fbgemm_ready():
            with warnings.catch_warnings():  # torch.ao's deprecation notice, answered in the docstring
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
                q = torch._make_per_channel_quantized_tensor(self.qweight, self.scales.float(),
                                                            torch.zeros(len(self.scales), dtype=torch.long), 0)
            self._fbgemm = torch.ops.quantized.linear_prepack(q, None)
            self._buffers["qweight"] = None  # fbgemm's copy is the only one now
        if self._fbgemm is not None and PACKED.get(self._number) is not self:  # new, or a copy of a packed layer
            self._number = next(_NUMBERS)
            PACKED[self._number] = self

    def unpack(self) -> torch.Tensor:
        """Put the int8 weights back into the `qweight` buffer (and drop fbgemm's copy); -> qweight."""
        if self._fbgemm is not None:
            self._buffers["qweight"], self._fbgemm = self.int8(), None
            PACKED.pop(self._number, None)
            self._number = None
        return self.qweight

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: the buffer must be there to be moved
        self.unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        packed = self._fbgemm is not None
        if packed:
            self._buffers["qweight"] = self.int8()  # in place, so that the keys keep their order
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if packed:
            self._buffers["qweight"] = None

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpack()
        super()._load_from_state_dict(*args, **kwargs)


@functools.cache
def fbgemm_ready() -> bool:
    """fbgemm's ops are there and the quantized engine is x86's (which runs linear on fbgemm)."""
    return hasattr(torch.ops.quantized, "linear_dynamic") and torch.backends.quantized.engine in ("x86", "fbgemm")


def reduce_range() -> bool:
    """7-bit activations where the CPU has no VNNI: without it fbgemm adds pairs of uint8 x int8 products
    in int16 (VPMADDUBSW), which two 8-bit products can overflow; VNNI adds them in int32."""
    return not torch.cpu._is_vnni_supported()


REDUCE_RANGE = reduce_range()  # a constant, so that a compiled step reads no CPU query

# torch.compile cannot trace fbgemm's packed weights (a TorchScript object: dynamo stops at "Failed to
# convert args/kwargs to proxy"), so a compiled decode step (generation.compiled_step, which packs
# every layer first) reaches them through this op, by the number each layer got when it packed.
# Eager calls go to fbgemm directly. Measured at 3B, batch 1: compiled / eager 0.92-1.08x: on CPU this makes
# `compile=True` work with int8, not faster (the step is fbgemm's products, and this op's Python wrapper, 66 us
# a call, costs about what inductor saves on the small ops; benchmarks/NOTES.md, changes 14 and 15).
PACKED = weakref.WeakValueDictionary()  # number -> the FbgemmInt8 module that holds them
_NUMBERS = itertools.count()


@torch.library.custom_op("paligemma::fbgemm_int8", mutates_args=())
def fbgemm_int8(x: torch.Tensor, number: int, out_features: int, reduce_range: bool) -> torch.Tensor:
    """x (rows, in) float32 -> (rows, out) float32: fbgemm's dynamic int8 linear of layer PACKED[number]."""
    return torch.ops.quantized.linear_dynamic(x, PACKED[number]._fbgemm, reduce_range)


@fbgemm_int8.register_fake
def _(x, number, out_features, reduce_range):
    return x.new_empty(x.shape[0], out_features)


class Int8Linear(FbgemmInt8, nn.Module):
    """y = x (scale * q)^T + b with q int8 (out, in) and one scale per output row.

    Scales are stored in the compute dtype and q is rounded against the stored scale, so that
    `dequantize()` is exactly the weight this layer computes with on the dense path (the tests rely on
    it). On CPU without gradients every row count goes through fbgemm (FbgemmInt8: activations
    rounded to 8 bits too): it was the fastest int8 kernel at 1, 8, 16 and 268 rows, and dequantizing
    for a bf16 matmul would need the int8 weights unpacked from fbgemm's copy, which alone took longer
    than the whole fbgemm prefill (benchmarks/kernels.py, benchmarks/NOTES.md, change 12). Where fbgemm is not
    there: <= FUSED_ROWS rows torch._weight_int8pack_mm, more dequantize + one matmul.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @staticmethod
    def quantize_weight(w: torch.Tensor) -> dict:
        """(out, in) float -> {"qweight": int8 (out, in), "scales": (out,) in w's dtype}, ROWS rows at a time."""
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scales = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
        for i in range(0, w.shape[0], ROWS):
            rows = w[i:i + ROWS].float()
            s = (rows.abs().amax(dim=1) / 127).clamp(min=1e-12).to(w.dtype)  # an all-zero row keeps q = 0
            scales[i:i + ROWS] = s
            q[i:i + ROWS] = (rows / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with (a new tensor)."""
        w = self.int8().to(self.scales.dtype) * self.scales[:, None]
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if decodes(x, self.scales) and (rows <= FUSED_ROWS or fbgemm_ready()):
            y = self.decode_rows(x.reshape(rows, self.in_features)).view(*x.shape[:-1], self.out_features)  # (…, out)
            return y if self.bias is None else y + self.bias
        return dense_forward(self, x)  # training (the kernels have no backward), other devices; prefill without fbgemm

    @property
    def weight(self) -> torch.Tensor:
        """Dense view for analysis (a new tensor on every access): `dequantize()`."""
        return self.dequantize()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (that of the model it was loaded into)."""
        return self.scales.dtype

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def decodes(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """The int8 decode kernels apply: CPU, activations in the scales' dtype, no gradient wanted."""
    return x.device.type == "cpu" and x.dtype == scales.dtype and x.dtype in (torch.bfloat16, torch.float32) \
        and not (torch.is_grad_enabled() and x.requires_grad)


class NF4Linear(nn.Module):
    """y = x W^T + b with W held as 4-bit NormalFloat codes (two per byte) and a float32 absmax per
    64 values; with `double_quant`, the absmaxes are stored as int8 around their mean, one float32
    scale per 256 of them."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.bfloat16, device=None,
                 double_quant: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.double_quant = in_features, out_features, double_quant
        self.dtype = dtype  # what it computes in: the dtype of the model it was loaded into
        n_blocks = -(-in_features * out_features // NF4_BLOCK)
        self.register_buffer("qweight", torch.empty(n_blocks * NF4_BLOCK // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_q", torch.empty(n_blocks, dtype=torch.int8, device=device))
            self.register_buffer("absmax_scale", torch.empty(-(-n_blocks // DQ_BLOCK), device=device))
            self.register_buffer("absmax_mean", torch.empty((), device=device))
        else:
            self.register_buffer("absmax", torch.empty(n_blocks, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @staticmethod
    def quantize_weight(w: torch.Tensor, double_quant: bool = False) -> dict:
        """(out, in) float -> {"qweight": uint8 (numel/2,), "absmax": float32 (numel/64,)} (or the
        double-quantized absmax). The flat weight is zero-padded to whole blocks."""
        flat = w.reshape(-1)
        n_blocks = -(-flat.numel() // NF4_BLOCK)
        qweight = torch.empty(n_blocks * NF4_BLOCK // 2, dtype=torch.uint8, device=w.device)
        absmax = torch.empty(n_blocks, device=w.device)
        midpoints = (NF4[1:] + NF4[:-1]).to(w.device) / 2  # a value maps to the nearest level
        step = ROWS * NF4_BLOCK * 32  # blocks per chunk
        for i in range(0, flat.numel(), step):
            chunk = flat[i:i + step].float()
            chunk = F.pad(chunk, (0, -chunk.numel() % NF4_BLOCK)).view(-1, NF4_BLOCK)  # (blocks, 64)
            m = chunk.abs().amax(dim=1)
            codes = torch.bucketize(chunk / m.clamp(min=1e-12)[:, None], midpoints, out_int32=True).to(torch.uint8)  # 0..15
            codes = codes.view(-1, 2)
            b = i // NF4_BLOCK
            absmax[b:b + m.numel()] = m
            qweight[b * NF4_BLOCK // 2:(b + m.numel()) * NF4_BLOCK // 2] = (codes[:, 0] << 4) | codes[:, 1]
        if not double_quant:
            return {"qweight": qweight, "absmax": absmax}
        mean = absmax.mean()
        centred = F.pad(absmax - mean, (0, -n_blocks % DQ_BLOCK)).view(-1, DQ_BLOCK)
        scale = (centred.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = (centred / scale[:, None]).round().clamp(-127, 127).to(torch.int8).view(-1)[:n_blocks]
        return {"qweight": qweight, "absmax_q": q, "absmax_scale": scale, "absmax_mean": mean}

    def block_absmax(self) -> torch.Tensor:
        """(blocks,) float32 absmax per 64 values."""
        if not self.double_quant:
            return self.absmax
        scale = self.absmax_scale.repeat_interleave(DQ_BLOCK)[:self.absmax_q.numel()]
        return self.absmax_q.float() * scale + self.absmax_mean

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with (a new tensor): level * absmax in float32,
        rounded once to `dtype` (default: the dtype the model was loaded in).

        Written into the output NF4_CHUNK values at a time: whole-layer temporaries (float32 levels, an
        int32 index) would add 3x the bf16 weight's bytes at the peak of every QLoRA step (16384 x 2048
        forward + backward: +217 MB that way, +102 MB chunked, of which 64 MB is the bf16 weight)."""
        n = self.in_features * self.out_features
        w = torch.empty(n, dtype=dtype or self.dtype, device=self.qweight.device)
        table, absmax = NF4_PAIRS_AS_ONE.to(w.device), self.block_absmax()
        for i in range(0, n, NF4_CHUNK):
            codes = self.qweight[i // 2:(i + NF4_CHUNK) // 2]  # two values per byte
            levels = table.index_select(0, codes.int()).view(torch.float32).view(-1, NF4_BLOCK)  # (blocks, 64)
            levels.mul_(absmax[i // NF4_BLOCK:i // NF4_BLOCK + levels.shape[0], None])  # a new tensor: in place
            w[i:i + NF4_CHUNK] = levels.view(-1)[:n - i]  # the last block's padding is dropped
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_forward(self, x)

    @property
    def weight(self) -> torch.Tensor:
        """Dense view for analysis (a new tensor on every access): `dequantize()`."""
        return self.dequantize()

    def extra_repr(self) -> str:
        dq = ", double quantization" if self.double_quant else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocks of {NF4_BLOCK}{dq}"


def options(mode: str, double_quant: bool = False, group: int = GROUP) -> dict:
    """The keyword arguments of `mode`'s layer and quantize_weight beyond the weight itself."""
    return {"nf4": dict(double_quant=double_quant), "int4": dict(group=group)}.get(mode, {})


def layer_options(q: nn.Module) -> dict:
    return {"double_quant": q.double_quant} if isinstance(q, NF4Linear) else \
        {"group": q.group} if isinstance(q, Int4Linear) else {}


def quantized_linear(linear: nn.Linear, mode: str, double_quant: bool = False, group: int = GROUP) -> nn.Module:
    """The quantized form of one nn.Linear (built on its device; on `meta`, empty, for loading)."""
    w = linear.weight
    kwargs = dict(dtype=w.dtype, device=w.device) | options(mode, double_quant, group)
    q = LAYERS[mode](linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
    if w.device.type != "meta":
        fill(q, {"weight": w.detach(), **({"bias": linear.bias.detach()} if linear.bias is not None else {})})
    return q


def fill(q: nn.Module, dense: dict):
    """Set a quantized layer's buffers from a dense {"weight", "bias"} (assigning, as loading does)."""
    parts = type(q).quantize_weight(dense["weight"], **layer_options(q))
    if "bias" in dense:
        parts["bias"] = nn.Parameter(dense["bias"], requires_grad=False)
    for name, t in parts.items():
        setattr(q, name, t)


LAYERS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}


def targets(model: nn.Module, skip=()) -> list[str]:
    """Names of the nn.Linear layers `quantize` would replace: all but LoRA's own and `skip` (a regex
    matched against the whole name, or a list of names / name suffixes: lora.inject's rule, lora.matches)."""
    from lora import matches
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n.rpartition(".")[2] not in ("lora_A", "lora_B") and not (skip and matches(n, skip))]


def check(model: nn.Module, mode: str):
    if mode not in MODES:
        raise ValueError(f"quantize: mode {mode!r}; expected one of {MODES}")
    p = next(model.parameters())
    if p.dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"quantize: the model is in {p.dtype}; load it in bfloat16, float16 or float32 first")


def quantize(model: nn.Module, mode: str, skip=(), head: bool = False, double_quant: bool = False,
             group: int = GROUP) -> nn.Module:
    """Replace nn.Linear layers (both towers, projector, decoder; see `targets`) by their `mode`
    form, in place; `head=True` also gives the tied output head a quantized copy (`quantized_head`).
    Returns the model. `double_quant`: NF4's absmaxes in 8 bits; `group`: int4's input features per
    scale and zero."""
    check(model, mode)
    from .packing import PackedLinear
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("quantize: the model's linear layers are packed for CPU inference (inference=True or "
                         "packing.pack), which quantize does not replace: load it without inference=True, or pass "
                         "quantize= to from_pretrained")
    for name in targets(model, skip):
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(parent)
        setattr(module, child, quantized_linear(getattr(module, child), mode, double_quant, group))
    if head:
        quantized_head(model, mode)
    return model


def quantized_head(model: nn.Module, mode: str):
    """Replace the tied output head by one that decodes from its own quantized copy of the embedding table
    (the table itself stays, for lookups): Int8Head for int8; Int4Head for the weight-only 4-bit modes,
    int4 and nf4, whose logits then stay weight-only too (fbgemm's int8 head rounds the activations of a
    batch's rows with one scale, so a row's tokens would depend on its neighbours)."""
    lm = model.language_model
    lm.lm_head = (Int8Head if mode == "int8" else Int4Head)(lm.lm_head, lm.model.embed_tokens.weight)


class Int8Head(FbgemmInt8, TiedHead):
    """The tied head from its own int8 copy of the embedding table (V, D), for decoding: at 3B the head
    is a fifth of each step's bytes, and int8 halves them. The copy is held in buffers that are not
    saved (`model.to()` moves them; state_dict() still has no head key), and made again if the table
    changes (a load_state_dict()). Decode rows go through fbgemm (FbgemmInt8), soft-capped after, as
    TiedHead caps; prefill and training (many rows, or gradients) use the table passed in, as TiedHead does."""

    def __init__(self, head: TiedHead, embedding: torch.Tensor):
        super().__init__(head.softcap)
        self.copy_of(embedding)

    def copy_of(self, embedding: torch.Tensor):
        if self._fbgemm is not None:  # fbgemm's packed copy of the old table
            PACKED.pop(self._number, None)
            self._fbgemm, self._number = None, None
        parts = Int8Linear.quantize_weight(embedding.detach())
        self.register_buffer("qweight", parts["qweight"], persistent=False)  # (V, D) int8
        self.register_buffer("scales", parts["scales"], persistent=False)  # (V,)
        self._source = source(embedding)

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = h.numel() // h.shape[-1]
        if rows <= FUSED_ROWS and decodes(h, self.scales):
            if changed(weight, self._source):
                self.copy_of(weight)
            logits = self.decode_rows(h.reshape(rows, -1))  # (rows, V)
            return self.cap(logits.view(*h.shape[:-1], -1))  # (..., V)
        return super().forward(h, weight)


class Int4Head(TiedHead):
    """The tied head from its own int4 copy of the embedding table (groups of 64, int4.py), for decoding:
    a quarter of bf16's bytes, weight-only (each row's logits its own), at least as fast as the int8
    copy at 3B (benchmarks/NOTES.md, change 16). Non-persistent buffers, remade if the table changes,
    as Int8Head's; prefill and training use the table passed in."""

    def __init__(self, head: TiedHead, embedding: torch.Tensor):
        super().__init__(head.softcap)
        self.copy_of(embedding)

    def copy_of(self, embedding: torch.Tensor):
        for k, v in int4.quantize_weight(embedding.detach(), GROUP).items():
            self.register_buffer(k, v, persistent=False)  # qweight (V, D / 2) uint8, scales_and_zeros (D / 64, V, 2)
        self._source = source(embedding)

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = h.numel() // h.shape[-1]
        if rows <= FUSED_ROWS and decodes(h, self.scales_and_zeros):
            if changed(weight, self._source):
                self.copy_of(weight)
            return self.cap(int4.fused_mm(h, self, GROUP, *weight.shape[::-1]))
        return super().forward(h, weight)


def converter(model: nn.Module, mode: str, skip=(), double_quant: bool = False, group: int = GROUP):
    """For weights.py, quantizing while loading: a function (name, tensor) -> {name: tensor} that
    turns the weight of every layer `quantize` would replace into that layer's buffers as soon as it
    is read, so that no dense copy of the model exists. `model` is the dense model on `meta`."""
    check(model, mode)
    layers = {f"{n}.weight": n for n in targets(model, skip)}

    def convert(name: str, tensor: torch.Tensor) -> dict:
        layer = layers.get(name)
        if layer is None:
            return {name: tensor}
        parts = LAYERS[mode].quantize_weight(tensor, **options(mode, double_quant, group))
        return {f"{layer}.{k}": v for k, v in parts.items()}
    return convert
