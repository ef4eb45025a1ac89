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
    """Make whole modules trainable besides LoRA (e.g. `multi_modal_projector`); lora.save writes them
    as PEFT's `modules_to_save`. A module holding LoRA layers is refused: PEFT can save it whole or
    adapted, not both."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"no module named {name!r} to train") from None
        inner = [f"{name}.{n}".rstrip(".") for n, m in module.named_modules() if isinstance(m, LoRALinear)]
        if inner:
            raise ValueError(f"cannot train {name!r} whole: it holds LoRA layers {inner[:3]}; train it whole or "
                             "through LoRA (leave it out of the LoRA targets), not both")
        for p in module.parameters():
            p.requires_grad_(True)


def trained_modules(model: nn.Module) -> list[str]:
    """The modules that train besides LoRA, each named once at its outermost level (what PEFT calls
    `modules_to_save`): every module with a trainable parameter outside the LoRA matrices, widened to
    the largest ancestor that trains whole and holds no LoRA layer. A trainable weight inside a LoRA
    layer (its frozen base) is refused: an adapter file cannot carry it."""
    layers = lora_layers(model)
    modules = dict(model.named_modules())
    inside_lora = [n for n, p in model.named_parameters() if p.requires_grad
                   and any(n.startswith(f"{l}.base.") for l in layers)]
    if inside_lora:
        raise ValueError(f"{inside_lora[:3]} train but belong to the frozen base of a LoRA layer: a PEFT adapter "
                         "cannot carry them (freeze them, or fine-tune fully)")
    owners = {n.rpartition(".")[0] for n, p in model.named_parameters()
              if p.requires_grad and ".lora_A." not in n and ".lora_B." not in n}

    def whole(name: str) -> bool:
        m = modules[name]
        return all(p.requires_grad for p in m.parameters()) and not any(isinstance(x, LoRALinear) for x in m.modules())
    out = set()
    for name in owners:
        while "." in name and whole(name.rpartition(".")[0]):
            name = name.rpartition(".")[0]
        out.add(name)
    return sorted(out)


def _check_mergeable(layers: dict, verb: str):
    """All layers or none: a refusal names the first layer before any weight changes."""
    for name, layer in layers.items():
        why = layer.merge_refused(verb)
        if why:
            raise RuntimeError(f"lora.{verb}: {name}: {why}")


def merge(model: nn.Module):
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("no LoRA layers to merge")
    _check_mergeable(layers, "merge")
    for layer in layers.values():
        layer.merge()


def unmerge(model: nn.Module):
    layers = lora_layers(model)
    _check_mergeable({n: l for n, l in layers.items() if l.merged}, "unmerge")
    for layer in layers.values():
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
