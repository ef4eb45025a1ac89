"""Scaled dot-product attention for both towers: one function, one softmax.

Axes: B batch, H query heads, K key/value heads (K divides H; G = H / K query heads share one
key/value head: multi-query when K = 1, grouped-query otherwise), T queries, S keys (the sequence
itself, or the KV cache's slots while decoding), hd head dimension.

The maths is always softmax(mask(softcap(q k^T * scale))) v with the softmax in float32. Which
kernel computes it is chosen here, and only here:
- torch's fused SDPA when there is no soft-cap (SigLIP; Gemma 1 prefill), since SDPA cannot
  soft-cap its scores;
- otherwise the scores spelled out, with the G query heads of each key/value head stacked into
  the rows of one matmul against that head's keys (Gemma 2 prefill, and every one-token decode
  step: CPU SDPA spends 3-15x longer than this on a single query row, benchmarks/NOTES.md).
"""
import torch
import torch.nn.functional as F


def attention(q, k, v, mask=None, scale=None, softcap=None) -> torch.Tensor:
    """q (B, H, T, hd); k, v (B, K, S, hd); mask (B, 1, T, S) bool, True = may attend, or None
    -> (B, H, T, hd)."""
    B, H, T, hd = q.shape
    K = k.shape[1]
    if softcap is None and T > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=K != H)
    G = H // K
    scale = hd ** -0.5 if scale is None else scale
    q = q.reshape(B, K, G * T, hd)  # query head h = kv * G + g; row g * T + t
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, K, G*T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat(1, 1, G, 1), torch.finfo(scores.dtype).min)
    y = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (B, K, G*T, hd)
    return y.view(B, H, T, hd)
