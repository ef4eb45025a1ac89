"""Segment rows with a mask file per object (tasks/mask_files.py through data.load_examples): boxes by hand,
bad rows named by file, line and field, training answers by hand with the hand-built blocky VQ-VAE."""
import json

import numpy as np
import pytest
from PIL import Image

from paligemma.captioning.data import DataError, fingerprint, load_examples
from paligemma.safetensors_io import CheckpointError
from paligemma.tasks import parse_segmentations
from paligemma.tasks.mask_files import training_answers, with_answers
from paligemma.tasks.vqvae import MaskDecoder, MaskEncoder
from tests.tasks.vae_files import blocky_vae

FULL = "<seg001>" * 16
TOP = "<seg001>" * 8 + "<seg000>" * 8  # grid rows 0 and 1 set


def loc(*t):
    return "".join(f"<loc{v:04d}>" for v in t)


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def save_mask(path, on, size=(40, 30), mode="L"):
    """A mask file of `size` (W, H) with the pixels `on` (a numpy index) set."""
    a = np.zeros(size[::-1], np.uint8)
    a[on] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).convert(mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """data/rows.jsonl beside data/images/a.png (40 x 30) and data/masks/: masks are found beside the JSONL,
    images in its images/ folder."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "images" / "a.png")
    Image.new("RGB", (40, 30), "green").save(tmp_path / "images" / "b.png")
    save_mask(tmp_path / "masks" / "roof.png", np.s_[5:10, 10:20])
    sky = np.zeros((30, 40), bool)
    sky[0:8] = True
    save_mask(tmp_path / "masks" / "sky.png", sky)
    return tmp_path


ROOF = {"mask": "masks/roof.png", "label": "roof"}


def test_boxes_are_tight_or_given(folder):
    """The roof mask's pixels: rows 5..9, columns 10..19, and one stray pixel at row 20, column 3 (saved as
    opaque RGBA, set in the red channel only; alpha is not the mask): tight box x 3..20, y 5..21 (ends
    exclusive). A given box is kept."""
    save_mask(folder / "masks" / "stray.png", np.s_[5:10, 10:20], mode="RGBA")
    a = np.asarray(Image.open(folder / "masks" / "stray.png")).copy()
    assert (a[..., 3] == 255).all()
    a[20, 3] = (1, 0, 0, 255)
    Image.fromarray(a).save(folder / "masks" / "stray.png")
    path = write_rows(folder / "rows.jsonl", [
        {"image": "a.png", "prefix": "segment roof", "masks": [{"mask": "masks/stray.png", "label": "roof"}]},
        {"image": "b.png", "prefix": "segment sky", "masks": [{"mask": "masks/sky.png", "label": "sky", "box": [0, 0, 40, 16]}]}])
    a, b = load_examples(path)[0]
    assert a.captions == [] and a.prefix == "segment roof" and a.image == folder / "images" / "a.png"
    assert [(m.name, m.path, m.label, m.box) for m in a.masks] == [
        ("masks/stray.png", folder / "masks" / "stray.png", "roof", (3, 5, 20, 21))]
    assert b.masks[0].box == (0.0, 0.0, 40.0, 16.0)


@pytest.mark.parametrize("row, error", [
    ({"masks": [{"mask": "masks/none.png", "label": "roof"}]}, r"masks\[0\]\.mask: mask file .*none\.png not found"),
    ({"masks": [ROOF, {"mask": "masks/small.png", "label": "x"}]},
     r"masks\[1\]\.mask: .*small\.png is 20 x 10, the image 40 x 30: a mask must be the size of its image"),
    ({"masks": [{"mask": "masks/empty.png", "label": "x"}]}, r"masks\[0\]\.mask: .*empty\.png is empty"),
    ({"masks": [ROOF], "suffix": "a roof"}, r"both 'masks' and a suffix"),
    ({"masks": [{"mask": "masks/roof.png"}]}, r"masks\[0\]\.label: expected the object's name"),
    ({"masks": [{"mask": "masks/roof.png", "label": " "}]}, r"masks\[0\]\.label"),
    ({"masks": [{"label": "roof"}]}, r"masks\[0\]\.mask: missing"),
    ({"masks": [{"mask": "../roof.png", "label": "roof"}]}, r"masks\[0\]\.mask: path '\.\./roof\.png' leaves"),
    ({"masks": [dict(ROOF, box=[0, 0, 41, 10])]}, r"masks\[0\]\.box: \[0, 0, 41, 10\] is not a box .* inside the 40 x 30"),
    ({"masks": [dict(ROOF, box=[0, 0, 5, 5])]}, r"masks\[0\]\.box: \[0.0, 0.0, 5.0, 5.0\] holds no pixel of the mask"),
    ({"masks": [dict(ROOF, box=[0, 0, 5])]}, r"masks\[0\]\.box: expected \[x0, y0, x1, y1\]"),
    ({"masks": [dict(ROOF, colour="red")]}, r"masks\[0\]: unknown field 'colour'"),
    ({"masks": []}, r"'masks' must be a non-empty list"),
    ({"masks": [ROOF], "prefix": "detect roof"}, r"a row with 'masks' needs a segmentation prefix .* got 'detect roof'"),
    ({"masks": [ROOF], "prefix": None}, r"a row with .masks. needs a segmentation prefix .*got None"),
])
def test_bad_mask_rows_are_named_by_file_line_and_field(folder, row, error):
    save_mask(folder / "masks" / "small.png", np.s_[0:5, 0:5], size=(20, 10))
    save_mask(folder / "masks" / "empty.png", np.s_[0:0, 0:0])
    bad = {"image": "a.png", "prefix": "segment roof", "split": "train", **row}
    if bad["prefix"] is None:
        del bad["prefix"]
    path = write_rows(folder / "rows.jsonl", [{"image": "b.png", "prefix": "segment roof", "masks": [ROOF],
                                               "split": "train"}, bad])
    with pytest.raises(DataError, match=r"rows\.jsonl:2: " + error):
        load_examples(path, "train")
    examples, skipped = load_examples(path, "train", skip_bad=True)
    assert len(examples) == 1 and len(skipped.reasons) == 1


def test_training_answers_by_hand(folder, tmp_path):
    """The blocky encoder codes each 16 x 16 block of the 64 x 64 crop 1 when more than half is set. The
    roof: box x 10..20, y 5..10 of 40 x 30, filled: all ones; tokens round(5 / 30 * 1023) = round(170.5) =
    170 (half to even, as tf.round), round(255.75) = 256, round(341.0) = 341, round(511.5) = 512. The sky:
    given box 0..40 x 0..16, rows 0..7 set (the top half: 16 -> 64 rows, block rows 0 and 1 set), y_max
    round(16 / 30 * 1023) = round(545.6) = 546. Two objects are joined by " ; " as detection answers are;
    the decoder places them back: the roof's pixels (truncated box) and the sky's top half."""
    path = write_rows(folder / "rows.jsonl", [
        {"image": "a.png", "prefix": "segment roof ; sky",
         "masks": [ROOF, {"mask": "masks/sky.png", "label": "sky", "box": [0, 0, 40, 16]}]}])
    vae = blocky_vae(tmp_path / "blocky.npz", encoder=True)
    (e,) = with_answers(load_examples(path)[0], MaskEncoder.from_npz(vae))
    want = f"{loc(170, 256, 341, 512)}{FULL} roof ; {loc(0, 0, 546, 1023)}{TOP} sky"
    assert e.captions == [want]
    roof, sky = parse_segmentations(want, 40, 30, MaskDecoder.from_npz(vae))
    # int(170 / 1023 * 30) = 4, int(256 / 1023 * 40) = 10, int(341 / 1023 * 30) = 10, int(512 / 1023 * 40) = 20
    assert np.array_equal(np.argwhere(roof.mask).min(0), [4, 10]) and np.array_equal(np.argwhere(roof.mask).max(0), [9, 19])
    assert roof.mask.sum() == 6 * 10 and sky.mask[:8].all() and not sky.mask[8:].any()  # y 0 .. int(16.01) = 16


def test_a_segment_set_needs_the_vae_and_its_encoder(folder, tmp_path):
    path = write_rows(folder / "rows.jsonl", [{"image": "a.png", "prefix": "segment roof", "masks": [ROOF]}])
    examples, _ = load_examples(path)
    with pytest.raises(ValueError, match=r"segmentation set \(prompt 'segment roof', e\.g\. a\.png\) needs --vae PATH: "
                                         r".*vae-oid\.npz"):
        training_answers("segment", None, examples)
    decoder_only = blocky_vae(tmp_path / "decoder.npz")
    with pytest.raises(CheckpointError, match=r"decoder\.npz: holds no encoder half .* turns mask files into training"):
        training_answers("segment", str(decoder_only), examples)
    with pytest.raises(ValueError, match=r"--vae decodes the masks of segment sets; this is a caption set"):
        training_answers("caption", str(decoder_only), [])
    MaskDecoder.from_npz(decoder_only)  # the decoder half alone still serves <seg> suffix rows
    seg_rows = [e.__class__(e.image, [loc(0, 0, 1023, 1023) + FULL], "", "segment roof") for e in examples]
    assert training_answers("segment", str(decoder_only), seg_rows) == [seg_rows]


def test_fingerprint_follows_the_mask_files(folder):
    """A resumed run must train on the same answers: a mask row's fingerprint changes with its label and box."""
    rows = [{"image": "a.png", "prefix": "segment roof", "masks": [ROOF]}]
    first = fingerprint(load_examples(write_rows(folder / "r.jsonl", rows))[0])
    relabelled = fingerprint(load_examples(write_rows(folder / "r.jsonl", [dict(rows[0], masks=[dict(ROOF, label="top")])]))[0])
    boxed = fingerprint(load_examples(write_rows(folder / "r.jsonl", [dict(rows[0], masks=[dict(ROOF, box=[10, 5, 20, 9])])]))[0])
    assert first[0][0] == "a.png" and len({first[0][1], relabelled[0][1], boxed[0][1]}) == 3
