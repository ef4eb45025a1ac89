"""Activation checkpointing for both towers: one helper, one convention.

`--checkpointing` keeps, per layer, only the layer's input for backward and runs the layer a second
time during backward to rebuild what it needs (benchmarks/memory.py measures what that saves).
Non-reentrant (`use_reentrant=False`): it works when the layer's input needs no gradient (a frozen
tower below a LoRA layer), gives every LoRA weight inside the layer its gradient, and passes keyword
arguments through, so a decoder layer gets its cache and slots in the recomputation too.
"""
import torch.utils.checkpoint


def checkpoint(layer, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)
