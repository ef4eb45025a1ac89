"""Segment answers <-> masks: `<loc>` box + sixteen `<seg>` codes, decoded, placed, scored and drawn.

`segment <thing>` answers one object after another, separated by " ; ", each a box, its mask codes and
(for the mix checkpoints) a label; referring-expression transfers (RefCOCO) write no label:

    <loc0256><loc0128><loc0512><loc0384><seg012><seg101>...<seg077> cat ; <loc...>...

The box tokens are y_min x_min y_max x_max, value t -> t / 1023 * size (boxes.py). The codes decode
(vqvae.py) to a 64 x 64 mask of the box's contents, which big_vision's evaluator
(`evaluators/proj/paligemma/transfers/segmentation.py`, `Evaluator.run`) places so:

    y0, x0, y1, x1 = map(int, (t0 / 1023 * H, t1 / 1023 * W, t2 / 1023 * H, t3 / 1023 * W))  # truncated
    PIL.Image.fromarray(mask64).resize([x1 - x0, y1 - y0], BILINEAR) > 0   -> pixels [y0:y1, x0:x1]

and scores one answer per example (its first object) against the reference object:
mask IoU |P & G| / (|G| + |P| - |P & G|), 0 for an invalid answer, averaged ("miou"); box IoU in
[0, 1] coordinates, counted as a hit at IoU >= 0.5 and >= 0.75 ("boxacc/0.5", "boxacc/0.75").
Boxes here are pixels (x0, y0, x1, y1), masks numpy bool (H, W) at the image's own size.
"""
import re
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .vqvae import CODES, MASK

BINS = 1024  # <loc0000> ... <loc1023>
LOC = re.compile(r"<loc(\d{4})>")
SEG = re.compile(r"<seg(\d{3})>")
PIECE = re.compile(r"\s*((?:<loc\d{4}>){4})((?:<seg\d{3}>)*)\s*(.*?)\s*", re.S)


# Local copies of boxes.py's conventions (the lead unifies them with boxes.py at merge time): four
# <loc> tokens y0 x0 y1 x1, t -> t / 1023 * size, and back by round(v / size * 1023) clipped to 0..1023.
def _loc_box(t, width: float, height: float) -> tuple[float, float, float, float]:
    return (t[1] / (BINS - 1) * width, t[0] / (BINS - 1) * height, t[3] / (BINS - 1) * width, t[2] / (BINS - 1) * height)


def _loc_string(box, width: float, height: float) -> str:
    x0, y0, x1, y1 = box
    return "".join(f"<loc{min(max(round(v / s * (BINS - 1)), 0), BINS - 1):04d}>"
                   for v, s in ((y0, height), (x0, width), (y1, height), (x1, width)))


class Segmentation(NamedTuple):
    label: str  # "" when the answer has none (RefCOCO-style transfers)
    box: tuple[float, float, float, float]  # pixels: x0, y0, x1, y1
    mask: np.ndarray  # (H, W) bool at the image's size; all False when the box is under one pixel


class Segmentations(list):
    """A list of Segmentation that also says how many pieces of the text were malformed and dropped, and why,
    and whether the first piece was one of them (the answer big_vision scores is then invalid)."""

    def __init__(self, items=(), dropped: int = 0, reasons=(), first_malformed: bool = False):
        super().__init__(items)
        self.dropped, self.reasons, self.first_malformed = dropped, list(reasons), first_malformed


def _read(piece: str, entries: int):
    """One piece of a segment answer -> (label, 4 box tokens, 16 codes), or the reason it is malformed."""
    m = PIECE.fullmatch(piece)
    if not m:
        return f"does not start with four <loc> tokens: {piece.strip()[:60]!r}"
    loc, seg, label = [int(t) for t in LOC.findall(m.group(1))], [int(t) for t in SEG.findall(m.group(2))], m.group(3)
    if len(seg) != CODES:
        return f"{len(seg)} <seg> tokens after the box, expected {CODES}"
    if "<loc" in label or "<seg" in label:
        return f"tokens after the label: {label[:60]!r}"
    if max(loc) > BINS - 1:
        return f"<loc{max(loc):04d}> outside 0..{BINS - 1}"
    if max(seg) >= entries:
        return f"<seg{max(seg):03d}> outside the codebook's 0..{entries - 1}"
    if loc[2] <= loc[0] or loc[3] <= loc[1]:
        return f"empty box: y {loc[0]}..{loc[2]}, x {loc[1]}..{loc[3]}"
    return label, loc, seg


def pixel_box(t, width: int, height: int) -> tuple[int, int, int, int]:
    """Box tokens (y0, x0, y1, x1) -> the pixels big_vision pastes the mask into: x0, y0, x1, y1, truncated."""
    y0, x0, y1, x1 = (v / (BINS - 1) for v in t)  # the evaluator's `tokens[:, :4] / 1023`
    return int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)


def place_mask(mask64: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """A decoded (64, 64) float mask -> (height, width) bool: resized into the pixel box (x0, y0, x1, y1)
    with PIL's bilinear filter and thresholded at 0, as big_vision's evaluator does; empty when the box is
    under one pixel wide or high."""
    x0, y0, x1, y1 = box
    out = np.zeros((height, width), bool)
    if x1 > x0 and y1 > y0:
        resized = Image.fromarray(np.asarray(mask64, np.float32)).resize([x1 - x0, y1 - y0], resample=Image.BILINEAR)
        out[y0:y1, x0:x1] = np.asarray(resized) > 0.0
    return out


def parse_segmentations(text: str, width: int, height: int, decoder) -> Segmentations:
    """Generated text -> Segmentations of (label, (x0, y0, x1, y1) in pixels, (height, width) bool mask),
    never raising on bad text. Pieces between ";" that are not four <loc> tokens, sixteen <seg> tokens and
    an optional label, with codes the decoder knows and a non-empty box (big_vision's validity test), are
    dropped, counted in `.dropped`, and their reasons listed in `.reasons`; `.first_malformed` says the
    first piece was (the evaluator scores only the first object). decoder: a MaskDecoder."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width} x {height}: width and height must be positive")
    reads = [_read(piece, decoder.entries) for piece in (text.split(";") if text.strip() else [])]
    found, reasons = [r for r in reads if not isinstance(r, str)], [r for r in reads if isinstance(r, str)]
    out = Segmentations(dropped=len(reasons), reasons=reasons, first_malformed=bool(reads) and isinstance(reads[0], str))
    if found:
        with torch.no_grad():
            masks = decoder(torch.tensor([seg for _, _, seg in found])).cpu().numpy()  # (N, 64, 64)
        for (label, loc, _), m in zip(found, masks):
            out.append(Segmentation(label, _loc_box(loc, width, height), place_mask(m, pixel_box(loc, width, height),
                                                                                 width, height)))
    return out


def malformed_segmentations(text: str, entries: int = 128) -> list[str]:
    """Why each piece of a segment answer that does not parse fails (none: it parses whole), without a
    decoder: what a training row is checked with. entries: the codebook's size (vae-oid.npz: 128)."""
    return [r for r in (_read(p, entries) for p in text.split(";")) if isinstance(r, str)] if text.strip() else []


def segment_tokens(mask: np.ndarray, box, encoder) -> str:
    """The answer PaliGemma is trained to write for one object, as big_vision's `refcoco_mask2str` makes it:
    "<loc>" x 4 for the box, then the sixteen "<seg>" codes of the mask cropped to the box (pixels rounded),
    resized to 64 x 64 (bilinear, antialiased) in [0, 1]. mask: (H, W), nonzero inside the object (bool, 0 / 1,
    or RefCOCO's 0 / 255); box: (x0, y0, x1, y1) pixels; encoder: a MaskEncoder."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"segment_tokens: expected a (height, width) mask, got shape {mask.shape}")
    h, w = mask.shape
    x0, y0, x1, y1 = (round(v) for v in box)  # tf.round, like Python's, rounds halves to even
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"segment_tokens: box {tuple(box)} rounds to no pixels of a {w} x {h} mask")
    crop = torch.from_numpy((mask > 0).astype(np.float32))  # big_vision: uint8 0 / 255 resized, then / 255
    crop = torch.nn.functional.interpolate(crop[None, None, y0:y1, x0:x1], size=(MASK, MASK), mode="bilinear",
                                           align_corners=False, antialias=True)[:, 0]  # (1, 64, 64)
    with torch.no_grad():
        codes = encoder(crop)[0].tolist()
    return _loc_string(box, w, h) + "".join(f"<seg{c:03d}>" for c in codes)


def _area(x0, y0, x1, y1) -> float:
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def box_iou(a, b) -> float:
    """IoU of two boxes (x0, y0, x1, y1), the evaluator's formula (its `_area` clips negative sides to 0)."""
    inter = _area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return inter / (_area(*a) + _area(*b) - inter)


def score_segmentations(predictions, references, thresholds=(0.5, 0.75)) -> dict:
    """big_vision's segmentation scores. predictions: per example the parsed answer (parse_segmentations'
    Segmentations, or a plain list of Segmentation), of which the first object is scored, as the evaluator
    reads the first 20 tokens: an answer whose first piece was malformed (`.first_malformed`) or with no
    object is invalid, mask and box IoU 0, even when a later piece parses; references: per example (box,
    mask) of the one reference object, box in pixels, mask (H, W) bool.
    -> {"miou", "boxacc/0.5", "boxacc/0.75", "invalid", "total"}; "invalid" counts those answers and those
    whose box is under one pixel (mask IoU 0; that box still counts for box accuracy, as in the evaluator)."""
    items, invalid = segmentation_items(predictions, references, thresholds)
    n = len(references)
    return {**{k: sum(v) / n for k, (v, _) in items.items()}, "invalid": invalid, "total": n}


def segmentation_items(predictions, references, thresholds=(0.5, 0.75)) -> tuple[dict, int]:
    """score_segmentations per example: ({"miou": (mask IoUs, ones), "boxacc/t": (hits 0 / 1, ones)}, invalid),
    each score the mean of its values."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("score_segmentations: no examples to score")
    ious, hits, invalid = [], {t: [] for t in thresholds}, 0
    for i, (pred, (ref_box, ref_mask)) in enumerate(zip(predictions, references)):
        ref_mask = np.asarray(ref_mask, bool)
        if ref_mask.ndim != 2 or not ref_mask.any():
            raise ValueError(f"reference {i}: expected a non-empty (height, width) mask, got shape {ref_mask.shape} "
                             f"with {int(ref_mask.sum())} pixels set")
        if not pred or isinstance(pred, Segmentations) and pred.first_malformed:
            invalid += 1
            ious.append(0.0)  # and a box IoU of 0: the evaluator scores zeroed tokens
            for t in thresholds:
                hits[t].append(0.0)
            continue
        box, mask = pred[0].box, np.asarray(pred[0].mask, bool)
        if mask.shape != ref_mask.shape:
            raise ValueError(f"example {i}: predicted mask {mask.shape} but reference mask {ref_mask.shape}")
        iou = box_iou(box, ref_box)
        for t in thresholds:
            hits[t].append(float(t <= iou))
        inter = (mask & ref_mask).sum()
        invalid += _empty_box(box)
        ious.append(float(inter / (ref_mask.sum() + mask.sum() - inter)))
    ones = [1] * len(references)
    return {"miou": (ious, ones), **{f"boxacc/{t}": (hits[t], ones) for t in thresholds}}, invalid


def _empty_box(box) -> bool:
    """Whether a parsed box truncates to no pixels (the evaluator's `x2 <= x1 or y2 <= y1` after int())."""
    x0, y0, x1, y1 = box
    return int(x1) <= int(x0) or int(y1) <= int(y0)


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]


def draw_segmentations(image: Image.Image, segmentations, alpha: float = 0.45, min_size: int = 256) -> Image.Image:
    """A copy of `image` with each mask tinted in (one colour per object), its box outlined and its label
    written. Small images are first enlarged (nearest neighbour) to `min_size` on the short side."""
    image = image.convert("RGB")
    k = max(1, -(-min_size // min(image.size)))  # whole-number zoom keeps mask edges on pixel edges
    out = np.asarray(image.resize((image.width * k, image.height * k), Image.NEAREST), np.float32)
    for n, s in enumerate(segmentations):
        m = np.asarray(s.mask, bool).repeat(k, 0).repeat(k, 1)
        if m.shape != out.shape[:2]:
            raise ValueError(f"draw_segmentations: mask {n} is {s.mask.shape}, the image {image.height, image.width}")
        out[m] = (1 - alpha) * out[m] + alpha * np.array(PALETTE[n % len(PALETTE)], np.float32)
    image = Image.fromarray(out.round().astype(np.uint8))
    d, font = ImageDraw.Draw(image), ImageFont.load_default()
    for n, s in enumerate(segmentations):
        colour, (x0, y0, x1, y1) = PALETTE[n % len(PALETTE)], (v * k for v in s.box)
        d.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        if s.label:
            left, top, right, bottom = d.textbbox((x0, y0), s.label, font=font)
            y = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0 + 2
            d.rectangle([x0, y, x0 + right - left + 2, y + bottom - top + 2], fill=colour)
            d.text((x0 + 1, y - (top - y0)), s.label, fill=(0, 0, 0), font=font)
    return image
