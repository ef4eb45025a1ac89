"""Attention knockout: forbid attention edges between token groups in chosen decoder layers.

    with probe.knockout(model, block={"suffix": ["image"]}, layers=range(10, 18)):
        tokens = model.generate(**inputs)          # the caption may not look at the image from layer 10 on

The blocked edges are removed from the boolean mask the forward builds (True = may attend), so they get
the same treatment as padding before the softmax: -inf in the fused SDPA kernel, the most negative
float in the spelled-out one (attention.py; its exp is exactly 0 next to any allowed key). The
model's math is not touched, and a block that removes no edge leaves every bit of the output as it was.

How: while active, `model.masks` (the one place every forward and decode step builds its masks,
model.py) is wrapped to compute the blocked edges of each call from the same per-slot facts, real and in the prefix,
that the masks come from (groups.py), and a forward pre-hook on each chosen layer's `self_attn` ANDs
them into that layer's mask. Sliding windows (PaliGemma 2) stay as they are: a blocked edge is only
ever removed. While decoding, every new token is in the `suffix` group.

A group is a name in GROUPS or explicit slot positions (a sequence of ints: positions of the padded
input, generated token i at T + i); padding is in no group. `block` maps query groups to the key
groups they may not attend to: {"suffix": ["image", "bos"]}, {(20, 21): "image"}, or a list of
(queries, keys) pairs. A query left with nothing to attend to in a chosen layer is an error that names
it (a softmax over nothing would be NaN).
"""
import contextlib
from collections.abc import Sequence

import torch

from .groups import GROUPS, PAD, slot_groups


def _positions(x) -> bool:
    """x is a list of slot positions (ints), not a group name or a list of groups."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 1 and not x.is_floating_point()
    return isinstance(x, (Sequence, range)) and not isinstance(x, str) and all(isinstance(i, int) for i in x)


def _spec(x, what: str):
    """A group name -> its index in GROUPS; positions -> a (n,) long tensor."""
    if isinstance(x, str) and x in GROUPS:
        return GROUPS.index(x)
    if _positions(x) and len(x):
        return torch.as_tensor(list(x), dtype=torch.long)
    raise ValueError(f"knockout: {what} {x!r} is neither a group name {GROUPS} nor a non-empty list of positions")


def _rules(block) -> list[tuple]:
    """block -> [(query spec, key spec)], one pair per blocked (query group, key group)."""
    rules = []
    for queries, keys in (block.items() if isinstance(block, dict) else block):
        keys = [keys] if isinstance(keys, str) or _positions(keys) else keys  # one group, or a list of them
        rules += [(_spec(queries, "query group"), _spec(k, "key group")) for k in keys]
    if not rules:
        raise ValueError("knockout: `block` names no edges; e.g. block={'suffix': ['image']}")
    return rules


def _members(spec, labels: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, n) labels of the slots `slots` (n,) -> (B, n) bool: slot belongs to the group `spec`."""
    if isinstance(spec, int):
        return labels == spec
    return torch.isin(slots, spec.to(slots.device))[None] & (labels != PAD)


def blocked_edges(rules, valid, prefix, slots: torch.Tensor, n_image: int) -> torch.Tensor:
    """(B, T, S) bool: the query at slot slots[t] may not attend to key slot s. valid, prefix (B, S) as the
    masks; slots (T,) long."""
    labels = slot_groups(valid, prefix, n_image)  # (B, S)
    S = labels.shape[1]
    keys = torch.arange(S, device=labels.device)
    blocked = torch.zeros(labels.shape[0], slots.numel(), S, dtype=torch.bool, device=labels.device)
    for q, k in rules:
        blocked |= (_members(q, labels.index_select(1, slots), slots)[:, :, None]
                    & _members(k, labels, keys)[:, None, :])
    return blocked


@contextlib.contextmanager
def knockout(model, block, layers=None):
    """While active, the edges in `block` (see the module docstring) are masked before the softmax in the
    decoder layers `layers` (default all), in every forward and every generation step. Restores on exit,
    also on an exception."""
    rules = _rules(block)
    n_layers = model.config.text.num_hidden_layers
    layers = sorted(set(range(n_layers) if layers is None else (int(l) for l in layers)))
    outside = [l for l in layers if not 0 <= l < n_layers]
    if outside or not layers:
        raise ValueError(f"knockout: layers {outside or list(layers)} are not decoder layers: the decoder has "
                         f"{n_layers} layers (0-{n_layers - 1})")
    decoder = model.language_model.model.layers
    kinds = {"sliding" if decoder[l].sliding else "full" for l in layers}
    n_image = model.config.num_image_tokens
    built = model.masks
    state = {}

    def masks(slots, T, valid, prefix):
        out = built(slots, T, valid, prefix)
        slots = slots.to(valid.device)
        allowed = ~blocked_edges(rules, valid, prefix, slots, n_image)[:, None]  # (B, 1, T, S)
        real = valid.index_select(1, slots)  # (B, T)
        for kind in kinds:
            empty = (~(out[kind] & allowed).any(-1))[:, 0] & real  # (B, T) real queries left with no key
            if empty.any():
                b, t = (int(i) for i in empty.nonzero()[0])
                slot = int(slots[t])
                group = slot_groups(valid, prefix, n_image)[b, slot]
                named = [l for l in layers if ("sliding" if decoder[l].sliding else "full") == kind]
                raise ValueError(f"knockout {block!r} leaves query slot {slot} (row {b}, group "
                                 f"{GROUPS[int(group)]!r}) nothing to attend to in layers {named}: every key its "
                                 f"mask allows is blocked")
        state["allowed"] = allowed
        return out

    def mask_edges(module, args, kwargs):
        kwargs["mask"] = kwargs["mask"] & state["allowed"]
        return args, kwargs

    had = "masks" in model.__dict__  # an outer knockout's wrapper: keep it, restore it
    handles = []
    try:
        model.masks = masks
        for l in layers:
            handles.append(decoder[l].self_attn.register_forward_pre_hook(mask_edges, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        if had:
            model.masks = built
        else:
            del model.masks
