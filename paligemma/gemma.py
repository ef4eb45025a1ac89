"""Gemma decoder (PaliGemma 1) and Gemma 2 decoder (PaliGemma 2), one implementation.

Family quirks, each switched by a config field:
- RMSNorm multiplies by (1 + w), computed in float32 (`GemmaRMSNorm`).
- Token embeddings are scaled by sqrt(hidden_size), the scale rounded to the compute dtype.
- tanh-approximated GeGLU feed-forward; multi-query (PG1) or grouped-query (PG2) attention; RoPE.
- Gemma 2: sandwich norms around attention and feed-forward, softmax scale from
  `query_pre_attn_scalar`, tanh soft-capping of attention scores and of the final logits, and
  sliding-window attention on every other layer.
The output head is tied to `embed_tokens` (the hub files carry no `lm_head`).
"""
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .cache import KVCache
from .config import TextConfig


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored as w, applied as (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # bf16 squares lose too much precision
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, hs) for integer positions (B, T); rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions[..., None].float() * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GemmaAttention(nn.Module):
    def __init__(self, c: TextConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.hd = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale, self.softcap = c.attn_scale, c.attn_logit_softcapping
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, slots: slice | None = None):
        """x (B, T, D); mask (B, 1, T, S) bool, True = may attend; S = T, or the cache length."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, slots, k, v)  # (B, nkv, S, hs)
        if T == 1:
            y = self.decode_attention(q, k, v, mask)
        elif self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.n_kv != self.n_head)
        else:  # SDPA cannot soft-cap scores, so Gemma 2 spells attention out
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
            scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, S)
            scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            y = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))

    def decode_attention(self, q, k, v, mask):
        """One new query per row (a decode step): the query heads that share a key/value head become
        the rows of one small matmul against the cache. CPU SDPA spends 3-15x longer on this shape
        (benchmarks/NOTES.md)."""
        B = q.shape[0]
        q = q.view(B, self.n_kv, self.n_head // self.n_kv, self.hd)  # (B, nkv, group, hs)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, nkv, group, S)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # mask (B, 1, 1, S)
        y = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (B, nkv, group, hs)
        return y.view(B, self.n_head, 1, self.hd)


class GemmaMLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, layer: int):
        super().__init__()
        self.sliding = c.is_sliding(layer)
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = GemmaAttention(c, layer)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GemmaMLP(c)
        self.sandwich = c.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        if not self.sandwich:  # Gemma 1: post_attention_layernorm is the pre-MLP norm
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots)
            return x + self.mlp(self.post_attention_layernorm(x))
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, D)
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)  # scale rounded like the reference

    def forward(self, x, positions, masks, cache=None, slots=None):
        """x (B, T, D) embeddings; positions (B, T); masks {"full": m, "sliding": m} -> (B, T, D) normed."""
        c = self.config
        cos, sin = rope(positions, c.head_dim, c.rope_theta, x.dtype)
        for layer in self.layers:
            mask = masks["sliding" if layer.sliding else "full"]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, slots)
        return self.norm(x)


class GemmaForCausalLM(nn.Module):
    """Exists so that parameter names read `language_model.model.*`, as in the hub files."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.model = GemmaModel(c)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, D) hidden states -> (…, vocab) logits through the tied embedding."""
        packed = self.__dict__.get("packed_head")  # see packing.py
        if packed is not None and not (torch.is_grad_enabled() and h.requires_grad):
            logits = packed(h)
        else:
            logits = F.linear(h, self.model.embed_tokens.weight)
        cap = self.model.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
