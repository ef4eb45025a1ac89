"""Adapter files in PEFT's format, so an adapter moves freely between this project and PEFT.

    adapter_config.json         peft_type, r, lora_alpha, lora_dropout, target_modules, use_rslora,
                                modules_to_save, ...
    adapter_model.safetensors   base_model.model.<transformers module path>.lora_{A,B}.weight, and
                                base_model.model.<path>.<its own keys> for each module of modules_to_save
                                (modules trained whole beside LoRA: PEFT 0.17+ writes them so; its
                                older `<path>.modules_to_save[.default].<key>` is read too)

Our module names are the hub checkpoint keys; transformers' module paths differ by version. The
model says how to map them (`model.to_transformers` / `model.from_transformers`: PaliGemma's come
from the one table, paligemma/weights.py TRANSFORMERS_NAMES); nothing here imports the model
package, and a model without them keeps its own names.
"""
import errno
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import inject, lora_layers, trained_modules
from .layer import is_linear, is_quantized

PREFIX = "base_model.model."


class AdapterError(ValueError):
    pass


def to_hf(model: nn.Module, name: str) -> str:
    """Our module or key name -> the one transformers (and so PEFT) gives it, as the model says
    (`model.to_transformers`; a model without one keeps its names)."""
    return getattr(model, "to_transformers", lambda n: n)(name)


def from_hf(model: nn.Module, name: str) -> str:
    """A name from an adapter file, of any transformers version the model knows -> ours."""
    return getattr(model, "from_transformers", lambda n: n)(name)


def module_to_hf(model: nn.Module, name: str) -> str:
    """A module's name (no trailing key), ours -> transformers'."""
    return to_hf(model, name + ".")[:-1]


def save(model: nn.Module, directory, base_model_name_or_path: str | None = None,
         modules_to_save: list[str] | None = None):
    """Write adapter_config.json + adapter_model.safetensors: the LoRA matrices, and the whole weights of
    `modules_to_save` (default: every module that trains besides LoRA, lora.trained_modules), so that
    what a run trained is what it exports. Both files are written to temp files first and renamed only
    when both are whole: a failure (a full disk) leaves the previous pair."""
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
        tensors[f"{PREFIX}{to_hf(model, name)}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{to_hf(model, name)}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    whole = trained_modules(model) if modules_to_save is None else list(modules_to_save)
    for name in whole:
        for key, value in model.get_submodule(name).state_dict(prefix=name + ".").items():
            tensors[f"{PREFIX}{to_hf(model, key)}"] = value.detach().cpu().contiguous()
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": None, "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "use_rslora": first.rslora, "bias": "none", "init_lora_weights": True, "fan_in_fan_out": False,
        "target_modules": sorted(to_hf(model, n) for n in layers),
        "modules_to_save": sorted(module_to_hf(model, n) for n in whole) or None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "use_dora": False,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_all({directory / "adapter_model.safetensors": lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                directory / "adapter_config.json": lambda tmp: tmp.write_text(json.dumps(config, indent=2))})


def _write_all(writers: dict):
    """{path: write(tmp)}: each fills a temp file of its own (unique name) beside its path and is flushed
    to disk; only when all are whole are they renamed over their paths. On any failure the temp files
    go and every old file stays; a full disk is named. (lora/ keeps its own helper: it imports nothing
    of paligemma/, whose atomic.py does this for folders.)"""
    temps, path = {}, None
    try:
        for path, write in writers.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            temps[path] = Path(tmp)
            write(temps[path])
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the adapter unreadable to teammates
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except Exception as e:  # OSError, or safetensors' SafetensorError (a plain Exception) saying "os error 28"
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "os error 28" in str(e):
            raise OSError(errno.ENOSPC, f"no space left on device: {path} (the previous adapter, if any, is kept)") from e
        raise
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask (reading it means setting it: put back at once), for the mode open() would give."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    try:
        state = load_file(weights_path)
    except Exception as e:  # safetensors' SafetensorError: a truncated or foreign file
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({e})") from None
    modules = dict(model.named_modules())
    whole = _resolve_modules_to_save(model, config.get("modules_to_save") or [], modules, config_path)
    own = {k: v for name in whole for k, v in modules[name].state_dict(prefix=name + ".").items()}
    weights, saved, bad = {}, {}, []
    for key, tensor in state.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        if m is not None:
            weights[(from_hf(model, m.group(1)), m.group(2))] = tensor
            continue
        ours = from_hf(model, re.sub(r"\.modules_to_save(\.default)?\.", ".", key.removeprefix(PREFIX)))
        if key.startswith(PREFIX) and ours in own:
            saved[ours] = tensor
        else:
            bad.append(key)
    names = sorted({n for n, _ in weights})
    unknown = [n for n in names if modules.get(n) is None or not is_linear(modules[n])]
    if bad or unknown:
        raise AdapterError(f"{weights_path}: keys that do not fit this model: unexpected keys {bad[:10]}, "
                           f"modules that are not linear layers of the model {unknown[:10]}")
    lacking = sorted(set(own) - set(saved))
    shapes = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in saved.items()
              if v.shape != own[k].shape]
    if lacking or shapes:
        raise AdapterError(f"{weights_path}: modules_to_save {whole} do not fit: missing {lacking[:10]}, "
                           f"wrong shapes {shapes[:10]}")
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
    with torch.no_grad():
        for key, tensor in saved.items():
            own[key].copy_(tensor)
    for name in whole:  # they train, as in PEFT (and as they did when saved): save() writes them again
        for p in modules[name].parameters():
            p.requires_grad_(True)
    return wrapped


def _resolve_modules_to_save(model, targets, modules: dict, config_path) -> list[str]:
    """PEFT's modules_to_save entries (a transformers module path, or its last dotted parts) -> our
    module names."""
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{config_path}: modules_to_save is {targets!r}, expected a list of module names")
    found = []
    for t in targets:
        hits = [n for n in modules if n and any(x == t or x.endswith("." + t) for x in (n, module_to_hf(model, n)))]
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]  # outermost only
        if not hits:
            raise AdapterError(f"{config_path}: modules_to_save names {t!r}, which is no module of this model")
        found += hits
    return sorted(set(found))


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
