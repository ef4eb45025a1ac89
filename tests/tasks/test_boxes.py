"""Boxes <-> <loc> tokens: big_vision's convention (y first, 1023 bins of the image's own size, halves
to even, clipped), the round trip, and a parser that drops and counts what it cannot read."""
import random

import pytest
from PIL import Image

from paligemma.tasks import Detection, detect_prompt, detection_text, draw, loc_tokens, parse_detections


def test_loc_tokens_order_and_bins_by_hand():
    # 64 wide, 128 high: y by 128, x by 64. y0 0 -> 0; x0 16/64 * 1023 = 255.75 -> 256;
    # y1 32/128 * 1023 = 255.75 -> 256; x1 64/64 -> 1023
    assert loc_tokens((16, 0, 64, 32), 64, 128) == "<loc0000><loc0256><loc0256><loc1023>"
    # x0 0.5 * 1023 = 511.5 exactly: tf.round (big_vision) rounds half to even -> 512; 2.5 -> 2, 512.5 -> 512
    # (y0 = 2.5 px and y1 = 512.5 px of a 1023 px high image: exactly 2.5 and 512.5 bins)
    assert loc_tokens((50, 2.5, 100, 512.5), 100, 1023) == "<loc0002><loc0512><loc0512><loc1023>"
    # outside the image: clipped to the edges
    assert loc_tokens((-5, -1, 70, 200), 64, 128) == "<loc0000><loc0000><loc1023><loc1023>"


def test_round_trip_within_one_bin():
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(1, 2000), rng.randint(1, 2000)
        x0, x1 = sorted(rng.uniform(0, w) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, h) for _ in range(2))
        if x1 - x0 < 2 * w / 1023 or y1 - y0 < 2 * h / 1023:  # boxes under two bins may share a token
            continue
        (det,) = parse_detections(loc_tokens((x0, y0, x1, y1), w, h) + " thing", w, h)
        assert det.label == "thing"
        for got, want, size in zip(det.box, (x0, y0, x1, y1), (w, h, w, h)):
            assert abs(got - want) <= size / 1023 / 2 + 1e-9  # half a bin: rounding to the nearest


def test_parse_several_objects_to_pixels():
    text = "<loc0000><loc0256><loc0512><loc1023> plane ; <loc0100><loc0200><loc0300><loc0400> storage tank"
    dets = parse_detections(text, 200, 100)
    assert dets.dropped == 0
    assert dets == [Detection("plane", (256 / 1023 * 200, 0.0, 200.0, 512 / 1023 * 100)),
                    Detection("storage tank", (200 / 1023 * 200, 100 / 1023 * 100, 400 / 1023 * 200, 300 / 1023 * 100))]
    label, box, score = dets[0]
    assert score == 1.0


@pytest.mark.parametrize("bad", [
    "<loc0001><loc0002><loc0003> short",                        # three tokens
    "<loc0500><loc0001><loc0500><loc0009> flat",                # y_max == y_min
    "<loc0600><loc0001><loc0500><loc0009> upside down",         # y_max < y_min
    "<loc0001><loc0009><loc0500><loc0009> thin",                # x_max == x_min (big_vision's test too)
    "<loc0001><loc0002><loc0500><loc0600>",                     # no label
    "<loc0001><loc0002><loc0500><loc0600><loc0700> five",       # five tokens
    "plane <loc0001><loc0002><loc0500><loc0600>",               # label first
    "<loc0001><loc0002><loc0500><loc0600> pla<loc0003>ne",      # a token inside the label
    "no objects here",
    "<loc0001><loc0002><loc1024><loc0600> past the grid",      # 1024: no such token (bins 0..1023)
    "<loc0001><loc0002><loc0500><loc9999> far past",
])
def test_malformed_pieces_are_dropped_and_counted(bad):
    good = "<loc0010><loc0020><loc0300><loc0400> boat"
    dets = parse_detections(f"{good} ; {bad} ; {good}", 64, 64)
    assert [d.label for d in dets] == ["boat", "boat"] and dets.dropped == 1


def test_parse_never_raises_on_random_text():
    rng = random.Random(1)
    parts = ["<loc0012>", "<loc1023>", "<loc0000>", " ", ";", " ; ", "plane", "<seg007>", "<loc12>", "<", "x", "\n", "<loc2000>"]
    for _ in range(3000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 20)))
        dets = parse_detections(text, 64, 48)
        pieces = [p for p in text.split(";") if p.strip()]
        assert len(dets) + dets.dropped == len(pieces)
        assert all(0 <= d.box[0] < d.box[2] <= 64 and 0 <= d.box[1] < d.box[3] <= 48 for d in dets)


def test_empty_answer_is_no_objects():
    for text in ("", "  ", "\n"):
        dets = parse_detections(text, 64, 64)
        assert dets == [] and dets.dropped == 0


def test_empty_pieces_are_no_objects_not_malformed():
    """A trailing " ; " (or " ;  ; " between objects) separates nothing: no object, nothing dropped."""
    good = "<loc0010><loc0020><loc0300><loc0400> boat"
    for text in (f"{good} ; ", f"{good} ;", f"{good} ;  ; {good}", f" ; {good}", ";", " ; ; "):
        dets = parse_detections(text, 64, 64)
        assert dets.dropped == 0 and len(dets) == text.count("boat"), text


def test_out_of_grid_box_keeps_the_other_boxes_scores():
    """A dropped <loc1024> piece's four probabilities are skipped, not given to the next box."""
    text = "<loc0001><loc0002><loc1024><loc0600> a ; <loc0001><loc0002><loc0500><loc0600> b"
    dets = parse_detections(text, 64, 64, loc_probs=[0.9] * 4 + [0.1, 0.2, 0.3, 0.4])
    assert [d.label for d in dets] == ["b"] and dets.dropped == 1 and dets[0].score == pytest.approx(0.25)


def test_segment_answer_keeps_box_and_label():
    seg = "".join(f"<seg{i:03d}>" for i in range(16))
    (det,) = parse_detections(f"<loc0000><loc0000><loc1023><loc1023>{seg} cat", 10, 10)
    assert det.label == "cat" and det.box == (0.0, 0.0, 10.0, 10.0)


def test_scores_are_the_mean_of_each_box_loc_probabilities():
    text = ("<loc0001><loc0002><loc0500><loc0600> a ; <loc0001><loc0002> broken ; "
            "<loc0001><loc0002><loc0500><loc0600> b")
    probs = [0.1, 0.2, 0.3, 0.4, 0.9, 0.9, 1.0, 0.5, 0.5, 0.0]
    dets = parse_detections(text, 64, 64, loc_probs=probs)
    assert [d.label for d in dets] == ["a", "b"] and dets.dropped == 1
    assert dets[0].score == pytest.approx(0.25) and dets[1].score == pytest.approx(0.5)
    with pytest.raises(ValueError, match="loc_probs has 3 values for 10"):
        parse_detections(text, 64, 64, loc_probs=[1, 1, 1])


def test_saved_box_scores_read_back_as_loc_probabilities():
    """loc_probs_of inverts the scoring: a malformed piece between the boxes keeps its tokens out of theirs."""
    from paligemma.tasks.boxes import loc_probs_of
    text = ("<loc0001><loc0002><loc0500><loc0600> a ; <loc0001><loc0002> broken ; "
            "<loc0001><loc0002><loc0500><loc0600> b ; ")
    probs = loc_probs_of(text, [0.25, 0.75])
    assert probs == [0.25] * 4 + [1.0, 1.0] + [0.75] * 4
    assert [d.score for d in parse_detections(text, 64, 64, loc_probs=probs)] == [0.25, 0.75]
    for wrong in ([0.5], [0.5, 0.5, 0.5]):
        with pytest.raises(ValueError, match=f"{len(wrong)} box scores for the 2 boxes"):
            loc_probs_of(text, wrong)


def test_detection_text_and_prompt():
    objects = [("plane", (16, 0, 64, 32)), ("tank", (0, 64, 32, 128))]
    text = detection_text(objects, 64, 128)
    assert text == "<loc0000><loc0256><loc0256><loc1023> plane ; <loc0512><loc0000><loc1023><loc0512> tank"
    assert [d.label for d in parse_detections(text, 64, 128)] == ["plane", "tank"]
    assert detect_prompt(["plane", "storage tank"]) == "detect plane ; storage tank"
    for bad in ([], ["a;b"], [" "]):
        with pytest.raises(ValueError, match="detect_prompt"):
            detect_prompt(bad)


def test_draw_boxes_in_their_colours_on_an_enlarged_copy():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    out = draw(image, [Detection("plane", (8, 8, 40, 24), 0.5)], references=[("plane", (2, 2, 60, 30))], min_size=128)
    assert out.size == (256, 128) and image.getpixel((8, 8)) == (0, 0, 0)  # x4 zoom; the input untouched
    colour = out.getpixel((8 * 4, 20 * 4))  # left edge of the predicted box, below its label
    assert colour != (0, 0, 0) and colour != (255, 255, 255)
    assert out.getpixel((2 * 4, 16 * 4)) == (255, 255, 255)  # the reference's left edge, in white
    assert out.getpixel((20 * 4, 16 * 4)) == (0, 0, 0)  # inside the box: the image
