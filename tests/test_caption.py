"""python -m paligemma.caption with faults in its input: unreadable images among good ones, bad numbers."""
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from paligemma.caption import main

ROOT = Path(__file__).resolve().parents[1]


def test_unreadable_images_are_named_and_the_rest_captioned(pg1_tok_dir, tmp_path, capsys):
    good = []
    for i in range(3):
        good.append(tmp_path / f"im{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(good[-1])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths = [good[0], tmp_path / "bad.jpg", good[1], tmp_path / "missing.png", good[2]]
    common = ["--model", str(pg1_tok_dir), "--max-new-tokens", "5", "--batch-size", "2"]
    assert main([*common, *map(str, paths)]) == 1
    out, err = capsys.readouterr()
    assert main([*common, *map(str, good)]) == 0
    alone = capsys.readouterr().out
    assert out == alone  # the good ones, captioned as without the bad ones around them
    assert f"{tmp_path / 'bad.jpg'}: not a readable image" in err and f"{tmp_path / 'missing.png'}: image file not found" in err
    assert err.strip().splitlines()[-1] == (f"paligemma.caption: 2 of 5 images could not be read: "
                                            f"{tmp_path / 'bad.jpg'}, {tmp_path / 'missing.png'}")


def test_command_line_faults_are_one_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    p = subprocess.run([sys.executable, "-m", "paligemma.caption", "--model", str(tmp_path / "nowhere"),
                        str(tmp_path / "a.png")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1 and p.stderr.strip() == (f"paligemma.caption: {tmp_path / 'nowhere'}: not a checkpoint "
                                                      "folder, and not a hub repo id (owner/name)")
    p = subprocess.run([sys.executable, "-m", "paligemma.caption", "--model", "m", "--batch-size", "0", "a.png"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().endswith("argument --batch-size: expected an integer >= 1, got '0'")


# --- issue #27: decoding errors of every kind (bombs, broken chunks, truncation) ---

def test_every_kind_of_bad_image_is_named_and_the_rest_captioned(pg1_tok_dir, tmp_path, capsys):
    from tests.helpers import bad_images
    good = []
    for i in range(2):
        good.append(tmp_path / f"im{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(good[-1])
    bad = list(bad_images(tmp_path / "bad").values())
    common = ["--model", str(pg1_tok_dir), "--max-new-tokens", "5", "--batch-size", "2"]
    assert main([*common, str(bad[2]), str(good[0]), str(bad[0]), str(bad[1]), str(good[1])]) == 1
    out, err = capsys.readouterr()
    assert main([*common, *map(str, good)]) == 0
    assert out == capsys.readouterr().out  # both good images captioned, as without the bad ones
    for path in bad:
        assert f"paligemma.caption: {path}: " in err
    assert err.strip().splitlines()[-1].startswith("paligemma.caption: 3 of 5 images could not be read: ")


# --- issues #20 and #21: detect and segment prompts print their boxes (and masks) and --draw draws them ---

import pytest  # noqa: E402
import torch  # noqa: E402

import paligemma.caption as caption_command  # noqa: E402
from paligemma.tasks import draw, draw_segmentations, parse_detections, parse_segmentations  # noqa: E402
from paligemma.tasks.boxes import PALETTE  # noqa: E402
from paligemma.tasks.vqvae import MaskDecoder  # noqa: E402
from tests.tasks.vae_files import blocky_vae  # noqa: E402

DETECTED = ("<loc0000><loc0000><loc0511><loc1023> plane ; <loc0100><loc0200> ship ; "
            "<loc0512><loc0100><loc0900><loc0800> ship")
FULL = "<seg001>" * 16  # the blocky decoder's code 1 everywhere: the mask fills its whole box
SEGMENTED = "<loc0000><loc0000><loc0511><loc1023>" + FULL + " roof ; <loc0010><loc0010><loc0020><loc0020><seg001> roof"


def force(monkeypatch, text) -> list:
    """The command's model writes `text` (then <eos>) for every image: a random model writes no boxes.
    -> the keyword arguments of each generate call."""
    load, calls = caption_command.load_for_inference, []

    def forced(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        ids = processor.tokenizer.encode(text) + [processor.tokenizer.eos_id]

        def generate(input_ids, **kw):
            calls.append(kw)
            return torch.tensor([ids] * len(input_ids))
        model.generate = generate
        return model, processor
    monkeypatch.setattr(caption_command, "load_for_inference", forced)
    return calls


@pytest.fixture
def two_images(tmp_path):
    """a.png 64 wide x 48 high, b.png 30 x 60: the same tokens are different pixels on each."""
    paths = []
    for name, (w, h) in (("a", (64, 48)), ("b", (30, 60))):
        paths.append(tmp_path / "in" / f"{name}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(len(paths)).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_detect_prints_the_boxes_in_pixels(task_tok_dir, two_images, monkeypatch, capsys):
    """Boxes by hand: t / 1023 * size, y first; the piece with two <loc> tokens is dropped and counted."""
    calls = force(monkeypatch, DETECTED)
    a, b = two_images
    assert main(["--model", str(task_tok_dir), "--prompt", "detect plane ; ship", str(a), str(b)]) == 0
    assert calls[0]["max_new_tokens"] == 128  # room for about 20 boxes (a caption's default is 32)
    # plane: x1 = 1023/1023 * w, y1 = 511/1023 * h (48 -> 23.98, 60 -> 29.97); ship: y 512, 900; x 100, 800
    assert capsys.readouterr().out.splitlines() == [
        f"{a}\t{DETECTED}", "\tplane\t0.0 0.0 64.0 24.0", "\tship\t6.3 24.0 50.0 42.2", "\t2 boxes; 1 malformed piece dropped",
        f"{b}\t{DETECTED}", "\tplane\t0.0 0.0 30.0 30.0", "\tship\t2.9 30.0 23.5 52.8", "\t2 boxes; 1 malformed piece dropped"]


def test_caption_prompts_print_the_text_only(task_tok_dir, two_images, monkeypatch, capsys):
    """A caption prompt prints one line per image as before, even when the text holds <loc> tokens."""
    calls = force(monkeypatch, DETECTED)
    assert main(["--model", str(task_tok_dir), *map(str, two_images)]) == 0
    assert calls[0]["max_new_tokens"] == 32
    assert capsys.readouterr().out.splitlines() == [f"{p}\t{DETECTED}" for p in two_images]


def test_detect_draw_writes_each_image_with_its_boxes(task_tok_dir, two_images, tmp_path, monkeypatch, capsys):
    force(monkeypatch, DETECTED)
    a, b = two_images
    before = [p.read_bytes() for p in two_images]
    out = tmp_path / "drawn"
    assert main(["--model", str(task_tok_dir), "--prompt", "detect plane ; ship", "--draw", str(out), str(a), str(b)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # no temp files left
    assert [p.read_bytes() for p in two_images] == before
    for path in two_images:
        image = Image.open(path).convert("RGB")
        drawn = np.asarray(Image.open(out / f"{path.stem}.png"))
        want = draw(image, [(d.label, d.box) for d in parse_detections(DETECTED, *image.size)])
        assert np.array_equal(drawn, np.asarray(want))
    # by hand on a.png (48 high: zoomed 6x to 384 x 288): the plane's left edge in its colour, its inside untouched
    import zlib
    drawn = np.asarray(Image.open(out / "a.png")).astype(int)
    plain = np.asarray(Image.open(a).convert("RGB").resize((384, 288), Image.NEAREST)).astype(int)
    assert tuple(drawn[100, 0]) == PALETTE[zlib.crc32(b"plane") % len(PALETTE)]
    assert np.array_equal(drawn[60:130, 100:280], plain[60:130, 100:280])
    assert not np.array_equal(drawn, plain)
    # a second run replaces the drawings whole; a drawing that would land on an input is refused first
    assert main(["--model", str(task_tok_dir), "--prompt", "detect plane", "--draw", str(out), str(a)]) == 0
    with pytest.raises(ValueError, match=r"would be written to .*a\.png, which is an input image"):
        main(["--model", str(tmp_path / "absent"), "--prompt", "detect plane", "--draw", str(a.parent), str(a)])
    assert [p.read_bytes() for p in two_images] == before


def test_two_inputs_of_one_name_get_two_drawings(task_tok_dir, two_images, tmp_path, monkeypatch, capsys):
    force(monkeypatch, DETECTED)
    other = tmp_path / "other" / "a.png"
    other.parent.mkdir()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(other)
    out = tmp_path / "drawn"
    assert main(["--model", str(task_tok_dir), "--prompt", "detect plane", "--draw", str(out),
                 str(two_images[0]), str(other)]) == 0
    assert Image.open(out / "a.png").size == (384, 288) and Image.open(out / "a-2.png").size == (260, 260)  # 20 px zoomed 13x


def test_segment_prints_mask_areas_and_draws_masks(task_tok_dir, two_images, tmp_path, monkeypatch, capsys):
    """The blocky decoder's all-ones codes fill the pixel box big_vision pastes into (truncated):
    a.png x 0..64, y 0..int(23.98) = 23 -> 64 x 23 = 1472 px; b.png 30 x int(29.97) = 870 px."""
    force(monkeypatch, SEGMENTED)
    vae = blocky_vae(tmp_path / "vae.npz")
    a, b = two_images
    out = tmp_path / "drawn"
    assert main(["--model", str(task_tok_dir), "--prompt", "segment roof", "--vae", str(vae), "--draw", str(out),
                 str(a), str(b)]) == 0
    dropped = "\t1 box with masks; 1 malformed piece dropped (1 <seg> tokens after the box, expected 16)"
    assert capsys.readouterr().out.splitlines() == [
        f"{a}\t{SEGMENTED}", "\troof\t0.0 0.0 64.0 24.0\tmask 1472 px", dropped,
        f"{b}\t{SEGMENTED}", "\troof\t0.0 0.0 30.0 30.0\tmask 870 px", dropped]
    decoder = MaskDecoder.from_npz(vae)
    image = Image.open(a).convert("RGB")
    drawn = np.asarray(Image.open(out / "a.png")).astype(int)
    assert np.array_equal(drawn, np.asarray(draw_segmentations(image, parse_segmentations(SEGMENTED, 64, 48, decoder))))
    plain = np.asarray(image.resize((384, 288), Image.NEAREST)).astype(int)
    assert np.array_equal(drawn[150:, 12:370], plain[150:, 12:370])  # below the mask (rows 0..137) and its outline (y 144)
    inside = drawn[30:130, 30:370] - plain[30:130, 30:370]
    assert (np.abs(inside).sum(-1) > 0).mean() > 0.95  # the mask tinted (a few pixels already near the tint)


def test_segment_without_vae_prints_boxes_and_says_masks_need_it(task_tok_dir, two_images, monkeypatch, capsys):
    force(monkeypatch, SEGMENTED)
    assert main(["--model", str(task_tok_dir), "--prompt", "segment roof", str(two_images[0])]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[:2] == [f"{two_images[0]}\t{SEGMENTED}", "\troof\t0.0 0.0 64.0 24.0"]
    assert "masks need --vae PATH/vae-oid.npz" in err and "mask" not in "".join(lines[1:-1])


def test_task_flag_faults(task_tok_dir, two_images, tmp_path, capsys):
    """--draw without boxes to draw and --vae without masks are argparse errors; a bad --vae file is named
    before the model loads (the model path here does not exist)."""
    a = str(two_images[0])
    with pytest.raises(SystemExit) as e:
        main(["--model", str(task_tok_dir), "--draw", str(tmp_path / "d"), a])
    assert e.value.code == 2 and "--draw draws boxes and masks: the prompt must start with detect or segment, got 'caption en'" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", str(task_tok_dir), "--prompt", "detect plane", "--vae", "v.npz", a])
    assert e.value.code == 2 and "--vae decodes the masks of segment answers" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    p = subprocess.run([sys.executable, "-m", "paligemma.caption", "--model", str(tmp_path / "absent"), "--prompt",
                        "segment roof", "--vae", str(tmp_path / "bad.npz"), a], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1 and p.stderr.strip().startswith(f"paligemma.caption: {tmp_path / 'bad.npz'}: not a readable .npz")
