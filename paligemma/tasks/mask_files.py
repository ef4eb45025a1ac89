"""Segmentation rows with a mask file per object: read and checked, made into training answers, and used
as the references they are.

    {"image": "a.png", "prefix": "segment roof", "masks": [{"mask": "masks/a_0.png", "label": "roof"}], "split": "train"}

Each object: `mask`, an image file (PNG) the size of the row's image, nonzero pixels inside the object
(any colour channel; alpha is ignored);
`label`, its name; optionally `box` [x0, y0, x1, y1] in pixels (else the mask's tight box: the first
and one past the last row and column with a pixel set). Mask paths are relative to the data file's folder
and may not leave it. A mask row's prefix must ask for segmentation (`segment ...`): its answer is <seg>
codes, which a caption prompt would train as words.

Training answers (`with_answers`): each object as big_vision's `refcoco_mask2str` writes it
(segmentation.segment_tokens: four <loc>, sixteen <seg> codes of the mask's crop by the VQ-VAE's
encoder), then " " and its label, objects joined by " ; " as detection answers are; made once at load.
References (`reference_segments`): the mask files themselves at the image's size, the first object the
one scored (big_vision's evaluator scores one object per example), never the codes decoded back, so a
coarse 4 x 4 code grid costs the model the IoU it really loses.
"""
import dataclasses
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from .segmentation import Segmentation, Segmentations, segment_tokens


class MaskObject(NamedTuple):
    name: str  # the mask's path as the row writes it
    path: Path  # the file: the data file's folder / name
    label: str
    box: tuple | None  # pixels x0, y0, x1, y1: the row's "box" or the mask's tight box; None when not read (unchecked)


def read_mask(path: Path) -> np.ndarray:
    """A mask file -> (H, W) bool, True where any colour channel is nonzero (an alpha channel is left out: an
    opaque RGBA export would otherwise be all object; a palette image: its index, as VOC's)."""
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
            if im.mode in ("LA", "RGBA", "PA"):
                a = a[..., :-1]
    except FileNotFoundError:
        raise ValueError(f"mask file {path} not found") from None
    except Exception as e:  # PIL's decode errors share no base class (processor.read_image)
        raise ValueError(f"mask file {path} is not a readable image ({type(e).__name__}: {e})") from None
    return a.any(-1) if a.ndim == 3 else a != 0


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the pixels set, ends exclusive: a one-pixel mask at (x, y) is (x, y, x + 1, y + 1)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def read_objects(where: str, row: dict, folder: Path, image_size: tuple[int, int] | None) -> tuple[MaskObject, ...]:
    """A row's "masks" field -> its objects, each checked: the fields, and (image_size (W, H) given) the file
    read, the image's size, not empty, the box inside the image with a mask pixel in it. Errors (ValueError)
    name `where` (file:line) and the field, e.g. "masks[1].label"."""
    if any(k == "suffix" or k.startswith(("suffix", "caption")) for k in row):
        raise ValueError(f"{where}: both 'masks' and a suffix or captions: give one of them (a mask row's answer is "
                         "made from its masks)")
    prefix = row.get("prefix")
    if not (isinstance(prefix, str) and prefix.split() and prefix.split()[0].lower() == "segment"):
        raise ValueError(f"{where}: a row with 'masks' needs a segmentation prefix (\"segment roof\"), got {prefix!r}")
    masks = row["masks"]
    if not isinstance(masks, list) or not masks:
        raise ValueError(f"{where}: 'masks' must be a non-empty list of {{\"mask\": file, \"label\": name}} objects "
                         f"(JSONL), got {masks!r:.80}")
    return tuple(_read_object(f"{where}: masks[{i}]", m, folder, image_size) for i, m in enumerate(masks))


def _read_object(where: str, obj, folder: Path, image_size) -> MaskObject:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object {{\"mask\": file, \"label\": name}}, got {obj!r:.60}")
    unknown = sorted(set(obj) - {"mask", "label", "box"})
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (an object has 'mask', 'label' and optionally 'box')")
    name, label = obj.get("mask"), obj.get("label")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}.mask: missing; expected the mask file's path, relative to {folder}")
    if not isinstance(label, str) or not label.strip() or ";" in label or "<" in label:
        raise ValueError(f"{where}.label: expected the object's name, a non-empty string without ';' or '<', got {label!r}")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError(f"{where}.mask: path {name!r} leaves the data folder {folder}")
    box = obj.get("box")
    if box is not None:
        box = _box(f"{where}.box", box, image_size)
    path = folder / name
    if image_size is None:  # unchecked load: fields only
        return MaskObject(name, path, label.strip(), box)
    try:
        mask = read_mask(path)
    except ValueError as e:
        raise ValueError(f"{where}.mask: {e}") from None
    w, h = image_size
    if mask.shape != (h, w):
        raise ValueError(f"{where}.mask: {path} is {mask.shape[1]} x {mask.shape[0]}, the image {w} x {h}: a mask "
                         "must be the size of its image")
    if not mask.any():
        raise ValueError(f"{where}.mask: {path} is empty (no nonzero pixel): nothing to segment")
    if box is None:
        box = tight_box(mask)
    else:
        x0, y0, x1, y1 = (round(v) for v in box)  # the crop segment_tokens takes
        if not mask[y0:y1, x0:x1].any():
            raise ValueError(f"{where}.box: {list(box)} holds no pixel of the mask {path}")
    return MaskObject(name, path, label.strip(), box)


def _box(where: str, box, image_size) -> tuple[float, float, float, float]:
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           and math.isfinite(v) for v in box)):
        raise ValueError(f"{where}: expected [x0, y0, x1, y1] in pixels, got {box!r:.60}")
    x0, y0, x1, y1 = box
    w, h = image_size or (math.inf, math.inf)
    if not (0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h and round(x0) < round(x1) and round(y0) < round(y1)):
        raise ValueError(f"{where}: {box} is not a box of whole pixels inside the {w} x {h} image "
                         "(0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height, after rounding)")
    return tuple(float(v) for v in box)


def answer(objects, encoder) -> str:
    """The training answer of a mask row: "<loc>x4<seg>x16 label" per object, joined by " ; "."""
    return " ; ".join(f"{segment_tokens(read_mask(o.path), o.box, encoder)} {o.label}" for o in objects)


def with_answers(examples: list, encoder) -> list:
    """The examples, each mask row's captions replaced by its one training answer (encoder: a MaskEncoder)."""
    return [dataclasses.replace(e, captions=[answer(e.masks, encoder)]) if e.masks else e for e in examples]


def reference_segments(objects) -> Segmentations:
    """A mask row's objects as the references they are: label, box, the file's mask (H, W) bool."""
    return Segmentations([Segmentation(o.label, tuple(float(v) for v in o.box), read_mask(o.path)) for o in objects])


def describe(objects) -> str:
    """A mask row's references as text, for predictions.jsonl and tables: "masks/a_0.png roof ; ..."."""
    return " ; ".join(f"{o.name} {o.label}" for o in objects)


def training_answers(task: str, vae: str | None, *splits: list) -> list[list]:
    """Before any model loads: a segment set needs --vae; rows with mask files get their answers from its
    encoder half (made once, here). -> the splits, mask rows answered."""
    from .vqvae import VAE_HELP, MaskEncoder
    if task == "segment" and not vae:
        first = next((e for s in splits for e in s), None)
        raise ValueError(f"a segmentation set (prompt {getattr(first, 'prefix', None)!r}, e.g. "
                         f"{getattr(getattr(first, 'image', None), 'name', '?')}) needs --vae PATH: {VAE_HELP}")
    if vae and task != "segment":
        raise ValueError(f"--vae decodes the masks of segment sets; this is a {task} set (drop --vae)")
    if not any(e.masks for s in splits for e in s):
        return list(splits)
    encoder = MaskEncoder.from_npz(vae)
    return [with_answers(s, encoder) for s in splits]
