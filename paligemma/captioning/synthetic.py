"""The embedded default: procedural aerial-like scenes, captions that depend on what is drawn, and
a tiny random PaliGemma sized to learn them on two CPU cores in minutes.

Every caption names the background, and the count, colour, kind and position of the objects. A
model that ignores the image can only learn the most common phrasing; one that looks can read
all five facts off the pixels. That gap is what the demo is there to show.
"""
import csv
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..config import PaliGemmaConfig, TextConfig, VisionConfig

BACKGROUNDS = {"field": (86, 140, 62), "desert": (205, 180, 125), "lake": (48, 88, 160), "forest": (32, 84, 44)}
COLOURS = {"red": (200, 40, 40), "white": (240, 240, 240), "yellow": (235, 205, 40), "black": (20, 20, 20)}
KINDS = ["building", "plane", "tank", "boat"]
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLACES = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
TEMPLATES = [
    "{n} {c} {k}s in the {p} of a {b}",
    "there are {n} {c} {k}s in the {p} of a {b}",
    "a {b} with {n} {c} {k}s in the {p}",
    "{n} {c} {k}s are in the {p} of the {b}",
    "the {p} of a {b} has {n} {c} {k}s",
]


def draw_object(d: ImageDraw.ImageDraw, kind: str, x: int, y: int, s: int, colour):
    if kind == "building":
        d.rectangle([x, y, x + s, y + s], fill=colour)
    elif kind == "plane":  # a cross: fuselage and wings
        d.rectangle([x + s // 2 - 1, y, x + s // 2 + 1, y + s], fill=colour)
        d.rectangle([x, y + s // 3, x + s, y + s // 3 + 2], fill=colour)
    elif kind == "tank":
        d.ellipse([x, y, x + s, y + s], fill=colour)
    else:  # boat: a thin horizontal hull
        d.polygon([(x, y + s // 2), (x + s, y + s // 2 - 2), (x + s, y + s // 2 + 2)], fill=colour)


def scene(rng: random.Random, size: int = 64):
    """One image and its five reference captions."""
    b, c, k = rng.choice(list(BACKGROUNDS)), rng.choice(list(COLOURS)), rng.choice(KINDS)
    n, p = rng.choice(list(NUMBERS)), rng.choice(list(PLACES))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 10, (size, size, 3))
    img = Image.fromarray(np.clip(np.array(BACKGROUNDS[b]) + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    half, s = size // 2, size // 8
    qx, qy = PLACES[p]
    slots = [(qx * half + 2 + i * (s + 3), qy * half + 2 + j * (s + 3)) for j in range(2) for i in range(2)]
    for x, y in rng.sample(slots, n):
        draw_object(d, k, x + rng.randint(0, 2), y + rng.randint(0, 2), s, COLOURS[c])
    words = dict(n=NUMBERS[n], c=c, k=k, p=p, b=b)
    captions = [t.format(**words) for t in TEMPLATES]
    if n == 1:  # singular agreement
        captions = [x.replace(f"{k}s", k).replace("there are", "there is").replace(f"{k} are", f"{k} is")
                    for x in captions]
    rng.shuffle(captions)
    return img, captions


def make_dataset(folder: str | Path, n_train: int = 1200, n_val: int = 100, n_test: int = 100, seed: int = 0,
                 size: int = 64) -> Path:
    """Write images/ and captions.csv in the RISC layout; returns the CSV path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(count):
            img, caps = scene(rng, size)
            name = f"{split}_{i:05d}.png"
            img.save(folder / "images" / name)
            rows.append(dict(source="synthetic", split=split, image=name,
                             **{f"caption_{j + 1}": c for j, c in enumerate(caps)}))
    path = folder / "captions.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


DETECT_KINDS = ("building", "plane", "tank")  # shapes whose box is their whole square (a boat's is a sliver)


def detection_scene(rng: random.Random, size: int = 64, object_size: int = 16, grid: int = 8, max_objects: int = 3,
                    colours: dict | None = None, same_kind: bool = False, spacing: int = 0):
    """One image and its objects [(kind, (x0, y0, x1, y1))], in reading order (top to bottom, then left to
    right). 1 to `max_objects` objects, each kind and colour drawn at random (or one kind for the whole
    scene: `same_kind`; a colour per kind: `colours`, kind -> COLOURS name), on the caption scenes'
    backgrounds; corners on a `grid`-pixel lattice and boxes disjoint, so that a 64 px image has 7 x 7
    places and every box edge falls on one of nine <loc> values (0, 128, 256, ..., 1023): the tiny
    model learns a few location tokens well instead of 1024 badly."""
    b = rng.choice(list(BACKGROUNDS))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 10, (size, size, 3))
    img = Image.fromarray(np.clip(np.array(BACKGROUNDS[b]) + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    places = [(x, y) for y in range(0, size - object_size + 1, grid) for x in range(0, size - object_size + 1, grid)]
    objects, kind = [], rng.choice(DETECT_KINDS) if same_kind else None
    for _ in range(rng.randint(1, max_objects)):
        far = object_size + spacing  # spacing > 0: objects never touch (two squares side by side read as one bar)
        free = [(x, y) for x, y in places if all(abs(x - o[0]) >= far or abs(y - o[1]) >= far for _, o in objects)]
        if not free:
            break
        x, y = rng.choice(free)
        objects.append((kind or rng.choice(DETECT_KINDS), (x, y, x + object_size, y + object_size)))
    objects.sort(key=lambda o: (o[1][1], o[1][0]))
    for kind, (x, y, _, _) in objects:  # draw_object fills x .. x + s inclusive: s + 1 = object_size pixels
        draw_object(d, kind, x, y, object_size - 1, COLOURS[colours[kind] if colours else rng.choice(list(COLOURS))])
    return img, objects


# `python train.py --demo detect`'s scenes. Each kind has its own colour and a scene holds one kind, so the
# label can be read off the pixels at a glance; a tiny model from scratch reads the label first, and only
# then learns to look where the objects are (with a colour and kind per object, 900 steps showed no use
# of the image at all). One 32 x 32 px object per scene (4 x 4 patches), corners on a 16 px grid: 3 x 3
# places, each box edge one of four <loc> values. With 16 px objects (1 to 3, or 1 alone) the model sat on
# the answer prior (the same boxes for every image) for 200-400 steps or never left it; 32 px objects
# left it by step ~100-400 on most runs (`spacing=16`, a free cell between objects, was no help). Those
# trials trained the tower too; train.py's demo now keeps its random SigLIP frozen (docs/tasks.md).
DEMO_SCENE = {"grid": 16, "object_size": 32, "max_objects": 1,
              "colours": {"building": "red", "plane": "white", "tank": "yellow"}, "same_kind": True}


def make_detection_dataset(folder: str | Path, n_train: int = 1200, n_val: int = 100, n_test: int = 100,
                           seed: int = 0, size: int = 64, **scene) -> Path:
    """Write images/ and detections.jsonl: rows {"image", "prefix", "suffix", "split"}, the prefix
    "detect building ; plane ; tank" on every row (so the prompt tells nothing) and the suffix the
    objects' <loc> tokens and kinds, separated by " ; ". Returns the JSONL path."""
    from ..tasks.boxes import detect_prompt, detection_text
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prefix = detect_prompt(DETECT_KINDS)
    lines = []
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(count):
            img, objects = detection_scene(rng, size, **scene)
            name = f"{split}_{i:05d}.png"
            img.save(folder / "images" / name)
            row = {"image": name, "prefix": prefix, "suffix": detection_text(objects, size, size), "split": split}
            lines.append(json.dumps(row) + "\n")
    path = folder / "detections.jsonl"
    path.write_text("".join(lines))
    return path


def tiny_config(vocab_size: int, image_token_index: int, image_size: int = 64) -> PaliGemmaConfig:
    """PaliGemma 1 architecture at toy size: 64 px images, 8 px patches -> 64 image tokens."""
    vision = VisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                          image_size=image_size, patch_size=8)
    text = TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=32, vocab_size=vocab_size)
    return PaliGemmaConfig(vision=vision, text=text, image_token_index=image_token_index, projection_dim=128)


def make_checkpoint(folder: str | Path, captions: list[str], prompt: str = "caption en", seed: int = 0,
                    vocab_size: int = 512, image_size: int = 64, task_tokens: bool = False) -> Path:
    """A random-initialised tiny PaliGemma in the hub layout, with a tokenizer trained on `captions`
    (task_tokens: plus the 1024 <loc> and 128 <seg> pieces, see tokenizer.train_tokenizer)."""
    import torch
    from ..atomic import atomic_dir
    from ..model import PaliGemma
    from ..tokenizer import Tokenizer, train_tokenizer
    import shutil
    import tempfile
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp())
    tok = Tokenizer(train_tokenizer(captions + [prompt], tmp / "tokenizer", vocab_size=vocab_size, task_tokens=task_tokens))
    config = tiny_config(vocab_size=len(tok), image_token_index=tok.image_id, image_size=image_size)
    torch.manual_seed(seed)
    model = PaliGemma(config).init_weights()
    with atomic_dir(folder) as whole:  # model and tokenizer swapped in together: one alone is no checkpoint
        model.save_pretrained(whole)  # config.json + model.safetensors
        shutil.copyfile(tok.path, whole / "tokenizer.model")
    shutil.rmtree(tmp)
    return folder
