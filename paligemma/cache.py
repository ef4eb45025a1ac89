"""Static key/value cache (gpt-fast style): preallocated once, written in place at each step.

Besides keys and values it remembers, per slot, whether the slot holds a real token (not padding)
and whether that token belongs to the bidirectional prefix, because the attention mask of every
later step is built from exactly those two facts; and, per row, how many real tokens it has seen,
which gives the next token's position id.

Where tokens go is a tensor of slot indices, never a Python slice: a decode step then has the same
shapes and the same code at every position, which is what lets torch.compile trace it once (and a
CUDA graph replay it, generation.py). How many slots are taken is also counted on the host
(`length`), so that the capacity check never waits for the device.

Axes: L decoder layers, B batch, K key/value heads, S slots (max_len), T tokens appended in one
call, hd head dimension.
"""
import torch
from torch import nn


def position_ids(attention_mask: torch.Tensor, seen: torch.Tensor | int = 0) -> torch.Tensor:
    """(B, T): the 1-based count of real tokens so far, `seen` (B, 1) of them before these T; padding
    does not shift positions (and takes its neighbour's, clamped to 1: masked anyway)."""
    return (seen + attention_mask.long().cumsum(-1)).clamp(min=1)


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
        self.length = 0  # slots taken so far; a host-side int so that stepping never syncs with the device
        self.max_len = max_len

    def next_slots(self, T: int) -> torch.Tensor:
        """(T,) the slots the next T tokens would take; the one capacity check. Changes nothing."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.length} used, {T} more requested")
        return torch.arange(self.length, self.length + T, device=self.valid.device)

    def reserve(self, T: int) -> torch.Tensor:
        """Take the next T slots: (T,) their indices."""
        slots = self.next_slots(T)
        self.length += T
        return slots

    def preview(self, attention_mask: torch.Tensor, prefix: torch.Tensor, slots: torch.Tensor):
        """What `append` would record, out of place: (position ids (B, T), valid (B, S), prefix (B, S))."""
        valid = self.valid.index_copy(1, slots, attention_mask.bool())
        is_prefix = self.prefix.index_copy(1, slots, prefix)
        return position_ids(attention_mask, self.seen[:, None]), valid, is_prefix

    def append(self, attention_mask: torch.Tensor, prefix: torch.Tensor, slots: torch.Tensor | None = None):
        """Record T tokens: (B, T) padding and prefix flags, and the real tokens among them in `seen`.
        Returns (slots (T,), position ids (B, T)). `slots`: default the next T, taken here (`reserve`);
        a compiled decode step passes the slot it reserved outside the graph, so that nothing here reads
        the host count (an int changing at every step would make torch.compile recompile)."""
        if slots is None:
            slots = self.reserve(attention_mask.shape[1])
        positions, valid, is_prefix = self.preview(attention_mask, prefix, slots)
        self.valid.copy_(valid)
        self.prefix.copy_(is_prefix)
        self.seen += attention_mask.long().sum(-1)
        return slots, positions

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write (B, K, T, hd) keys/values into `slots` (T,); return this layer's whole (B, K, S, hd) buffers."""
        self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))  # autocast may compute k in another dtype
        self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def reorder(self, index: torch.Tensor):
        """Keep rows `index` (beam search): every buffer follows the beams it was selected for."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.valid = self.valid.index_select(0, index)
        self.prefix = self.prefix.index_select(0, index)
        self.seen = self.seen.index_select(0, index)


def attention_masks(start, T: int, valid: torch.Tensor, prefix: torch.Tensor, window: int | None) -> dict:
    """Boolean masks (B, 1, T, S), True = may attend, for queries at slots start..start+T-1.

    `start`: an int, or the queries' slots as a (T,) tensor (the cache's: a decode step then builds its
    mask from tensors alone, the same code at every position). valid (B, S): slot holds a real token;
    prefix (B, S): slot is in the bidirectional prefix. A query may see key j when j is a real token and
    either j <= i (within `window` on sliding layers) or both lie in the prefix. Every query also sees
    itself, so that padding rows are never empty (an empty softmax row gives NaN, and NaN * 0 still
    poisons the real rows).
    """
    S = valid.shape[1]
    k = torch.arange(S, device=valid.device)[None, :]  # (1, S)
    slots = start if torch.is_tensor(start) else torch.arange(start, start + T, device=valid.device)
    q = slots[:, None]  # (T, 1)
    both_prefix = prefix.index_select(1, slots)[:, :, None] & prefix[:, None, :]  # (B, T, S)

    def mask(causal):
        return (((causal[None] | both_prefix) & valid[:, None, :]) | (k == q)[None])[:, None]

    masks = {"full": mask(k <= q)}
    masks["sliding"] = mask((k <= q) & (k > q - window)) if window is not None else masks["full"]
    return masks
