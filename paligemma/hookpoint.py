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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # nobody listening: skip nn.Module's call machinery (1-2 us a call, 7 hook points per decoder layer
        # per generated token: ~1 % of a small model's decode step)
        return super().__call__(x) if self.listened else x

    @property
    def listened(self) -> bool:
        """Someone registered a hook here (or on every module) or replaced this forward: values that are
        otherwise never materialised, such as attention probabilities inside fused kernels, must then be
        computed."""
        return bool(self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                    or self._backward_pre_hooks or "forward" in self.__dict__
                    or _module._global_forward_hooks or _module._global_forward_pre_hooks
                    or _module._global_backward_hooks or _module._global_backward_pre_hooks)
