"""Training data: the RISC CSV layout, any CSV / JSONL of an image and its captions, or rows with a prompt each.

RISC (`captions.csv`): source, split, image, caption_1 ... caption_5, images in a folder beside it
(`images/`, `resized/`, or the CSV's own folder). Generic: an `image` column (or key) and one or
more columns starting with `caption` (or a JSONL `captions` list). Every task (big_vision's and the
transformers fine-tuning guides' layout): rows {"image", "prefix", "suffix", "split"}, the prefix the
row's own prompt ("detect plane ; ship", "answer en how many planes?"; left out: the run's --prompt)
and the suffix its answer, a string or (JSONL) a list of several references (CSV: columns `suffix`,
`suffix_2`, ...). A segment row may give a mask file per object instead of a suffix ("masks": [{"mask",
"label", "box"}], tasks/mask_files.py): its answer is made from them once the VQ-VAE is at hand. A suffix with `<loc>` / `<seg>` tokens must parse whole (tasks/boxes.py,
tasks/segmentation.py): a detection row whose answer loses a piece would train on one thing and be
scored on another. Bad rows are errors that name the
file, line and field; with `skip_bad=True` they are skipped, counted and reported instead. Images are
decoded in full when checked (a truncated JPEG passes PIL's verify() and would fail hours later).

Refused whatever `skip_bad` says, because each would change what is measured rather than lose a row:
a split asked of a file without a `split` column (every row would be in every split: validation and
test on the training images), the same image with the same prompt on two rows of a split (one row's
references would hide the other's; VQA's several questions per image are rows of their own), two columns (or JSON keys) of one name (one would silently hide the other), and
image paths that leave the image folder (`../x.jpg`, `/etc/passwd`). Spaces around a column name or
a split value are stripped (` test` is the test split: a spreadsheet's stray space must not drop a
row from the split it names).
"""
import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_DIRS = ("images", "resized", "imgs", ".")


@dataclass
class Example:
    image: Path
    captions: list[str]  # the references: RISC's captions, or a row's suffix (one or several)
    split: str = ""
    prefix: str | None = None  # the row's own prompt ("detect plane ; ship"); None: the run's --prompt
    masks: tuple | None = None  # a segment row's mask files (tasks/mask_files.py); captions: [] until answered


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


def read_text(path: Path) -> str:
    """The file as UTF-8 (a BOM is dropped); a decode error names the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                        "save the file as UTF-8") from None


def read_jsonl(path: Path, text: str) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; a line that is not JSON, or an object with
    a key twice (json keeps the last one silently), is named."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            def unique(pairs, i=i):
                keys = [k for k, _ in pairs]
                twice = sorted({k for k in keys if keys.count(k) > 1})
                if twice:
                    raise DataError(f"{path}:{i}: key {twice[0]!r} appears twice in one object")
                return dict(pairs)
            try:
                rows.append((i, json.loads(line, object_pairs_hook=unique)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not JSON: {e}") from None
    return rows


def split_of(row: dict) -> str:
    """A row's split, spaces stripped."""
    value = row.get("split")
    return value.strip() if isinstance(value, str) else value


def read_rows(path: Path) -> list[tuple[int, dict]]:
    text = read_text(path)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path, text)
        for i, row in rows:
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object with 'image' and captions, got "
                                f"{type(row).__name__}")
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is not None:
        reader.fieldnames = names = [c.strip() for c in reader.fieldnames]
        twice = [c for c in dict.fromkeys(names) if c and names.count(c) > 1]
        if twice:
            where = [i + 1 for i, c in enumerate(names) if c == twice[0]]
            raise DataError(f"{path}: column {twice[0]!r} appears {len(where)} times (columns {where}); one would "
                            "hide the other: give each column its own name")
    if reader.fieldnames is None or "image" not in reader.fieldnames:
        raise DataError(f"{path}: no 'image' column (columns: {reader.fieldnames})")
    if not any(c.startswith(("caption", "suffix")) for c in reader.fieldnames):
        raise DataError(f"{path}: no caption column (expected caption_1 ... or caption, or a prefix / suffix pair); "
                        f"columns: {reader.fieldnames}")
    return csv_rows(reader)


def csv_rows(reader: csv.DictReader) -> list[tuple[int, dict]]:
    """(the line each row starts on, row). The row's last line, less the line breaks inside its quoted
    fields: the reader skips blank lines, so counting on from the previous row would be off."""
    rows = []
    for row in reader:
        fields = [x for v in row.values() for x in (v if isinstance(v, list) else [v]) if x]
        rows.append((reader.line_num - sum(len(re.findall(r"\r\n|\r|\n", x)) for x in fields), row))
    return rows


def load_examples(data: str | Path, split: str | None = None, image_dir=None, skip_bad: bool = False,
                  check_images: bool = True) -> tuple[list[Example], Skipped]:
    """Examples of one split (every row with split=None)."""
    path = Path(data)
    if path.is_dir():
        path = path / "captions.csv"
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    rows = read_rows(path)
    if split is not None and rows:
        if not any("split" in r for _, r in rows):
            raise DataError(f"{path}: no 'split' column, so there is no split {split!r}: every row would be in "
                            "every split (validation and test on the training images). Add a split column "
                            "(train / val / test)")
        rows = [(i, r) for i, r in rows if split_of(r) == split]
    if not rows:
        raise DataError(f"{path}: no examples" + (f" in split {split!r}" if split else ""))
    check_unique(path, rows)
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


def check_unique(path: Path, rows):
    """One row per (image, prefix) in a split: a caption set has one row per image, a VQA set one per question."""
    seen = {}
    for line, row in rows:
        name, prefix = row.get("image"), row.get("prefix")
        key = (name, prefix if isinstance(prefix, str) else None)
        if name and key in seen:
            asked = f" with prefix {prefix!r}" if key[1] is not None else ""
            raise DataError(f"{path}:{line}: image {name!r}{asked} is also on line {seen[key]} of the same split: "
                            "put all its references on one row (one row per image and prompt)")
        seen.setdefault(key, line)


def inside(folder: Path, name: str) -> Path:
    """folder / name, refused if the name leaves the folder (judged on the text, so symlinked images work)."""
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
        raise DataError(f"image path {name!r} leaves the image folder {folder}")
    return folder / name


def parse_row(path, line, row, folder, check_images) -> Example:
    where = f"{path}:{line}"
    name = row.get("image")
    if not name or not isinstance(name, str):
        raise DataError(f"{where}: empty 'image' field")
    prefix = row.get("prefix")
    if prefix is not None and (not isinstance(prefix, str) or not prefix.strip()):
        raise DataError(f"{where}: 'prefix' must be a non-empty string (the row's prompt, e.g. \"detect plane\"; "
                        f"leave it out to use --prompt), got {prefix!r}")
    if "masks" in row:
        return mask_row(where, row, path.parent, folder, check_images)
    caps = references(where, row)
    empty = [i + 1 for i, c in enumerate(caps) if not (c or "").strip()]
    from ..tasks.registry import names_task, task_of
    if caps and len(empty) == len(caps) and names_task(prefix) and task_of(prefix) == "detect":
        # an image with none of the asked objects: trained to answer <eos> at once (nothing to box), and
        # scored with no reference box, so each box predicted on it is a false alarm
        image, _ = checked_image(where, folder, name, check_images)
        return Example(image=image, captions=[""], split=split_of(row) or "", prefix=prefix.strip())
    if empty or not caps:
        raise DataError(f"{where}: empty caption(s) {empty or 'all'} for image {name}")
    caps = [c.strip() for c in caps]
    for c in caps:
        check_answer(where, c, prefix)
    image, _ = checked_image(where, folder, name, check_images)
    return Example(image=image, captions=caps, split=split_of(row) or "", prefix=prefix and prefix.strip())


def checked_image(where: str, folder: Path, name: str, check_images: bool) -> tuple[Path, tuple[int, int] | None]:
    """(folder / name, its (width, height)), the file decoded in full when checked (else size None)."""
    try:
        image = inside(folder, name)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if check_images:
        if not image.exists():
            raise DataError(f"{where}: image file {image} not found")
        from ..processor import ImageError, read_image
        try:
            size = read_image(image).size  # decode every byte: verify() alone passes truncated JPEGs
        except (ImageError, OSError) as e:  # bombs, broken chunks, truncation, unreadable files
            raise DataError(f"{where}: image file {image} is corrupt ({getattr(e, 'reason', e)})") from None
        return image, size
    return image, None


def mask_row(where: str, row: dict, data_folder: Path, folder: Path, check_images: bool) -> Example:
    """A segment row with a mask file per object (tasks/mask_files.py): checked, its answer made later."""
    from ..tasks.mask_files import read_objects
    image, size = checked_image(where, folder, row["image"], check_images)
    try:
        objects = read_objects(where, row, data_folder, size)
    except ValueError as e:
        raise DataError(str(e)) from None
    return Example(image=image, captions=[], split=split_of(row) or "", prefix=row["prefix"].strip(), masks=objects)


def references(where: str, row: dict) -> list:
    """A row's references: its suffix (a string, a JSONL list, or CSV columns suffix, suffix_2, ...) or its
    captions (a JSONL `captions` list, or columns caption_1 ...); both, or neither, is an error."""
    kinds = [k for k in ("suffix", "caption") if any(c and c.startswith(k) for c in row)]
    if len(kinds) != 1:
        raise DataError(f"{where}: " + ("both a suffix and captions: give one of them (the references)" if kinds else
                                        "neither 'suffix' nor captions (the text to train on and score against)"))
    key = "suffix" if kinds == ["suffix"] else "captions"
    caps = row.get(key)
    if caps is None or (key == "suffix" and isinstance(caps, str)):  # a string, or CSV columns suffix, suffix_2 ...
        keys = sorted((k for k in row if k and k.startswith(kinds[0])), key=lambda k: (len(k), k))
        caps = [row[k] for k in keys]
    if not isinstance(caps, list) or not all(isinstance(c, str) or c is None for c in caps):
        raise DataError(f"{where}: {key} must be strings (a JSONL " +
                        ("'suffix' string or list of strings)" if key == "suffix" else "'captions' list of strings)"))
    return caps


def check_answer(where: str, text: str, prefix: str | None):
    """A detection or segment answer (its prefix says so, or it has <loc> / <seg> tokens) must parse whole."""
    first = prefix.split()[0].lower() if prefix and prefix.split() else ""
    segment, detect = "<seg" in text or first == "segment", "<loc" in text or first == "detect"
    if segment:
        from ..tasks.segmentation import malformed_segmentations
        reasons = malformed_segmentations(text)
    elif detect:
        from ..tasks.boxes import parse_detections
        dropped = parse_detections(text, 1, 1).dropped
        reasons = [f"{dropped} of {len(text.split(';'))} objects are not four <loc> tokens (y0 x0 y1 x1, a non-empty "
                   "box) and a label"] if dropped else []
    if (segment or detect) and reasons:
        raise DataError(f"{where}: suffix {text[:80]!r} does not parse: {'; '.join(reasons)}")


def run_task(prompt: str, *splits: list[Example]) -> str:
    """The one task of a run (tasks.registry.task_of_rows over every row of its splits): "caption",
    "detect", "answer", "ocr" or "segment"; rows of several tasks are refused: one metric picks
    OUT/best and scores the test split."""
    from ..tasks.registry import task_of_rows
    rows = [e for examples in splits for e in examples]
    try:
        return task_of_rows([e.prefix for e in rows], prompt, [e.image.name for e in rows])
    except ValueError as e:
        why = str(e)
        if why.startswith("rows of"):  # "rows of 2 tasks: ..." -> what to do about it
            why = why.replace(" tasks: ", " tasks in one run: ", 1) + (". Train one task per run (its metric picks "
                                                                       "OUT/best and scores the test split): split the file by task")
        raise DataError(why) from None


def fingerprint(examples: list[Example]) -> list[list[str]]:
    """[image name, hash of its captions (and prefix)] per example, in order: what a resumed run compares to
    know it continues on the same rows in the same order (a checkpoint's data position is an index into
    them). Rows without a prefix hash as before prefixes existed, so older checkpoints still resume; mask rows
    hash their mask files' names, labels and boxes too (and, once answered, their answers)."""
    import hashlib
    masks = lambda e: [f"mask: {m.name} {m.label} {m.box}" for m in e.masks or ()]
    text = lambda e: "\n".join(e.captions if e.prefix is None else [f"prefix: {e.prefix}", *e.captions, *masks(e)])
    return [[e.image.name, hashlib.sha256(text(e).encode()).hexdigest()[:12]] for e in examples]


def sample_caption(example: Example, rng: random.Random, first_only: bool = False) -> str:
    """One reference caption per visit: random among the five (the study used only caption_1)."""
    return example.captions[0] if first_only else rng.choice(example.captions)
