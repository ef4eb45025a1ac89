"""The detection demo set: every object drawn where its box says, boxes disjoint and on the grid, the
suffix the boxes' <loc> tokens in reading order, rows in the {"image", "prefix", "suffix", "split"} layout."""
import json
import re
import random

import numpy as np
from PIL import Image

from paligemma.captioning.synthetic import BACKGROUNDS, DETECT_KINDS, detection_scene, make_detection_dataset
from paligemma.tasks import parse_detections


def test_objects_are_where_their_boxes_say():
    rng = random.Random(0)
    counts = set()
    for _ in range(200):
        img, objects = detection_scene(rng)
        a = np.asarray(img, dtype=float)
        # the background colour: the most common of the four listed, from the median pixel
        bg = min(BACKGROUNDS.values(), key=lambda c: np.abs(np.median(a.reshape(-1, 3), 0) - c).sum())
        differs = np.abs(a - bg).max(-1) > 40  # 4 sigma of the noise; every colour is >= 64 from every background
        inside = np.zeros_like(differs)
        for kind, (x0, y0, x1, y1) in objects:
            assert kind in DETECT_KINDS and (x1 - x0, y1 - y0) == (16, 16) and x0 % 8 == 0 == y0 % 8
            assert 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
            assert differs[y0:y1, x0:x1].sum() >= 40  # the object is drawn inside its box ...
            assert differs[y0:y1, x0:x1][[0, -1], :].any() and differs[y0:y1, x0:x1][:, [0, -1]].any()  # ... to its edges
            assert not inside[y0:y1, x0:x1].any()  # disjoint
            inside[y0:y1, x0:x1] = True
        assert differs[~inside].mean() < 0.01  # ... and nowhere else
        assert [b for _, b in objects] == sorted((b for _, b in objects), key=lambda b: (b[1], b[0]))  # reading order
        counts.add(len(objects))
    assert counts == {1, 2, 3}


def test_dataset_rows_and_suffix_round_trip(tmp_path):
    path = make_detection_dataset(tmp_path, n_train=6, n_val=2, n_test=3, seed=1)
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train"] * 6 + ["val"] * 2 + ["test"] * 3
    assert {tuple(r) for r in rows} == {("image", "prefix", "suffix", "split")}
    assert {r["prefix"] for r in rows} == {"detect building ; plane ; tank"}
    rng = random.Random(1)  # the same stream again: the scenes behind the rows
    for r in rows:
        img, objects = detection_scene(rng)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / r["image"])), np.asarray(img))
        dets = parse_detections(r["suffix"], 64, 64)
        assert dets.dropped == 0 and [d.label for d in dets] == [k for k, _ in objects]
        for d, (_, box) in zip(dets, objects):
            assert np.allclose(d.box, box, atol=64 / 1023 / 2)
        # corners on an 8 px grid: nine location values only (what a tiny model can learn quickly)
        assert set(int(t) for t in re.findall(r"<loc(\d{4})>", r["suffix"])) <= {
            0, 128, 256, 384, 512, 639, 767, 895, 1023}


def test_demo_scenes_have_one_object_in_its_kinds_colour():
    """DEMO_SCENE (`train.py --demo detect`): one 32 px object per scene, corners on the 16 px grid (3 x 3
    places), drawn in its kind's colour (the label readable off the pixels)."""
    from paligemma.captioning.synthetic import COLOURS, DEMO_SCENE
    rng, places, kinds = random.Random(0), set(), set()
    for _ in range(200):
        img, objects = detection_scene(rng, **DEMO_SCENE)
        a = np.asarray(img, dtype=int)
        assert len(objects) == 1
        kind, (x0, y0, x1, y1) = objects[0]
        assert x0 % 16 == 0 == y0 % 16 and (x1 - x0, y1 - y0) == (32, 32)
        colour = np.array(COLOURS[DEMO_SCENE["colours"][kind]])
        assert (np.abs(a[y0:y1, x0:x1] - colour).max(-1) == 0).sum() >= 150  # drawn in its kind's colour
        places.add((x0, y0))
        kinds.add(kind)
    assert places == {(x, y) for x in (0, 16, 32) for y in (0, 16, 32)} and len(kinds) == 3


def test_spacing_keeps_objects_apart():
    """spacing=16: a free cell between objects (with it, neighbouring squares never merge into one bar)."""
    rng, counts = random.Random(0), set()
    for _ in range(200):
        _, objects = detection_scene(rng, grid=16, same_kind=True, spacing=16)
        for i, (_, a_) in enumerate(objects):
            for _, b in objects[:i]:  # a gap of at least 16 px along one axis
                assert max(b[0] - a_[2], a_[0] - b[2], b[1] - a_[3], a_[1] - b[3]) >= 16
        counts.add(len(objects))
    assert counts == {1, 2, 3}
