"""Putting LoRA into a model: which layers, what trains, merge / unmerge.

Targets follow PEFT: a string is a regular expression that must match the whole module name
(`re.fullmatch`); a list matches a name exactly or by its last dotted parts (`q_proj` matches
`...self_attn.q_proj`). SigLIP and Gemma both have `q_proj`, `k_proj`, `v_proj`: a suffix list
reaches into both towers. A model may name presets (`model.lora_targets`, e.g. PaliGemma's
"decoder", "vision", "projector", "all") and its parts (`model.parts`, for `summary`): this package
reads them as attributes and knows no model by name.
"""
import re

from torch import nn

from .layer import LoRALinear, is_linear


def matches(name: str, targets) -> bool:
    """PEFT's target semantics: a regex string must match the whole name; a list matches a name exactly
    or by its last dotted parts. (quantize.py's `skip` uses the same rule.)"""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def preset(model: nn.Module, targets):
    """A preset name of `model` (its `lora_targets`) -> that regex; anything else as given. A regex that
    does not compile is refused by name."""
    if not isinstance(targets, str):
        return targets
    targets = getattr(model, "lora_targets", {}).get(targets, targets)
    try:
        re.compile(targets)
    except re.error as e:
        raise ValueError(f"LoRA targets {targets!r}: not a preset ({', '.join(getattr(model, 'lora_targets', {}))}) "
                         f"and not a valid regular expression ({e})") from None
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject(model: nn.Module, targets, r: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False,
           exclude=None) -> list[str]:
    """Wrap every linear layer (nn.Linear, or a quantized one: QLoRA) whose name matches `targets` (a preset name, regex or suffix list) and not
    `exclude`; freeze everything else. Returns the wrapped names."""
    targets = preset(model, targets)
    if lora_layers(model):
        raise RuntimeError(f"model already has LoRA layers ({len(lora_layers(model))}): inject once, or load")
    chosen = [(n, m) for n, m in model.named_modules()
              if n and matches(n, targets) and not (exclude and matches(n, exclude))]
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no module of {type(model).__name__}")
    wrong = [f"{n} ({type(m).__name__})" for n, m in chosen if not is_linear(m)]
    if wrong:
        raise ValueError(f"LoRA wraps linear layers only (nn.Linear or quantized); targets {targets!r} also match {wrong[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, r, alpha, dropout, rslora))
    return [n for n, _ in chosen]


def train_modules(model: nn.Module, names: list[str]):
    """Make whole modules trainable besides LoRA (e.g. `multi_modal_projector`)."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"no module named {name!r} to train") from None
        for p in module.parameters():
            p.requires_grad_(True)


def merge(model: nn.Module):
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("no LoRA layers to merge")
    for layer in layers.values():
        layer.merge()


def unmerge(model: nn.Module):
    for layer in lora_layers(model).values():
        layer.unmerge()


def summary(model: nn.Module) -> str:
    """Trainable parameters per tower, as a Markdown table: what a run will actually update."""
    rows = {}
    for tower, module in model.named_children():
        name = getattr(model, "parts", {}).get(tower, tower)
        total = sum(p.numel() for p in module.parameters())
        if total == 0:  # parameter-free children (a model's hook points) are no part
            continue
        lora = sum(p.numel() for m in module.modules() if isinstance(m, LoRALinear)
                   for p in (m.lora_A.weight, m.lora_B.weight) if p.requires_grad)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        wrapped = sum(isinstance(m, LoRALinear) for m in module.modules())
        rows[name] = (total, trainable, lora, wrapped)
    lines = ["| part | parameters | trainable | of which LoRA | LoRA layers |", "|---|---:|---:|---:|---:|"]
    for name, (total, trainable, lora, wrapped) in rows.items():
        lines.append(f"| {name} | {total:,} | {trainable:,} ({100 * trainable / max(total, 1):.3f}%) | {lora:,} | {wrapped} |")
    t = [sum(r[i] for r in rows.values()) for i in range(4)]
    lines.append(f"| **all** | {t[0]:,} | {t[1]:,} ({100 * t[1] / max(t[0], 1):.3f}%) | {t[2]:,} | {t[3]} |")
    return "\n".join(lines)
