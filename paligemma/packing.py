"""Faster CPU inference: linear weights reordered once into oneDNN's blocked layout.

A decode step at batch 1 is a chain of matrix-vector products: its speed is how fast the weights
stream from memory. torch's plain bf16 `F.linear` reaches about half of this machine's read
bandwidth at batch 1; the same oneDNN kernel on a weight it has reordered in advance reaches most
of it, with bit-identical results (measured in benchmarks/NOTES.md). This is what torch.compile's
CPU "freezing" does, here as an explicit, inference-only step:

    model = PaliGemma.from_pretrained(..., dtype=torch.bfloat16)
    pack(model)          # no autograd through packed layers; state_dict() still gives plain weights

The tied output head (257k x 2048 at 3B) is packed as a second copy beside the embedding table,
which lookups still read: +1 GB at 3B for about a fifth of every decode step's bytes.
"""
import torch
from torch import nn


class PackedLinear(nn.Module):
    """nn.Linear for inference with a oneDNN-reordered weight; saves as a plain `weight`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # hint: batch-1 decode
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (torch.is_grad_enabled() and x.requires_grad):
            raise RuntimeError("packed layers are for inference (model.eval()): load the model again to train it")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.packed.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def can_pack(model) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float32) and torch.backends.mkldnn.is_available()


def pack(model, head: bool = True):
    """Put `model` in eval mode and replace every nn.Linear (both towers, projector, the frozen base of
    LoRA layers) by a PackedLinear; give the tied output head a packed copy. Returns the model; a
    no-op off CPU."""
    if not can_pack(model):
        return model
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in ("lora_A", "lora_B"):  # rank-r detours stay plain
                setattr(module, child_name, PackedLinear(child.weight, child.bias))
    if head:  # kept out of the module tree: it must not appear in state_dict() or parameters()
        lm = model.language_model
        lm.__dict__["packed_head"] = PackedLinear(lm.model.embed_tokens.weight).eval()
    return model.eval()


