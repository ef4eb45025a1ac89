"""The dense path every quantized layer shares (quantize.py, int4.py): dequantize, then one matmul.

Used where no fused kernel applies: with gradients (QLoRA: the fused kernels have no backward), on
devices and dtypes the kernels do not take, and for many rows where dequantizing once is faster.
"""
import torch
import torch.nn.functional as F
from torch import nn


def dense_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize to the compute dtype (autocast's, if on), then one matmul."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    bias = None if layer.bias is None else layer.bias.to(dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return DequantizedLinear.apply(x.to(dtype), layer, bias)
    return F.linear(x.to(dtype), layer.dequantize(dtype), bias)


class DequantizedLinear(torch.autograd.Function):
    """y = x W^T for a frozen quantized W, which backward dequantizes again instead of autograd keeping
    the dense copy: saved, the dense weights of every layer would take back all the memory that
    quantizing saved (QLoRA's kernels recompute it too). Only x's gradient flows; W and b are frozen."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):  # grad (…, out) -> (…, in)
        return grad @ ctx.layer.dequantize(grad.dtype), None, None
