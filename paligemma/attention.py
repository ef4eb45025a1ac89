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

When someone listens to the layer's `hook_pattern` (hookpoint.py), the probabilities are also spelled
out and passed to it as (B, H, T, S) float32, exactly as transformers' eager attention computes them
(before its cast to the compute dtype). If the hook only reads them, the output still comes from the
kernel above, so recording changes no bit of the result; if it replaces them (returns another tensor,
or edits them in place) the output is recomputed from the replacement.
"""
import torch
import torch.nn.functional as F


def attention(q, k, v, mask=None, scale=None, softcap=None, hook_pattern=None) -> torch.Tensor:
    """q (B, H, T, hd); k, v (B, K, S, hd); mask (B, 1, T, S) bool, True = may attend, or None;
    hook_pattern: a HookPoint or None -> (B, H, T, hd)."""
    B, H, T, hd = q.shape
    fused = softcap is None and T > 1
    if hook_pattern is None or not hook_pattern.listened:
        if fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != H)
        return _mix(_probabilities(q, k, mask, scale, softcap), v, q.dtype, H)
    p = _probabilities(q, k, mask, scale, softcap)  # (B, K, G*T, S)
    pattern = p.view(B, H, T, -1)  # head h = kv * G + g: the same memory, read per query head
    version = pattern._version
    seen = hook_pattern(pattern)
    if seen is pattern and pattern._version == version:  # read, not replaced: keep the kernel's bits
        if fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != H)
        return _mix(p, v, q.dtype, H)
    return _mix(seen.reshape(p.shape), v, q.dtype, H)


def _probabilities(q, k, mask, scale, softcap) -> torch.Tensor:
    """-> (B, K, G*T, S) float32 softmax probabilities, query head h = kv * G + g in row g * T + t."""
    B, H, T, hd = q.shape
    K = k.shape[1]
    G = H // K
    scale = hd ** -0.5 if scale is None else scale
    scores = (q.reshape(B, K, G * T, hd) @ k.transpose(-2, -1)) * scale  # (B, K, G*T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat(1, 1, G, 1), torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1)


def _mix(p, v, dtype, H) -> torch.Tensor:
    """(B, K, G*T, S) probabilities @ (B, K, S, hd) values -> (B, H, T, hd)."""
    B, K, GT, _ = p.shape
    return (p.to(dtype) @ v).view(B, H, GT * K // H, -1)
