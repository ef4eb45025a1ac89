"""Boxes <-> PaliGemma's `<locNNNN>` tokens, and boxes drawn on the image.

A detection answer is one object after another, separated by " ; ":

    <loc0256><loc0128><loc0512><loc0384> plane ; <loc0000><loc0640><loc0255><loc1023> tank

Each object is four location tokens, y_min x_min y_max x_max (y first), each the coordinate divided
by the image's own height or width, times 1023, rounded and clipped to 0..1023; then its label.
big_vision writes them so in `pp/proj/paligemma/segmentation.py` (`refcoco_mask2str`:
`tf.round(bbox * 1023)`, `tf.clip_by_value(.., 0, 1023)`, bbox in TFDS's [y_min, x_min, y_max,
x_max] order; `tf.round` rounds halves to even, as Python's `round` does) and reads them back in
`evaluators/proj/paligemma/transfers/segmentation.py` (`Evaluator.run`: `tokens / 1023`, a box
valid only when `t[2] > t[0] and t[3] > t[1]`). Boxes here are pixels `(x0, y0, x1, y1)`, the
order PIL draws and COCO thinks in (as x, y, w, h).
"""
import re
import zlib
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

from ..tokenizer import LOC_TOKENS, SEG_TOKENS  # noqa: F401 (SEG_TOKENS: part of this package's face)

BINS = len(LOC_TOKENS)  # <loc0000> ... <loc1023>
LOC = re.compile(r"<loc(\d{4})>")
SEG = re.compile(r"<seg\d{3}>")  # a segment answer's 16 mask tokens follow its box: not part of the label


class Detection(NamedTuple):
    label: str
    box: tuple[float, float, float, float]  # pixels: x0, y0, x1, y1
    score: float = 1.0  # the model's confidence (mean probability of the four <loc> tokens); 1.0 when unknown


class Detections(list):
    """A list of Detection that also says how many pieces of the text were malformed and dropped."""

    def __init__(self, items=(), dropped: int = 0):
        super().__init__(items)
        self.dropped = dropped


def _bin(v: float, size: float) -> int:
    return min(max(round(v / size * (BINS - 1)), 0), BINS - 1)


def loc_tokens(box, width: float, height: float) -> str:
    """Pixel box (x0, y0, x1, y1) of a width x height image -> "<locY0><locX0><locY1><locX1>"."""
    x0, y0, x1, y1 = box
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width} x {height}: width and height must be positive")
    return "".join(LOC_TOKENS[_bin(v, s)] for v, s in ((y0, height), (x0, width), (y1, height), (x1, width)))


def detect_prompt(labels) -> str:
    """["plane", "ship"] -> "detect plane ; ship" (PaliGemma's detection prefix)."""
    labels = [str(l).strip() for l in labels]
    if not labels or not all(labels) or any(";" in l for l in labels):
        raise ValueError(f"detect_prompt: labels must be non-empty and without ';', got {labels!r}")
    return "detect " + " ; ".join(labels)


def detection_text(detections, width: float, height: float) -> str:
    """The suffix PaliGemma is trained to write: [(label, box), ...] -> "<loc..>x4 label ; ..."."""
    return " ; ".join(f"{loc_tokens(d[1], width, height)} {d[0]}" for d in detections)


def parse_detections(text: str, width: float, height: float, loc_probs=None) -> Detections:
    """Generated text -> Detections of (label, (x0, y0, x1, y1) in pixels, score), never raising on bad
    text. Pieces between ";" that are not exactly four <loc> tokens and a label, whose tokens leave the
    grid (<loc1024> and up: no such token, so no such box; big_vision's `_inrange(t, 0, 1023)`), or whose
    box is empty (y_max <= y_min or x_max <= x_min, big_vision's validity test), are dropped and counted
    in `.dropped`; empty pieces (a trailing " ; ") separate nothing and are no object. `<seg>` tokens
    after the box (a segment answer) are skipped.

    loc_probs: the probability the model gave each `<locNNNN>` of `text`, in order of appearance;
    a box's score is the mean of its four. Without it every score is 1.0."""
    if loc_probs is not None and len(loc_probs) != len(LOC.findall(text)):
        raise ValueError(f"loc_probs has {len(loc_probs)} values for {len(LOC.findall(text))} <loc> tokens in the text")
    out, dropped, seen = Detections(), 0, 0  # seen: <loc> tokens before the current piece
    for piece in filter(str.strip, text.split(";")):
        first, seen, read = seen, seen + len(LOC.findall(piece)), _read(piece)
        if read is None:
            dropped += 1
            continue
        label, (y0, x0, y1, x1) = read
        score = 1.0 if loc_probs is None else sum(float(p) for p in loc_probs[first:first + 4]) / 4
        box = (x0 / (BINS - 1) * width, y0 / (BINS - 1) * height, x1 / (BINS - 1) * width, y1 / (BINS - 1) * height)
        out.append(Detection(label, box, score))
    out.dropped = dropped
    return out


def _read(piece: str):
    """One non-empty piece of a detection answer -> (label, (y0, x0, y1, x1) tokens), or None: malformed."""
    m = re.fullmatch(r"\s*((?:<loc\d{4}>){4})((?:<seg\d{3}>)*)\s*(.*?)\s*", piece, re.S)
    label = m and m.group(3)
    if not m or not label or LOC.search(label) or SEG.search(label):
        return None
    y0, x0, y1, x1 = (int(t) for t in LOC.findall(m.group(1)))
    if max(y0, x0, y1, x1) > BINS - 1 or y1 <= y0 or x1 <= x0:
        return None
    return label, (y0, x0, y1, x1)


def loc_probs_of(text: str, box_scores) -> list[float]:
    """parse_detections' loc_probs that give the boxes of `text` these scores, in order (a saved answer
    read back, its boxes' scores saved beside it): each box's four <loc> tokens get its score, the tokens
    of dropped pieces 1.0 (never read). A count of scores other than the boxes' is a ValueError."""
    pieces = [(len(LOC.findall(p)), _read(p) is not None) for p in filter(str.strip, text.split(";"))]
    if len(box_scores) != sum(box for _, box in pieces):
        raise ValueError(f"{len(box_scores)} box scores for the {sum(b for _, b in pieces)} boxes of {text[:60]!r}")
    scores = iter(box_scores)
    return [v for n, box in pieces for v in ([next(scores)] * 4 if box else [1.0] * n)]


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]
REFERENCE = (255, 255, 255)


def label_colour(label: str) -> tuple[int, int, int]:
    """A label's colour, the same in every picture (and on the probe's report page)."""
    return PALETTE[zlib.crc32(label.encode()) % len(PALETTE)]


def draw(image: Image.Image, detections, references=(), min_size: int = 256) -> Image.Image:
    """A copy of `image` with each detection's box and "label score" drawn (one colour per label), and
    `references` (label, box) as thin white boxes. Small images are first enlarged (nearest neighbour)
    to `min_size` on their short side so that the labels can be read; boxes are scaled with them."""
    image = image.convert("RGB")
    k = max(1, -(-min_size // min(image.size)))  # whole-number zoom keeps pixel edges sharp
    image = image.resize((image.width * k, image.height * k), Image.NEAREST) if k > 1 else image.copy()
    d, font = ImageDraw.Draw(image), ImageFont.load_default()
    for label, box, *_ in references:
        d.rectangle([v * k for v in box], outline=REFERENCE, width=1)
    for det in detections:
        label, box = det[0], det[1]
        colour = label_colour(label)
        x0, y0, x1, y1 = (v * k for v in box)
        d.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = label if len(det) < 3 else f"{label} {det[2]:.2f}"
        left, top, right, bottom = d.textbbox((x0, y0), text, font=font)
        y = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0 + 2
        d.rectangle([x0, y, x0 + right - left + 2, y + bottom - top + 2], fill=colour)
        d.text((x0 + 1, y - (top - y0)), text, fill=(0, 0, 0), font=font)
    return image
