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
