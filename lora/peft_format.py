"""Adapter files in PEFT's format, so an adapter moves freely between this project and PEFT.

    adapter_config.json         peft_type, r, lora_alpha, lora_dropout, target_modules, use_rslora, ...
    adapter_model.safetensors   base_model.model.<transformers module path>.lora_{A,B}.weight

Our module names are the hub checkpoint keys; transformers' module paths differ by version. The
tables below map adapter module names between the two (transformers >= 4.52 nests everything
under `model.` and from 5.0 drops `vision_model.`; older versions used the hub names themselves);
paligemma/weights.py maps the model checkpoint's keys the same way. Nothing here imports the
model package: LoRA works on any module tree that has these names.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import inject, lora_layers
from .layer import is_linear, is_quantized

PREFIX = "base_model.model."
# ours -> transformers 5.x module path (what PEFT writes with the test extra's transformers)
TO_HF = [
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^language_model\.model\.", "model.language_model."),
]
# any transformers version's module path -> ours
FROM_HF = [
    (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower.vision_model."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.language_model\.", "language_model.model."),
]


class AdapterError(ValueError):
    pass


def _rewrite(name: str, rules) -> str:
    for pattern, repl in rules:
        name, n = re.subn(pattern, repl, name)
        if n:
            break
    return name


def to_hf(name: str) -> str:
    return _rewrite(name, TO_HF)


def from_hf(name: str) -> str:
    return _rewrite(name, FROM_HF)


def save(model: nn.Module, directory, base_model_name_or_path: str | None = None):
    """Write adapter_config.json + adapter_model.safetensors, each file atomically (whole or absent; the
    weights first, so a config never describes weights that are not there yet)."""
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("no LoRA layers to save")
    first = next(iter(layers.values()))
    if any((l.r, l.alpha, l.rslora) != (first.r, first.alpha, first.rslora) for l in layers.values()):
        raise ValueError("all LoRA layers must share r, alpha and rslora to be saved in one PEFT config")
    if any(l.merged for l in layers.values()):
        raise RuntimeError("unmerge before saving an adapter: merged weights are in the base layers")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{to_hf(name)}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{to_hf(name)}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": None, "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "use_rslora": first.rslora, "bias": "none", "init_lora_weights": True, "fan_in_fan_out": False,
        "target_modules": sorted(to_hf(n) for n in layers), "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "use_dora": False,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _replace(directory / "adapter_model.safetensors",
             lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _replace(directory / "adapter_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


def _replace(path: Path, write):
    """write(tmp) beside `path`, flush it to disk, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(model: nn.Module, directory) -> list[str]:
    """Inject the adapter's layers into `model` and load its weights; returns the wrapped names."""
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for p in (config_path, weights_path):
        if not p.exists():
            raise AdapterError(f"{directory}: no {p.name} (expected a PEFT LoRA adapter folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(f"{config_path}: per-layer {key} is not supported")
    if config.get("use_dora"):
        raise AdapterError(f"{config_path}: DoRA adapters are not supported")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"{config_path}: missing field {key!r}")
    if isinstance(config["r"], bool) or not isinstance(config["r"], int) or config["r"] < 1:
        raise AdapterError(f"{config_path}: r is {config['r']!r}, expected a positive integer")
    if isinstance(config["lora_alpha"], bool) or not isinstance(config["lora_alpha"], (int, float)):
        raise AdapterError(f"{config_path}: lora_alpha is {config['lora_alpha']!r}, expected a number")
    state = load_file(weights_path)
    weights, bad = {}, []
    for key, tensor in state.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        if m is None:
            bad.append(key)
            continue
        weights[(from_hf(m.group(1)), m.group(2))] = tensor
    modules = dict(model.named_modules())
    names = sorted({n for n, _ in weights})
    unknown = [n for n in names if modules.get(n) is None or not is_linear(modules[n])]
    if bad or unknown:
        raise AdapterError(f"{weights_path}: keys that do not fit this model: unexpected keys {bad[:10]}, "
                           f"modules that are not linear layers of the model {unknown[:10]}")
    wrapped = inject(model, names, r=config["r"], alpha=config["lora_alpha"],
                     dropout=config.get("lora_dropout", 0.0), rslora=config.get("use_rslora", False))
    layers = lora_layers(model)
    problems = []
    for (name, part), tensor in weights.items():
        param = getattr(layers[name], part).weight
        if param.shape != tensor.shape:
            problems.append(f"{name}.{part}: file {tuple(tensor.shape)}, model {tuple(param.shape)}")
        else:
            with torch.no_grad():
                param.copy_(tensor)
    missing = [f"{n}.{p}" for n in names for p in ("lora_A", "lora_B") if (n, p) not in weights]
    if problems or missing:
        raise AdapterError(f"{weights_path}: wrong shapes {problems[:10]}, missing {missing[:10]}")
    return wrapped


def export_merged(model: nn.Module, directory):
    """Save base + merged LoRA as an ordinary checkpoint through the model's own
    `save_pretrained(directory, state_dict=...)`; the model itself is not changed."""
    model.save_pretrained(directory, state_dict=merged_state(model))


@torch.no_grad()
def merged_state(model: nn.Module) -> dict:
    """The model's state with each LoRA update folded into its base weight (float32 sum, one rounding to
    the base's dtype, as `merge` does) and each quantized layer dequantized to a dense `weight` in its
    compute dtype (bf16 for a model loaded in bf16): what any loader of the hub layout expects."""
    layers = lora_layers(model)
    if any(l.merged for l in layers.values()):
        raise RuntimeError("unmerge before exporting: merged weights are already in the base layers")
    state = {re.sub(r"\.base\.", ".", k): v for k, v in model.state_dict().items()
             if ".lora_A." not in k and ".lora_B." not in k}
    for name, module in model.named_modules():
        owner = name.removesuffix(".base")
        lora_layer = layers.get(owner)
        if is_quantized(module):
            for key in module.state_dict():  # its int8 / 4-bit buffers give way to one dense weight
                if key != "bias":
                    del state[f"{owner}.{key}"]
            w = module.dequantize(torch.float32) + (lora_layer.delta() if lora_layer is not None else 0)
            state[f"{owner}.weight"] = w.to(module.dtype)
        elif lora_layer is not None and module is lora_layer.base:
            w = module.weight
            state[f"{owner}.weight"] = (w.float() + lora_layer.delta()).to(w.dtype)
    return state
