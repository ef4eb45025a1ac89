"""Captioning data: the RISC CSV layout, or any CSV / JSONL of an image and its captions.

RISC (`captions.csv`): source, split, image, caption_1 ... caption_5, images in a folder beside it
(`images/`, `resized/`, or the CSV's own folder). Generic: an `image` column (or key) and one or
more columns starting with `caption` (or a JSONL `captions` list). Bad rows are errors that name the
file, line and field; with `skip_bad=True` they are skipped, counted and reported instead.
"""
import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_DIRS = ("images", "resized", "imgs", ".")


@dataclass
class Example:
    image: Path
    captions: list[str]
    split: str = ""


@dataclass
class Skipped:
    reasons: list[str] = field(default_factory=list)

    def __bool__(self):
        return bool(self.reasons)

    def report(self) -> str:
        head = "\n  ".join(self.reasons[:10])
        more = f"\n  ... and {len(self.reasons) - 10} more" if len(self.reasons) > 10 else ""
        return f"skipped {len(self.reasons)} bad examples:\n  {head}{more}"


class DataError(ValueError):
    pass


def find_image_dir(data: Path, image_dir: str | Path | None, first_image: str) -> Path:
    if image_dir is not None:
        return Path(image_dir)
    for d in IMAGE_DIRS:
        if (data.parent / d / first_image).exists():
            return data.parent / d
    raise DataError(f"{data}: cannot find image {first_image!r} in any of {IMAGE_DIRS} beside it; pass image_dir")


def read_rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not JSON: {e}") from None
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise DataError(f"{path}: no 'image' column (columns: {reader.fieldnames})")
        if not any(c.startswith("caption") for c in reader.fieldnames):
            raise DataError(f"{path}: no caption column (expected caption_1 ... or caption); columns: {reader.fieldnames}")
        return [(i, row) for i, row in enumerate(reader, 2)]


def load_examples(data: str | Path, split: str | None = None, image_dir=None, skip_bad: bool = False,
                  check_images: bool = True) -> tuple[list[Example], Skipped]:
    """Examples of one split (all rows if the file has no split column or split is None)."""
    path = Path(data)
    if path.is_dir():
        path = path / "captions.csv"
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    rows = read_rows(path)
    if split is not None and rows and "split" in rows[0][1]:
        rows = [(i, r) for i, r in rows if r.get("split") == split]
    if not rows:
        raise DataError(f"{path}: no examples" + (f" in split {split!r}" if split else ""))
    folder = find_image_dir(path, image_dir, str(rows[0][1].get("image", "")))
    examples, skipped = [], Skipped()
    for line, row in rows:
        try:
            examples.append(parse_row(path, line, row, folder, check_images))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e} (pass --skip-bad to skip and count such rows)") from None
            skipped.reasons.append(str(e))
    if not examples:
        raise DataError(f"{path}: every example was bad:\n{skipped.report()}")
    return examples, skipped


def parse_row(path, line, row, folder, check_images) -> Example:
    where = f"{path}:{line}"
    name = row.get("image")
    if not name:
        raise DataError(f"{where}: empty 'image' field")
    caps = row.get("captions")
    if caps is None:
        keys = sorted((k for k in row if k.startswith("caption")), key=lambda k: (len(k), k))
        caps = [row[k] for k in keys]
    empty = [i + 1 for i, c in enumerate(caps) if not (c or "").strip()]
    if empty or not caps:
        raise DataError(f"{where}: empty caption(s) {empty or 'all'} for image {name}")
    image = folder / name
    if check_images:
        if not image.exists():
            raise DataError(f"{where}: image file {image} not found")
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(image) as im:
                im.verify()
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{where}: image file {image} is corrupt ({e})") from None
    return Example(image=image, captions=[c.strip() for c in caps], split=row.get("split", ""))


def sample_caption(example: Example, rng: random.Random, first_only: bool = False) -> str:
    """One reference caption per visit: random among the five (the study used only caption_1)."""
    return example.captions[0] if first_only else rng.choice(example.captions)
