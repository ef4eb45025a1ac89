"""Hub checkpoints in and out: folder or repo id -> PaliGemma, without a float32 detour.

The model is built on the `meta` device (no memory), then each tensor is read from its memory-mapped
safetensors file (safetensors_io.py: a view of the file where the dtype matches, else converted a
chunk at a time) and assigned to its parameter, after its key has been mapped to our module names
(which are the hub's). Loading can also convert each weight as it is read: quantize.py turns it into
int8 / 4-bit buffers, packing.py into its packed inference layout, so that no dense copy of the model
is ever made first. That is why this module imports those two add-ons (and they import nothing of it).
"""
import json
import math
import re
from pathlib import Path

import torch

from .config import ConfigError, PaliGemmaConfig
from .safetensors_io import FILE_DTYPES, CheckpointError, drop_file_pages, open_map, read_header, read_tensor

# What the hub ships that PaliGemma does not use.
SKIPPED = [
    r"vision_tower\.vision_model\.head\..*",  # SigLIP's attention-pooling head
    r"language_model\.lm_head\.weight",  # tied to embed_tokens, never stored by the hub files
]

# Where each of our modules (named as the hub checkpoint's keys) lives in transformers' PaliGemma, as
# (ours, transformers') name prefixes. The first row for each of ours is transformers 5's module path
# (in memory, and so in PEFT adapters made on it): what to_transformers writes. The other rows are
# read too: 4.52-4.57 kept `vision_model.` in memory; transformers 5 *saves* its files with the hub's
# `language_model.model.` but `vision_tower.` without `vision_model.`. The one table for the fact:
# weights.py reads checkpoints with it, verify.py pairs modules with it, lora/ names adapters with it
# (through PaliGemma.to_transformers / from_transformers).
TRANSFORMERS_NAMES = [
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
]
OURS = tuple(dict.fromkeys(ours for ours, _ in TRANSFORMERS_NAMES))


def to_transformers(name: str) -> str:
    """Our module or key name -> transformers 5's (`vision_tower.vision_model.x` -> `model.vision_tower.x`)."""
    for ours, theirs in TRANSFORMERS_NAMES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def canonical(key: str) -> str:
    """A key or module name of any layout in TRANSFORMERS_NAMES -> ours (the hub's); ours unchanged."""
    if key.startswith(OURS):
        return key
    theirs = [(t, o) for o, t in TRANSFORMERS_NAMES if key.startswith(t)]
    if not theirs:
        return key
    t, o = max(theirs, key=lambda p: len(p[0]))  # `model.vision_tower.vision_model.` before `model.vision_tower.`
    return o + key[len(t):]


HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model",
             "preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json"]


def resolve(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub snapshot (only the files PaliGemma needs; offline cache honoured)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo_id).startswith((".", "/")) or str(path_or_repo_id).count("/") != 1:
        raise CheckpointError(f"{path_or_repo_id}: not a checkpoint folder, and not a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated, no network: the hub's own words, after ours
        raise CheckpointError(f"{path_or_repo_id}: not a local folder; as a hub id: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map'): {e}") from e
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not there: {missing}")
        return files
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors, no model.safetensors.index.json, no *.safetensors")
    return files


def load_state(folder: Path, model: torch.nn.Module, dtype: torch.dtype, device, convert=None,
               transient=frozenset()) -> dict:
    """Read every tensor the model needs; error on anything missing, unexpected or mis-shaped.
    `convert(name, tensor) -> {name: tensor}` replaces each tensor as soon as it is read (quantize.py:
    a linear weight becomes its int8 or 4-bit buffers, so no dense copy of the model ever exists;
    packing.py: it becomes its packed copy). `transient`: names whose read tensor `convert` does not
    keep; those that need converting are converted into one reused buffer."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, unexpected, wrong_shape, sources = {}, [], [], {}
    buffer = torch.empty(0, dtype=dtype)
    for path in weight_files(folder):
        header = read_header(path)
        mm = open_map(path)
        for key, info in header.items():
            name = canonical(key)
            if any(re.fullmatch(p, name) for p in SKIPPED):
                continue
            if name not in expected:
                unexpected.append(f"{key} ({path.name})")
            elif tuple(info["shape"]) != expected[name]:
                wrong_shape.append(f"{key} ({path.name}): file {tuple(info['shape'])}, model {expected[name]}")
            elif name in sources:
                unexpected.append(f"{key} ({path.name}): duplicate of {sources[name]}")
            else:
                sources[name] = f"{key} ({path.name})"
                out = None
                if name in transient and FILE_DTYPES[info["dtype"]] != dtype:
                    if buffer.numel() < math.prod(info["shape"]):
                        buffer = torch.empty(math.prod(info["shape"]), dtype=dtype)
                    out = buffer
                tensor = read_tensor(mm, info, dtype, device, out)
                converted = convert(name, tensor) if convert else {name: tensor}
                if converted.get(name) is not tensor:  # replaced: a view of the map gives its pages back
                    drop_file_pages(tensor)
                state.update(converted)
    missing = sorted(set(expected) - set(sources))
    problems = [f"missing keys: {missing}"] * bool(missing) + [f"unexpected keys: {unexpected}"] * bool(unexpected) \
        + [f"wrong shapes: {wrong_shape}"] * bool(wrong_shape)
    if problems:
        raise CheckpointError(f"{folder}: checkpoint does not fit the config:\n  " + "\n  ".join(problems))
    return state


def load_pretrained(cls, path_or_repo_id, dtype=torch.float32, device="cpu", revision=None, inference=False,
                    quantize=None, adapter=None):
    """PaliGemma.from_pretrained: the model on `meta`, each weight read (and quantized or packed as it is
    read), assigned; then the LoRA `adapter` (a PEFT folder) if given, and `for_inference`."""
    folder = resolve(path_or_repo_id, revision)
    if not (folder / "config.json").exists():
        raise ConfigError(f"{folder}: no config.json")
    config = PaliGemmaConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = cls(config)
    from . import packing
    convert, transient, packed = None, frozenset(), None
    if quantize:  # the file's dense weights are checked against the dense model, then swapped in quantized
        from . import quantize as q
        convert = q.converter(model.to(dtype), quantize)  # .to on meta: free, and the layers get `dtype`
    elif inference and not adapter and packing.packable(device, dtype):  # each linear weight packed as it is read
        convert, transient, packed = packing.converter(model)
    state = load_state(folder, model, dtype, device, convert, transient)
    if quantize:
        q.quantize(model, quantize, head=False)  # on meta: empty quantized layers for the state to fill
    model.load_state_dict(state, strict=True, assign=True)
    if adapter:
        import lora  # LoRA wraps the plain (or quantized) linear layers, so packing comes after it
        lora.load(model, adapter)
    if inference:
        for_inference(model, quantized=quantize, packed=packed)
    return model.eval()


def for_inference(model, quantized: str | None = None, packed: dict | None = None):
    """The one inference set-up: weights frozen; with quantized layers (`quantized`: their mode), the
    logits from a quantized copy of the embedding table (quantize.quantized_head) rather than a packed
    bf16 one, where its kernels run (CPU, bf16 or float32; elsewhere it would be memory never read); on
    CPU every linear layer packed (packing.py), each once it has been used enough to pay for its copy
    (packing.AFTER), or at once where `packed` (from packing.converter while loading) already holds it."""
    from . import packing
    model.requires_grad_(False)
    table = model.language_model.model.embed_tokens.weight
    if quantized and table.device.type == "cpu" and table.dtype in (torch.bfloat16, torch.float32):
        from .quantize import quantized_head
        quantized_head(model, quantized)
    return packing.pack(model, packed=packed, after=packing.AFTER)


def save_pretrained(model: torch.nn.Module, directory: str | Path, max_shard_bytes: int | None = None,
                    state_dict: dict | None = None):
    """Write config.json + safetensors in the hub layout (sharded with an index past max_shard_bytes),
    atomically: `directory` is the old whole folder or the new whole one. `state_dict`: weights to
    write instead of the model's own (a merged LoRA export, a state gathered from FSDP shards)."""
    from safetensors.torch import save_file
    from .atomic import atomic_dir
    state = state_dict or model.state_dict()
    quantized = [k for k in state if k.endswith(".qweight")]  # every quantized layer (quantize.py) holds one
    if quantized:  # the hub layout has no such keys: the folder would load nowhere, this project included
        raise ValueError(f"save_pretrained: {quantized[0]} (and {len(quantized) - 1} more) are quantized weights, "
                         "which the hub layout cannot hold: save the unquantized model and quantize when loading "
                         "(from_pretrained(..., quantize=...))")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_dir(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        shards, current, size = [], {}, 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if max_shard_bytes and current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[k], size = v, size + nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
