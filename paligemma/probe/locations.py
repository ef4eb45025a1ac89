"""The boxes a probed answer wrote, and where the model looked when it wrote each of their `<loc>` tokens.

A detect or segment answer is four `<locNNNN>` tokens per object, y_min x_min y_max x_max, each the
coordinate as t / 1023 of the image's height or width, then a label; objects are separated by " ; "
(tasks/boxes.py). For the report page this reads, from the generated ids:

- the boxes, as parse_detections reads the text, in pixels of the image the user gave (width x height);
- for every `<loc>` token: which object (piece between ";") and which of its four coordinates it is, the
  value it encodes, the detection it belongs to (None when its piece was malformed and dropped), and the
  attention over the image patches of the query that chose it (the report's heat map of that token,
  layers and heads averaged). Token i was chosen at call i's last query position (Recording), so that is
  where the model looked when it wrote the coordinate.

Axes: n generated tokens, L decoder layers, H heads, g the patch grid's side (16 at 224 px).
"""
import numpy as np

from ..tasks.boxes import LOC, label_colour, parse_detections
from ..tasks.segmentation import parse_segmentations

COORDINATES = ("y_min", "x_min", "y_max", "x_max")  # the four <loc> tokens of a box, in the order written


def locations(tokenizer, ids: list[int], heat: np.ndarray, width: int, height: int) -> dict:
    """ids: the n generated tokens; heat (n, L, H, g, g): each token's attention over the patches
    (report.summarize). -> {"width", "height", "detections": [{label, box (x0, y0, x1, y1) px, colour}], "detections_dropped",
    "loc_tokens": [{token, piece, value, object, coordinate, detection, attention (g, g)}]}: empty lists when
    the answer has no <loc> tokens (a caption)."""
    text = tokenizer.decode(ids)
    detections, index = [], []  # index: per piece between ";", its detection's number or None
    for piece in text.split(";"):
        found = parse_detections(piece, width, height)
        index.append(len(detections) if found else None)
        detections += found
    dropped = parse_detections(text, width, height).dropped if text.strip() else 0
    per_token = heat.mean(axis=(1, 2))  # (n, g, g): layers and heads averaged, as the page opens
    locs, seen = [], {}  # seen: <loc> tokens so far in each object
    for i, t in enumerate(ids):
        if t in tokenizer.special_ids or t >= tokenizer.sp.get_piece_size():
            continue
        m = LOC.fullmatch(tokenizer.sp.id_to_piece(t))
        if not m:
            continue
        k = tokenizer.decode(ids[:i]).count(";")  # the object this token is part of
        r = seen[k] = seen.get(k, -1) + 1
        locs.append(dict(token=i, piece=m.group(0), value=int(m.group(1)), object=k,
                         coordinate=COORDINATES[r] if r < 4 else None,
                         detection=index[k] if k < len(index) else None, attention=per_token[i].tolist()))
    return dict(width=width, height=height, detections=[dict(label=d.label, box=list(d.box), colour="#%02x%02x%02x" % label_colour(d.label)) for d in detections],
                detections_dropped=dropped, loc_tokens=locs)


def segment_masks(text: str, width: int, height: int, decoder) -> list:
    """A segment answer's masks, one per detection of locations() in its order: (height, width) bool, placed
    as parse_segmentations places them, or None where that piece is a box without sixteen valid <seg> codes.
    decoder: a MaskDecoder (the --vae file)."""
    masks = []
    for piece in text.split(";"):
        if parse_detections(piece, width, height):
            found = parse_segmentations(piece, width, height, decoder)
            masks.append(found[0].mask if found else None)
    return masks
