"""The whole idea of LoRA (Hu et al., 2021) in one module.

A frozen linear layer W gets a trainable low-rank detour:  y = W x + (alpha / r) * B A dropout(x),
with A (r x in) random and B (out x r) zero, so a freshly wrapped model computes exactly what it did.
rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead, which keeps updates from shrinking
as r grows. Merging folds B A into W for inference; it is always explicit, never a side effect.

QLoRA (Dettmers et al., 2023) is the same detour over a quantized frozen W: the base may be any layer
with `in_features`, `out_features`, a compute `dtype` and a `dequantize(dtype)` method giving its
dense weight (the int8 and
NF4 layers of paligemma/quantize.py, recognised by that shape so that this package imports nothing
of the model's). Such a base is never merged into: `export_merged` dequantizes, then adds B A.
Nor is any other base that is not a plain nn.Linear (a layer packed for inference hands out a dense
*copy* of its weight: adding B A to it would change nothing but mark the layer merged).
"""
import math

import torch
from torch import nn


def is_quantized(module: nn.Module) -> bool:
    return callable(getattr(module, "dequantize", None)) and hasattr(module, "in_features")


def is_linear(module: nn.Module) -> bool:
    """What LoRA can wrap: nn.Linear, or a quantized linear layer."""
    return isinstance(module, nn.Linear) or is_quantized(module)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base  # the original layer, kept as is (its weight is not copied)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the LoRA input only
        device = next(iter(base.state_dict().values())).device  # a quantized base holds buffers, not `weight`
        factory = dict(device=device, dtype=torch.float32)  # trainable weights stay float32
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        if device.type != "meta":
            self.reset_parameters()
        self.merged = False

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a = self.lora_A.weight
        detour = self.lora_B(self.lora_A(self.dropout(x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype))))
        return y + (detour * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """(out, in) weight update, computed in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge_refused(self, verb: str = "merge") -> str | None:
        """Why B A cannot be folded into (or out of) this base in place, or None when it can."""
        what = f"cannot {verb} {'into' if verb == 'merge' else 'from'} a"
        if is_quantized(self.base):
            return (f"{what} quantized base ({type(self.base).__name__}): B A would be rounded away; "
                    "lora.export_merged dequantizes and merges into a dense copy")
        if type(self.base) is not nn.Linear:  # e.g. paligemma's PackedLinear, whose `weight` is a copy
            return (f"{what} {type(self.base).__name__} base: only a plain nn.Linear, whose weight is the one its "
                    "forward reads (merge before packing, or load the model again without packing)")
        return None

    @torch.no_grad()
    def merge(self):
        if self.merge_refused():
            raise RuntimeError(self.merge_refused())
        if self.merged:
            raise RuntimeError("LoRA weights are already merged into the base layer")
        w = self.base.weight
        w.copy_((w.float() + self.delta()).to(w.dtype))  # one rounding to the base dtype
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("LoRA weights are not merged")
        if self.merge_refused():
            raise RuntimeError(self.merge_refused("unmerge"))
        w = self.base.weight
        w.copy_((w.float() - self.delta()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}, merged={self.merged}"
