"""Hook points: identity modules named `hook_*` at the places a researcher reads or replaces a tensor.

TransformerLens's idea: a hook point returns its input unchanged, so it costs one module call when
nobody listens, and it is a real `nn.Module`, so plain `register_forward_hook` (or paligemma.probe,
nnsight, TransformerLens-style code) reaches it by its path, e.g.
`language_model.model.layers.3.self_attn.hook_pattern`. A forward hook that returns a tensor
replaces the value downstream (ablation, activation patching).

Hook points hold no parameters and add no key to state_dict(); pack() leaves them in place (they are
not linear layers).
"""
import torch
from torch import nn
from torch.nn.modules import module as _module


class HookPoint(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def listened(self) -> bool:
        """Someone registered a hook here (or on every module): values that are otherwise never
        materialised, such as attention probabilities inside fused kernels, must then be computed."""
        return bool(self._forward_hooks or self._forward_pre_hooks
                    or _module._global_forward_hooks or _module._global_forward_pre_hooks)
