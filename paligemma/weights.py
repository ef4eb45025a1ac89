"""Checkpoint loading: hub folder or repo id -> PaliGemma, without a float32 detour.

The model is built on the `meta` device (no memory), then each tensor is read from its
memory-mapped safetensors file straight into a buffer of the target dtype and assigned to its
parameter. A float32 file loaded as bf16 never exists in memory as float32: conversion goes 256 MiB
at a time, and each converted chunk's file pages are dropped from the process at once (a map that
kept them would count every page read against the process: file size + model size), so peak
memory is the loaded model plus one chunk.
"""
import json
import math
import mmap
import re
import struct
import weakref
from pathlib import Path

import torch

from .config import ConfigError, PaliGemmaConfig

# What the hub ships that PaliGemma does not use.
SKIPPED = [
    r"vision_tower\.vision_model\.head\..*",  # SigLIP's attention-pooling head
    r"language_model\.lm_head\.weight",  # tied to embed_tokens, never stored by the hub files
]

# Other key layouts -> the hub layout (which is also our module layout). transformers >= 4.52 saves
# `vision_tower.*` without `vision_model.`; its in-memory names add a leading `model.`.
KEY_REWRITES = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
]

# safetensors header dtype names
FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model",
             "preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json"]
CHUNK_BYTES = 256 << 20


class CheckpointError(ValueError):
    pass


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


def read_header(path: Path) -> dict:
    """safetensors layout: u64 little-endian header size, JSON header, then raw tensor bytes. The header
    and every tensor's byte range are checked against the file's size (a truncated download, a Git
    LFS pointer in place of the file), so a bad file is named instead of read out of bounds."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head == b"version " and f.read(16) == b"https://git-lfs.":  # "version https://git-lfs.github.com/spec/v1"
            raise CheckpointError(f"{path}: a Git LFS pointer file, not the weights: run `git lfs pull` in its repository")
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            raise CheckpointError(f"{path}: not a safetensors file or truncated ({size} bytes; the header alone "
                                  f"claims {n} bytes)" + (" (a Git LFS pointer? run `git lfs pull`)" if size < 1024 else ""))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not JSON ({e})") from None
    header.pop("__metadata__", None)
    for key, info in header.items():
        try:
            start, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * torch.empty((), dtype=FILE_DTYPES[info["dtype"]]).element_size()
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info} ({e!r})") from None
        if not 0 <= start <= end <= size - 8 - n or end - start != nbytes:
            raise CheckpointError(f"{path}: tensor {key!r} needs bytes {start}..{end} of {size - 8 - n} "
                                  f"({nbytes} for {info['dtype']} {info['shape']}): the file is truncated or corrupt")
        info["offset"] = 8 + n + start
    return header


def read_tensor(mm: mmap.mmap, info: dict, dtype: torch.dtype, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor from a memory-mapped file.

    Already in `dtype` (bf16 files loaded as bf16, as PaliGemma 2 ships them): a view of the map, no
    copy. Pages are read on first use and shared with the page cache; the map is private
    (copy-on-write), so writing to the tensor never writes the file, and a checkpoint replaced on
    disk later (a new file renamed over the old) leaves this view intact.

    Otherwise converted CHUNK_BYTES (256 MiB) at a time, each converted chunk's file pages dropped
    from this process (MADV_DONTNEED) at once: peak memory stays the loaded model plus a chunk, and
    the conversion reads the page cache directly instead of copying through a buffer first.
    `out`: a flat buffer of at least the tensor's size to convert into instead of new memory, for a
    tensor the caller replaces at once (packing.py reorders it): fresh memory costs a page fault per
    4 KiB on first write, ~1.4 M faults for the 5.85 GB of a 3B model.
    """
    src = FILE_DTYPES[info["dtype"]]
    target = dtype if src.is_floating_point else src
    numel = math.prod(info["shape"])
    if src == target and torch.device(device).type == "cpu" and numel:
        return torch.frombuffer(mm, dtype=src, count=numel, offset=info["offset"]).view(info["shape"])
    out = torch.empty(info["shape"], dtype=target) if out is None else out[:numel].view(info["shape"])
    flat = out.view(-1)
    itemsize = torch.empty((), dtype=src).element_size()
    per_chunk = max(1, CHUNK_BYTES // itemsize)
    for i in range(0, flat.numel(), per_chunk):
        n = min(per_chunk, flat.numel() - i)
        start = info["offset"] + i * itemsize
        flat[i:i + n].copy_(torch.frombuffer(mm, dtype=src, count=n, offset=start))
        release(mm, start, n * itemsize)
    return out.to(device)


# The maps load_state made, as (address, weak reference): pages under a view can be given back.
_MAPS: list[tuple[int, weakref.ref]] = []


def _map_of(t: torch.Tensor):
    """(map, its address) if `t` lies inside a checkpoint map made here, else None."""
    if t.device.type != "cpu":
        return None
    start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    for base, ref in _MAPS:
        mm = ref()
        if mm is not None and base <= start and start + nbytes <= base + len(mm):
            return mm, base
    return None


def mapped(t: torch.Tensor) -> bool:
    """Whether `t` is a view of a checkpoint file (read_tensor's zero-copy case), not memory of its own."""
    return _map_of(t) is not None


def drop_file_pages(t: torch.Tensor):
    """If `t` is a view of a checkpoint map made here, drop its whole pages from this process: they are
    read from the file again if `t` is used again. Packing calls this once it holds its own copy, so a
    packed model's memory is the packed copies, not those plus the mapped file. Any other tensor: no-op."""
    found = _map_of(t)
    if found is None:
        return
    mm, base = found
    start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    first = -(-(start - base) // mmap.PAGESIZE) * mmap.PAGESIZE  # inward: neighbours keep their pages
    last = (start - base + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


def release(mm: mmap.mmap, start: int, length: int):
    """Unmap [start, start + length) rounded out to whole pages (a shared page is simply read again)."""
    if hasattr(mm, "madvise"):
        first = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, first, min(len(mm), start + length) - first)


def address(mm: mmap.mmap) -> int:
    return torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr() if len(mm) else 0


def canonical(key: str) -> str:
    for pattern, repl in KEY_REWRITES:
        key = re.sub(pattern, repl, key)
    return key


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
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # outlives f, and lives as long as a view of it
            _MAPS[:] = [(b, r) for b, r in _MAPS if r() is not None] + [(address(mm), weakref.ref(mm))]
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
                    quantize=None):
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
    elif inference and packing.packable(device, dtype):  # each linear weight packed as soon as it is read
        convert, transient, packed = packing.converter(model)
    state = load_state(folder, model, dtype, device, convert, transient)
    if quantize:
        q.quantize(model, quantize, head=False)  # on meta: empty quantized layers for the state to fill
    model.load_state_dict(state, strict=True, assign=True)
    if inference:  # frozen, and on CPU packed for speed (packing.py)
        if quantize:  # logits from an int8 copy of the table rather than a packed bf16 one
            q.int8_head(model)
        packing.pack(model.requires_grad_(False), packed=packed, after=packing.AFTER)
    return model.eval()


def save_pretrained(model: torch.nn.Module, directory: str | Path, max_shard_bytes: int | None = None,
                    state_dict: dict | None = None):
    """Write config.json + safetensors in the hub layout (sharded with an index past max_shard_bytes),
    atomically: `directory` is the old whole folder or the new whole one. `state_dict`: weights to
    write instead of the model's own (a merged LoRA export, a state gathered from FSDP shards)."""
    from safetensors.torch import save_file
    from .atomic import atomic_dir
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
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
