"""Gemma decoder (PaliGemma 1) and Gemma 2 decoder (PaliGemma 2), one implementation.

Family quirks, each switched by a config field:
- RMSNorm multiplies by (1 + w), computed in float32 (`GemmaRMSNorm`).
- Token embeddings are scaled by sqrt(hidden_size), the scale rounded to the compute dtype.
- tanh-approximated GeGLU feed-forward; multi-query (PG1) or grouped-query (PG2) attention; RoPE.
- Gemma 2: sandwich norms around attention and feed-forward, softmax scale from
  `query_pre_attn_scalar`, tanh soft-capping of attention scores and of the final logits, and
  sliding-window attention on every other layer.
The output head is tied to `embed_tokens` (the hub files carry no `lm_head`).

float16 (cards without bf16: `--amp fp16`, or float16 weights): Gemma's residual stream can outgrow
float16's largest value, 65504, in a few "massive" dimensions (vLLM met it with Gemma 3, PR #17364;
not measured here on PaliGemma's weights, which cannot be downloaded). So with float16 weights the
residual adds are carried in float32 and each norm, which computes in float32 anyway, hands float16
back to the next layer; the final soft-cap runs in float32. Under float16 autocast with float32 or bf16
weights the residual is float32 already (type promotion of x + h). What stays float16: each linear
layer's output (an attention or MLP branch over 65504 by itself still becomes inf, as Gemma 4's
down_proj does in unsloth-zoo PR #600; GradScaler then skips the step) and the embedding scale (a
table entry would need |e| > 1447). float32 and bf16 compute exactly as before.
Hook points (hookpoint.py) on each layer: `self_attn.hook_{q,k,v,pattern,z}`, `hook_attn_out`,
`hook_resid_mid`, `hook_mlp_out`, `hook_resid_post`. `hook_attn_out` and `hook_mlp_out` are exactly what
the attention and the MLP add to the residual stream (after Gemma 2's post-norms), so
resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out.

Axes: B batch, T tokens in this call, S keys (T, or the KV cache's slots), D hidden size,
H query heads, K key/value heads, hd head dimension, V vocabulary.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .cache import KVCache
from .checkpointing import checkpoint
from .config import TextConfig
from .hookpoint import HookPoint


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored as w, applied as (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # bf16 squares lose too much precision (float16 ones overflow)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # float16 weights: the float32 residual GemmaModel carries for them returns to float16 here
        return (xf * (1.0 + self.weight.float())).to(torch.float16 if self.weight.dtype == torch.float16 else x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, hd) for integer positions (B, T); rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
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
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # this call's T tokens
        self.hook_pattern = HookPoint()  # (B, H, T, S) probabilities; computed only when listened to
        self.hook_z = HookPoint()  # (B, T, H, hd) each head's output, before o_proj mixes the heads

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, slots: slice | None = None):
        """x (B, T, D); mask (B, 1, T, S) bool, True = may attend; S = T, or the cache's slots."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k, v = self.hook_q(apply_rope(q, cos, sin)), self.hook_k(apply_rope(k, cos, sin)), self.hook_v(v)
        if cache is not None:
            k, v = cache.update(self.layer, slots, k, v)  # (B, K, S, hd)
        y = attention(q, k, v, mask, self.scale, self.softcap, self.hook_pattern)  # (B, H, T, hd)
        z = self.hook_z(y.transpose(1, 2))  # (B, T, H, hd)
        return self.o_proj(z.reshape(B, T, self.n_head * self.hd))


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
        # (B, T, D) each: what the attention adds, after the attention residual, what the MLP adds, the output
        self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        h = self.self_attn(self.input_layernorm(x), cos=cos, sin=sin, mask=mask, cache=cache, slots=slots)
        if not self.sandwich:  # Gemma 1: post_attention_layernorm is the pre-MLP norm
            x = self.hook_resid_mid(x + self.hook_attn_out(h))
            m = self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x)))
        else:
            x = self.hook_resid_mid(x + self.hook_attn_out(self.post_attention_layernorm(h)))
            m = self.hook_mlp_out(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))
        return self.hook_resid_post(x + m)


class GemmaModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        # No random init: weights come from a checkpoint or PaliGemma.init_weights(). (nn.Embedding's own
        # normal_ on the meta device, where from_pretrained builds the model, imports torch._dynamo: 2-7 s.)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, _weight=torch.zeros(c.vocab_size, c.hidden_size))
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
        if x.dtype == torch.float16:
            x = x.float()  # the residual stream outgrows float16 (max 65504): carried in float32 (module docstring)
        for layer in self.layers:
            mask = masks["sliding" if layer.sliding else "full"]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos=cos, sin=sin, mask=mask, cache=cache, slots=slots)
            else:
                x = layer(x, cos=cos, sin=sin, mask=mask, cache=cache, slots=slots)
        return self.norm(x)


def source(table: torch.Tensor) -> tuple:
    """What identifies the embedding table a head's own copy (packed, quantized) was made from: a
    load_state_dict() copies into it (its version moves on) or assigns a new one (another storage)."""
    version = None if table.is_inference() else table._version  # inference tensors keep no version (nor change in place)
    return table.data_ptr(), version, tuple(table.shape), table.dtype


def changed(table: torch.Tensor, made_from: tuple) -> bool:
    """Whether `table` is no longer the one a copy was made from (source). Not asked under torch.compile,
    which cannot trace data pointers: each generate's prefill runs eagerly first and remakes a stale copy."""
    return not torch.compiler.is_compiling() and source(table) != made_from


class TiedHead(nn.Module):
    """The output head: logits = h E^T with E the embedding table, then Gemma 2's final soft-cap.

    It owns no weight (the hub files store E once, as `embed_tokens`; the caller passes it in), so it
    adds no key to state_dict(). It is a module so that hooks see every step's logits and speed-ups
    can swap it (packing.py) without the model knowing.
    """

    def __init__(self, softcap: float | None):
        super().__init__()
        self.softcap = softcap

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h (..., D), weight (V, D) -> (..., V)."""
        return self.cap(F.linear(h, weight))

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap is None:
            return logits
        if logits.dtype == torch.float16:  # tanh(l / c) * c would round twice more, by up to 2^-11 x c
            logits = logits.float()
        return torch.tanh(logits / self.softcap) * self.softcap


class GemmaForCausalLM(nn.Module):
    """Exists so that parameter names read `language_model.model.*`, as in the hub files."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.model = GemmaModel(c)
        self.lm_head = TiedHead(c.final_logit_softcapping)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., V) logits through the tied embedding."""
        return self.lm_head(h, self.model.embed_tokens.weight)
