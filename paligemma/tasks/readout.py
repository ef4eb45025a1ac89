"""A detect or segment answer read for people: its boxes (and masks) as the lines `python -m paligemma.caption`
prints, and as the picture its `--draw` writes.

    task = drawn_task("detect plane ; ship")                  # "detect"; None for a caption prompt
    parsed = read_answer(task, text, width, height)           # Detections (Segmentations with a decoder)
    print("\\n".join(answer_lines(parsed)))                    # one line per object, then the count
    draw_answer(image, parsed).save("a.png")

The lines start with a tab (under the `image<TAB>text` line they belong to), then the label and the box in
pixels of the image, x0 y0 x1 y1 (for a segment answer with masks, the mask's area in pixels too):

    	plane	32.0 16.0 64.1 48.0
    	ship	0.0 12.5 20.0 30.1
    	2 boxes; 1 malformed piece dropped
"""
from pathlib import Path

from .boxes import Detections, draw, parse_detections
from .registry import task_of
from .segmentation import Segmentations, draw_segmentations, parse_segmentations

DRAWN = ("detect", "segment")  # the tasks whose answers are boxes (and masks)


def drawn_task(prompt: str) -> str | None:
    """"detect" or "segment" when the prompt asks for boxes (or masks), None for every other prompt, also
    ones whose first word names no task: those are captioned as before."""
    try:
        task = task_of(prompt)
    except ValueError:
        return None
    return task if task in DRAWN else None


def read_answer(task: str, text: str, width: int, height: int, decoder=None) -> Detections | Segmentations:
    """A generated text -> its objects in pixels of a width x height image: Detections, or for a segment
    answer with a MaskDecoder, Segmentations (box and mask). A segment answer without a decoder gives its
    boxes only (parse_detections skips the <seg> tokens)."""
    if task not in DRAWN:
        raise ValueError(f"read_answer: task {task!r} has no boxes; expected one of {DRAWN}")
    if task == "segment" and decoder is not None:
        return parse_segmentations(text, width, height, decoder)
    return parse_detections(text, width, height)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('x') else 's'}"


def answer_lines(parsed) -> list[str]:
    """Detections or Segmentations -> one tab-indented line per object (label, x0 y0 x1 y1 in pixels, and
    the mask's area when there are masks), then the number of objects and of malformed pieces dropped
    (with their reasons, where the parser gives them)."""
    masks = isinstance(parsed, Segmentations)
    lines = []
    for obj in parsed:
        box = " ".join(f"{v:.1f}" for v in obj.box)
        lines.append(f"\t{obj.label}\t{box}" + (f"\tmask {int(obj.mask.sum())} px" if masks else ""))
    count = _plural(len(parsed), "box") + (" with masks" if masks else "")
    dropped = f"; {_plural(parsed.dropped, 'malformed piece')} dropped"
    reasons = getattr(parsed, "reasons", [])
    lines.append(f"\t{count}{dropped}" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return lines


def draw_answer(image, parsed):
    """A copy of `image` with the boxes drawn (labels, no scores: the caption command has none), or with
    the masks tinted in and their boxes outlined."""
    if isinstance(parsed, Segmentations):
        return draw_segmentations(image, parsed)
    return draw(image, [(d.label, d.box) for d in parsed])


def drawing_paths(images: list, folder: str | Path) -> list[Path]:
    """Where --draw writes each image: folder/<its name>.png, "-2", "-3" ... added when two inputs share a
    name. Refused (ValueError naming both) where that path is one of the input images: an input is never
    overwritten."""
    folder, used, out = Path(folder), set(), []
    inputs = {Path(p).resolve() for p in images}
    for image in images:
        name = stem = Path(image).stem
        k = 1
        while name in used:
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        path = folder / f"{name}.png"
        if path.resolve() in inputs:
            raise ValueError(f"--draw {folder}: the drawing of {image} would be written to {path}, which is an input "
                             f"image; choose another folder")
        out.append(path)
    return out
