"""Static key/value cache (gpt-fast style): preallocated once, written in place at each step.

Besides keys and values it remembers, per slot, whether the slot holds a real token (not padding)
and whether that token belongs to the bidirectional prefix, because the attention mask of every
later step is built from exactly those two facts.

Axes: L decoder layers, B batch, K key/value heads, S slots (max_len), T tokens appended in one
call, hd head dimension.
"""
import torch
from torch import nn


class KVCache(nn.Module):
    """All state lives in buffers, so `.to(device)` moves the whole cache."""

    def __init__(self, batch: int, max_len: int, n_layers: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)  # (L, B, K, S, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("valid", torch.zeros(batch, max_len, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("prefix", torch.zeros(batch, max_len, dtype=torch.bool, device=device), persistent=False)
        # real tokens seen so far per row: the next token's position id is seen + 1 (positions start at 1)
        self.register_buffer("seen", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        self.length = 0  # slots filled so far; a host-side int so that stepping never syncs with the device
        self.max_len = max_len

    def append_mask(self, attention_mask: torch.Tensor, prefix: torch.Tensor) -> slice:
        """Record (B, T) padding and prefix flags for the next T slots; returns those slots."""
        T = attention_mask.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.length} used, {T} more requested")
        slots = slice(self.length, self.length + T)
        self.valid[:, slots] = attention_mask.bool()
        self.prefix[:, slots] = prefix
        self.length += T
        return slots

    def update(self, layer: int, slots: slice, k: torch.Tensor, v: torch.Tensor):
        """Write (B, K, T, hd) keys/values into `slots`; return this layer's whole (B, K, S, hd) buffers."""
        self.k[layer, :, :, slots] = k
        self.v[layer, :, :, slots] = v
        return self.k[layer], self.v[layer]

    def reorder(self, index: torch.Tensor):
        """Keep rows `index` (beam search): every buffer follows the beams it was selected for."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.valid = self.valid.index_select(0, index)
        self.prefix = self.prefix.index_select(0, index)
        self.seen = self.seen.index_select(0, index)
