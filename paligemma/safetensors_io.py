"""safetensors files, read through memory maps: the header, one tensor, and giving pages back.

Layout of a file: u64 little-endian header size n, n bytes of JSON ({key: {dtype, shape,
data_offsets}}), then the raw tensor bytes. This module knows the format and the memory map, nothing
of PaliGemma (weights.py maps keys to the model; packing.py gives a packed weight's file pages back).

Why maps: a bf16 tensor loaded as bf16 is a view of the file (no copy; pages are read on first use
and shared with the page cache), and a float32 tensor converted to bf16 never exists in memory as
float32: it is converted CHUNK_BYTES at a time, each converted chunk's file pages dropped from this
process at once (a map that kept them would count every page read against the process: file size +
model size), so peak memory is the loaded model plus one chunk.
"""
import json
import math
import mmap
import struct
import weakref
from pathlib import Path

import torch

# safetensors header dtype names
FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
CHUNK_BYTES = 256 << 20


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read as what it claims to be; the message names it."""


def read_header(path: Path) -> dict:
    """{key: {dtype, shape, data_offsets, offset}} with `offset` the tensor's first byte in the file. The
    header and every tensor's byte range are checked against the file's size and the tensor's dtype
    and shape (a truncated download, a Git LFS pointer in place of the file, a corrupt header), so a bad
    file is named instead of read out of bounds."""
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
        if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in FILE_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} is {info['dtype']}, a dtype this reader does not take "
                                  f"(expected one of {', '.join(FILE_DTYPES)})")
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


# The maps open_map made, as (address, weak reference): pages under a view can be given back.
_MAPS: list[tuple[int, weakref.ref]] = []


def open_map(path: Path) -> mmap.mmap:
    """The whole file, mapped private (copy-on-write): writing to a view never writes the file, and a
    checkpoint replaced on disk later (a new file renamed over the old) leaves the views intact. The map
    outlives the file object and lives as long as a tensor viewing it."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    _MAPS[:] = [(b, r) for b, r in _MAPS if r() is not None] + [(_address(mm), weakref.ref(mm))]
    return mm


def _address(mm: mmap.mmap) -> int:
    return torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr() if len(mm) else 0


def read_tensor(mm: mmap.mmap, info: dict, dtype: torch.dtype, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor (`info` from read_header) from a map made by open_map.

    Already in `dtype` (bf16 files loaded as bf16, as PaliGemma 2 ships them), on the CPU: a view of the
    map, no copy. Otherwise converted CHUNK_BYTES at a time, each converted chunk's file pages dropped
    from this process at once (`release`). `out`: a flat buffer of at least the tensor's size to
    convert into instead of new memory, for a tensor the caller replaces at once (packing.py reorders
    it): fresh memory costs a page fault per 4 KiB on first write, ~1.4 M faults for a 3B model.
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


def release(mm: mmap.mmap, start: int, length: int):
    """Drop the pages of file bytes [start, start + length) from this process (MADV_DONTNEED: they are
    read from the file again if used again). Rounded *outward* to whole pages: it runs while a file is
    converted, before anything can have written to a neighbouring tensor's page, so a shared page is at
    worst read again. (drop_file_pages, which runs later, rounds inward.)"""
    if hasattr(mm, "madvise"):
        first = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, first, min(len(mm), start + length) - first)


def _map_of(t: torch.Tensor):
    """(map, its address) if `t` lies inside a map made by open_map, else None."""
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
    """If `t` is a view of a map made by open_map, drop its whole pages from this process: they are read
    from the file again if `t` is used again. Packing calls this once it holds its own copy, so a packed
    model's memory is the packed copies, not those plus the mapped file. Rounded *inward*: by now a
    neighbouring tensor may have been written to (its page copied on write), and that copy must stay.
    Any other tensor: no-op."""
    found = _map_of(t)
    if found is None:
        return
    mm, base = found
    start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    first = -(-(start - base) // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start - base + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)
