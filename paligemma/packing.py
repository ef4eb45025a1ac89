"""Faster CPU inference: linear weights reordered into oneDNN's blocked layout.

A decode step at batch 1 is a chain of matrix-vector products: its speed is how fast the weights
stream from memory. torch's plain bf16 `F.linear` reaches about half of this machine's read
bandwidth at batch 1; the same oneDNN kernel on a weight it has reordered in advance reaches most
of it, and the layout chosen here also runs a 268-row prefill ~1.7x faster than the plain weight
(measured in benchmarks/NOTES.md), with the same bits in bf16 (tests/test_packing.py; in float32 a
few-row product takes another oneDNN kernel and may differ in the last bit). This is what
torch.compile's CPU "freezing" does, here as an inference-only step that swaps modules, as gpt-fast's
quantize.py does (on a built model, or while weights.py loads one: `converter`); the model's own
files never learn about it:

    model = PaliGemma.from_pretrained(..., dtype=torch.bfloat16)
    pack(model)          # no autograd through packed layers; state_dict() still gives plain weights

A reorder is a copy of the weight into fresh memory, which costs seconds at 3B: more than one short
caption saves. So `from_pretrained(..., inference=True)` packs what it must copy anyway (weights
converted from a float32 file) as it loads them; each other layer computes one-row products (batch-1
decode steps) with torch.mv on its plain weight, as fast as packed, and packs itself on its AFTER-th
product with more rows (below); `pack(model)` packs everything at once.

The tied output head (257k x 2048 at 3B) gets a packed copy beside the embedding table, which
lookups still read: +1 GB at 3B for about a fifth of every decode step's bytes.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .gemma import TiedHead, changed, source
from .safetensors_io import drop_file_pages, mapped


# The row count oneDNN chooses the blocked layout for. A prefill's (~256 image tokens + prompt), not a
# decode step's 1: measured at 3B shapes (benchmarks/NOTES.md, change 10), this layout is also the
# faster one at 1 and 8 rows, while the batch-1 layout made a 268-row prefill 2.5x slower.
ROWS_HINT = 256

# from_pretrained(inference=True) packs a layer read as a view of a bf16 file on its AFTER-th call with
# more than one row (PackedLinear): one-row calls already run at the packed speed through torch.mv, so
# the reorder (a fresh copy of the weight, ~60 ms for 16384 x 2048 here) is won back only by multi-row
# products: a 268-row prefill saves ~10 ms on that weight, a batch-8 decode step ~2 ms. A one-off
# caption never pays for it; a run over many images packs once, early. A weight that must be converted
# anyway (a float32 file) is packed as it loads: no extra cost.
AFTER = 8


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def _check_inference(x: torch.Tensor, training: bool):
    if training or (torch.is_grad_enabled() and x.requires_grad):
        raise RuntimeError("packed layers are for inference (model.eval()): load the model again to train it")


def _one_row(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """(..., in) holding one row -> (..., out), as a matrix-vector product."""
    v = x.reshape(-1)
    y = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)
    return y.view(*x.shape[:-1], -1)


def _rent(layer, x: torch.Tensor, weight: torch.Tensor, bias):
    """A not-yet-packed layer's product with its plain weight: one row through torch.mv (not counted),
    more rows through F.linear while `layer.calls_left` lasts. None when it is time to pack."""
    _check_inference(x, layer.training)
    if x.numel() == x.shape[-1]:
        return _one_row(x, weight, bias)
    layer.calls_left -= 1
    return F.linear(x, weight, bias) if layer.calls_left > 0 else None


def _stay_on_cpu(module: nn.Module, fn):
    """nn.Module._apply (every .to(), .cuda(), .float() ...) on a packing layer: oneDNN's blocked weights
    exist only on the CPU in their own dtype, and they are plain attributes that .to() would silently
    leave behind. So a move or a cast is refused by name; .to("cpu") in the same dtype passes."""
    dtype = next((t.dtype for t in (getattr(module, "packed", None), getattr(module, "plain", None))
                  if isinstance(t, torch.Tensor)), getattr(module, "dtype", torch.bfloat16))
    probe = fn(torch.zeros(1, dtype=dtype))
    if probe.device.type != "cpu" or probe.dtype != dtype:
        raise RuntimeError(f"{type(module).__name__}: packed for CPU inference in {dtype} (packing.py); it cannot "
                           f"move to {probe.device} / {probe.dtype}: load the model again without inference=True "
                           "(or before pack()) to move or cast it")


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias, training: bool) -> torch.Tensor:
    _check_inference(x, training)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


class PackedLinear(nn.Module):
    """nn.Linear for inference with a oneDNN-reordered weight; saves as a plain `weight`.

    With `after` > 0 it starts plain and reorders its weight on its `after`-th call with more than one
    row (then frees the plain one): ski rental, see AFTER. Until then a one-row input (a batch-1
    decode step) goes through torch.mv, which streams the plain weight about as fast as the packed
    kernel does (F.linear's one-row path is 1.2-1.7x slower here), and does not count."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: torch.Tensor | None = None,
                 after: int = 0):
        """`packed`: `weight` already reordered (while loading); `weight` then only gives the shape."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # plain attributes: neither the blocked layout nor the countdown is a checkpoint format
        self.packed, self.plain, self.calls_left = packed, weight.detach(), after
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        if packed is not None or after <= 0:
            self._pack(packed)

    def _pack(self, packed=None):
        self.packed = _reorder(self.plain) if packed is None else packed
        drop_file_pages(self.plain)  # a weight mapped from a bf16 file: its pages are not needed now
        self.plain = None

    @property
    def weight(self) -> torch.Tensor:
        """(out, in): the plain weight, or a dense copy of the packed one made on demand (for analysis and
        saving, not for the forward)."""
        return self.plain if self.packed is None else self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            y = _rent(self, x, self.plain, self.bias)
            if y is not None:
                return y
            self._pack()
        return _packed_linear(x, self.packed, self.bias, self.training)

    def _apply(self, fn, recurse=True):
        _stay_on_cpu(self, fn)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """load_state_dict() of the `weight` state_dict() gives: checked, then packed again (or kept plain
        while the countdown runs); the bias loads as a parameter does."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "weight"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        w = state_dict[key]
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, the packed "
                              f"layer has {(self.out_features, self.in_features)}")
            return
        dtype = self.plain.dtype if self.packed is None else self.packed.dtype
        w = w.detach().to("cpu", dtype)
        if self.packed is None:
            self.plain = w
        else:
            self.packed = _reorder(w)

    def plain_module(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight, requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        state = "packed" if self.packed is not None else f"packed after {self.calls_left} more calls"
        return f"in_features={self.in_features}, out_features={self.out_features}, {state}"


class PackedHead(TiedHead):
    """The tied head with its own packed copy of the embedding table (made on the `after`-th call with
    more than one row, as PackedLinear's); until then, and for lookups always, the table passed in."""

    def __init__(self, head: TiedHead, embedding: torch.Tensor, after: int = 0):
        super().__init__(head.softcap)
        self.packed, self.calls_left = None, after  # (V, D) blocked; not in state_dict(), which has no head key
        self.dtype = embedding.dtype  # what _stay_on_cpu allows before the copy exists
        if after <= 0:
            self.copy_of(embedding)

    def copy_of(self, embedding: torch.Tensor):
        self.packed, self._source = _reorder(embedding), source(embedding)

    def _apply(self, fn, recurse=True):
        _stay_on_cpu(self, fn)
        return super()._apply(fn, recurse)

    def plain_module(self) -> TiedHead:
        return TiedHead(self.softcap)

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            logits = _rent(self, h, weight, None)
            if logits is not None:
                return self.cap(logits)
            self.copy_of(weight)
        elif changed(weight, self._source):  # the table changed (a load_state_dict): the copy is stale
            self.copy_of(weight)
        return self.cap(_packed_linear(h, self.packed, None, self.training))


def packable(device, dtype: torch.dtype) -> bool:
    """oneDNN packs float32 on any CPU it runs on, bfloat16 only where the CPU converts bf16 itself
    (AVX512 BW / VL / DQ or AVX-NE-CONVERT; not an AVX2-only CPU, where the reorder raises): layers that
    cannot pack stay plain, the same function at plain speed."""
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or dtype == torch.bfloat16 and bf16_packs())


@functools.cache
def bf16_packs() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (its reorder and matmuls; also what --amp auto asks)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def can_pack(model) -> bool:
    p = next(model.parameters())
    return packable(p.device, p.dtype)


def _linear_names(model) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def converter(model):
    """For weights.py, packing while loading `model` (built on `meta`): (convert, transient, packed).
    convert(name, tensor) reorders each linear weight as soon as it is read into `packed`
    (name -> packed tensor, for pack()) and leaves a meta placeholder in the state, so neither a
    plain copy of the model nor a second pass over it is ever made; `transient`: those names (a
    float32 file's weight is converted into one reused buffer before its reorder)."""
    names = frozenset(f"{n}.weight" for n in _linear_names(model))
    packed = {}

    def convert(name: str, tensor: torch.Tensor) -> dict:
        if name not in names or mapped(tensor):  # a view of a bf16 file: copying it now costs, packing lazily pays
            return {name: tensor}
        packed[name] = _reorder(tensor)
        return {name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")}
    return convert, names, packed


def unpack(model):
    """The inverse of pack(): every PackedLinear back to an nn.Linear (its dense weight), a PackedHead
    back to a TiedHead; for torch.compile, which cannot trace the blocked layout. A no-op on a plain model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (PackedLinear, PackedHead)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.plain_module())
    return model


def pack(model, head: bool = True, packed: dict | None = None, after: int = 0):
    """Put `model` in eval mode and replace every nn.Linear (both towers, projector, the frozen base and
    the rank-r matrices of LoRA layers) by a PackedLinear, and the output head by a PackedHead.
    Returns the model; a no-op off CPU. `packed`: weights already reordered while loading
    (`converter`), by state-dict name. The others are reordered now (`after` = 0; layers already
    swapped but still counting down are packed now too), or each on its `after`-th call.

    One layer at a time: only module names are listed up front, so each plain weight is freed as soon
    as its packed copy replaces it, and the transient memory is one linear layer, plus the head's
    packed copy (V x D) that stays."""
    packed = {} if packed is None else packed
    if not packed and not can_pack(model):
        return model
    for name in _linear_names(model):
        parent, _, child = name.rpartition(".")
        parent = model.get_submodule(parent)
        linear = getattr(parent, child)
        setattr(parent, child, PackedLinear(linear.weight, linear.bias, packed.pop(f"{name}.weight", None), after))
        del linear
    if after <= 0:
        for m in model.modules():
            if isinstance(m, PackedLinear) and m.packed is None:
                m._pack()
    lm, table = model.language_model, model.language_model.model.embed_tokens.weight
    if head and type(lm.lm_head) is TiedHead:
        lm.lm_head = PackedHead(lm.lm_head, table, after)
    elif head and after <= 0 and isinstance(lm.lm_head, PackedHead) and lm.lm_head.packed is None:
        lm.lm_head.copy_of(table)  # still counting down: packed now, not copied a second time
    return model.eval()
