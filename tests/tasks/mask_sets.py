"""Tiny segmentation sets with a mask file per object, written into a test's folder."""
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def shape_mask(kind: str, box, size: int) -> np.ndarray:
    """(size, size) bool: a filled rectangle or ellipse whose tight box is `box` (x0, y0, x1, y1, ends exclusive)."""
    m = Image.new("L", (size, size))
    x0, y0, x1, y1 = box
    (ImageDraw.Draw(m).rectangle if kind == "rectangle" else ImageDraw.Draw(m).ellipse)([x0, y0, x1 - 1, y1 - 1],
                                                                                          fill=255)
    return np.asarray(m) > 0


def write_mask_set(root: Path, splits=(("train", 4), ("val", 2), ("test", 2)), size=64, prefix="segment shape",
                   boxes=((8, 16, 40, 48),), kinds=("rectangle",), seed=0) -> Path:
    """root/rows.jsonl, images in root/images/, masks in root/masks/ (paths relative to the JSONL's folder):
    per image one object, the i-th of each split cycling through `boxes` and `kinds`, labelled by its kind,
    drawn bright on dark noise. -> the JSONL's path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    g, rows = np.random.default_rng(seed), []
    for split, n in splits:
        for i in range(n):
            box, kind = boxes[i % len(boxes)], kinds[i % len(kinds)]
            mask = shape_mask(kind, box, size)
            pixels = g.integers(0, 60, (size, size, 3), dtype=np.uint8)
            pixels[mask] = (230, 200, 40)
            name = f"{split}{i}"
            Image.fromarray(pixels).save(root / "images" / f"{name}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
            rows.append(dict(image=f"{name}.png", prefix=prefix, masks=[dict(mask=f"masks/{name}.png", label=kind)],
                             split=split))
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "rows.jsonl"
