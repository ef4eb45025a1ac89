"""Segment answers: parsing, mask placement (hand-built decoder, known pixels), tokens from masks against
big_vision's refcoco_mask2str, scores by hand, drawing."""
import numpy as np
import pytest
import torch
from PIL import Image

from paligemma.tasks import (MaskDecoder, MaskEncoder, Segmentation, draw_segmentations, parse_segmentations,
                             score_segmentations, segment_tokens)
from tests.tasks.vae_files import blocky_vae, random_vae

FULL = "".join("<seg001>" for _ in range(16))  # the blocky decoder paints every block: the whole box
TOP = "".join(f"<seg00{int(i < 8)}>" for i in range(16))  # codes 0..7 (grid rows 0 and 1): the top half
LEFT = "".join(f"<seg00{int(i % 4 < 2)}>" for i in range(16))  # grid columns 0 and 1: the left half


def loc(*t):
    return "".join(f"<loc{v:04d}>" for v in t)


@pytest.fixture(scope="module")
def blocky(tmp_path_factory):
    return MaskDecoder.from_npz(blocky_vae(tmp_path_factory.mktemp("blocky") / "blocky.npz"))


def test_box_at_the_image_edge(blocky):
    """x 512..1023 of 100 px: int(50.05) = 50 .. 100, y 0..1023 of 60 px: 0 .. 60; every block on."""
    (s,) = parse_segmentations(loc(0, 512, 1023, 1023) + FULL + " cat", 100, 60, blocky)
    assert s.label == "cat" and s.box == pytest.approx((512 / 1023 * 100, 0, 100, 60))
    want = np.zeros((60, 100), bool)
    want[:, 50:] = True
    np.testing.assert_array_equal(s.mask, want)


def test_half_masks_land_in_their_half(blocky):
    """Box tokens x 108..517, y 210..415 of a 100 x 100 image: int(10.56) = 10 .. int(50.54) = 50 and
    int(20.53) = 20 .. int(40.57) = 40 (truncated, as the evaluator's int(); rounding would shift every
    edge by one). The top-half codes fill rows 20..29, the left-half codes columns 10..29."""
    top, left = parse_segmentations(f"{loc(210, 108, 415, 517)}{TOP} ; {loc(210, 108, 415, 517)}{LEFT} b", 100, 100,
                                    blocky)
    want = np.zeros((100, 100), bool)
    want[20:30, 10:50] = True
    np.testing.assert_array_equal(top.mask, want)
    want = np.zeros((100, 100), bool)
    want[20:40, 10:30] = True
    np.testing.assert_array_equal(left.mask, want)
    assert (top.label, left.label) == ("", "b")  # RefCOCO-style answers have no label


def test_box_one_pixel_wide(blocky):
    """x tokens 108 and 118 of 100 px: int(10.56) = 10, int(11.53) = 11, one column; the top-half codes
    resized to 1 x 40 (y 0..40 of 40 px) keep rows 0..19. Tokens 101 and 102 (9.87, 9.97) truncate to no
    pixel: the object stays, with an empty mask, as big_vision's evaluator keeps it (scored invalid)."""
    one, none = parse_segmentations(f"{loc(0, 108, 1023, 118)}{TOP} pole;{loc(0, 101, 1023, 102)}{FULL} hair", 100,
                                    40, blocky)
    want = np.zeros((40, 100), bool)
    want[:20, 10] = True
    np.testing.assert_array_equal(one.mask, want)
    assert none.label == "hair" and not none.mask.any() and none.box[2] > none.box[0]


def test_resize_is_bilinear(blocky):
    """Blocks 0, 1, 4 on (an L in the top-left quadrant), into a 2 x 2 pixel box (tokens 108..128: int(10.56)
    .. int(12.51)). PIL's bilinear filter, shrinking 32x, weighs the source pixels under target pixel (0, 0)
    by a tent 1 - |x - 16| / 32 on each axis, normalised: by hand w @ mask64 @ w = +0.10, so that pixel is on
    and the other three (-0.88, -0.88, -1) off; nearest-neighbour would read source (16, 16), block 5, off."""
    codes = "".join(f"<seg00{int(i in (0, 1, 4))}>" for i in range(16))
    (s,) = parse_segmentations(loc(108, 108, 128, 128) + codes, 100, 100, blocky)
    x = np.arange(64) + 0.5
    w = np.clip(1 - np.abs(x - 16) / 32, 0, None)
    w /= w.sum()
    m64 = blocky(torch.tensor([[int(i in (0, 1, 4)) for i in range(16)]]))[0].numpy()
    assert w @ m64 @ w == pytest.approx(0.102, abs=1e-3)
    want = np.zeros((100, 100), bool)
    want[10, 10] = True
    np.testing.assert_array_equal(s.mask, want)


def test_threshold_is_strict(tmp_path):
    """The evaluator keeps pixels > 0: a decoder whose code 0 gives exactly 0.0 everywhere (the blocky one
    without its -1 bias) places an empty mask, code 1 (2.0) a full one."""
    arrays = dict(np.load(blocky_vae(tmp_path / "blocky.npz")))
    np.savez(tmp_path / "zero.npz", **{**arrays, "decoder.12.bias": np.zeros(1, np.float32)})
    zero = MaskDecoder.from_npz(tmp_path / "zero.npz")
    assert (zero(torch.zeros(1, 16, dtype=torch.long)) == 0).all()
    off, on = parse_segmentations(f"{loc(0, 0, 1023, 1023)}{'<seg000>' * 16};{loc(0, 0, 1023, 1023)}{FULL}", 7, 5, zero)
    assert not off.mask.any() and on.mask.all()


def test_malformed_pieces_are_dropped_and_counted(blocky):
    good = loc(0, 0, 1023, 1023) + FULL
    pieces = [good + " kept",
              loc(0, 0, 1023) + FULL + " three locs",
              loc(0, 0, 1023, 1023) + FULL[:-8] + " fifteen segs",
              loc(0, 0, 1023, 1023) + FULL + "<seg001> seventeen segs",
              loc(0, 0, 1023, 1023) + FULL[:-8] + "<seg002> outside the blocky codebook",
              loc(0, 0, 1024, 1023) + FULL + " loc 1024",
              loc(500, 0, 500, 1023) + FULL + " empty box",
              good + " label <loc0001> then tokens",
              "no tokens at all",
              good]
    out = parse_segmentations(" ; ".join(pieces), 32, 32, blocky)
    assert [s.label for s in out] == ["kept", ""]
    assert out.dropped == 8 and len(out.reasons) == 8
    assert out.reasons[1:5] == ["15 <seg> tokens after the box, expected 16", "17 <seg> tokens after the box, expected 16",
                                "<seg002> outside the codebook's 0..1", "<loc1024> outside 0..1023"]
    assert parse_segmentations("", 32, 32, blocky) == [] and parse_segmentations(" ", 32, 32, blocky).dropped == 0
    with pytest.raises(ValueError, match="image size 0 x 32"):
        parse_segmentations(good, 0, 32, blocky)


def test_scores_by_hand():
    """Three examples on a 10 x 10 image, the evaluator's definitions worked by hand:
    1. reference box 0..4 x 0..4 (16 px) and mask rows 0..1, columns 0..1 (4 px); predicted box 0..4 x 0..2
       (8 px: box IoU 8 / 16 = 0.5, a hit at 0.5 only), mask rows 0..1, columns 0..2 (6 px): IoU 4 / 6;
    2. no object parsed: invalid, mask and box IoU 0;
    3. reference box 2..8 x 2..8, mask 6 x 6; predicted box 2.1..8 x 2..8 (a 0.1 px sliver off: box IoU
       5.9 / 6, a hit at both), mask all but one column (30 px): IoU 30 / 36;
    and a fourth whose box truncates to no pixel (x 3.2..3.9): invalid, mask IoU 0, box IoU 0.7 * 10 / 100
    against the reference 0..10 x 0..10 -> 0.07, a miss."""
    def mask(rows, cols):
        m = np.zeros((10, 10), bool)
        m[rows, cols] = True
        return m
    refs = [((0, 0, 4, 4), mask(slice(0, 2), slice(0, 2))), ((0, 0, 5, 5), mask(slice(0, 5), slice(0, 5))),
            ((2, 2, 8, 8), mask(slice(2, 8), slice(2, 8))), ((0, 0, 10, 10), mask(slice(0, 10), slice(0, 10)))]
    preds = [[Segmentation("a", (0, 0, 2, 4), mask(slice(0, 2), slice(0, 3)))], [],
             [Segmentation("", (2.1, 2, 8, 8), mask(slice(2, 8), slice(3, 8))), Segmentation("x", (0, 0, 1, 1), mask(0, 0))],
             [Segmentation("", (3.2, 0, 3.9, 10), mask(slice(0, 0), 0))]]
    got = score_segmentations(preds, refs)
    assert got["miou"] == pytest.approx((4 / 6 + 0 + 30 / 36 + 0) / 4)
    assert got["boxacc/0.5"] == pytest.approx(2 / 4) and got["boxacc/0.75"] == pytest.approx(1 / 4)
    assert (got["invalid"], got["total"]) == (2, 4)


def test_a_malformed_first_object_is_invalid_not_skipped(blocky):
    """big_vision's evaluator reads an answer's first 4 + 16 tokens: a first object that is malformed makes
    the answer invalid (mask IoU 0, zeroed tokens: box IoU 0), whatever follows it. On a 10 x 10 image, the
    reference the whole image; each answer below has a perfect second object, which would score IoU 1.
    The fourth answer's first object is the perfect one: IoU 1, a hit at both thresholds."""
    perfect = loc(0, 0, 1023, 1023) + FULL + " cat"
    firsts = [loc(0, 0, 1023) + FULL + " three locs",          # not four <loc>
              loc(500, 0, 500, 1023) + FULL + " empty box",    # big_vision's `t[2] > t[0]` fails
              loc(0, 0, 1023, 1023) + FULL[:-8] + " fifteen",  # not sixteen <seg>
              perfect]
    preds = [parse_segmentations(f"{first} ; {perfect}", 10, 10, blocky) for first in firsts]
    assert [len(p) for p in preds] == [1, 1, 1, 2]  # the parse still keeps (and draws) the perfect object
    whole = np.ones((10, 10), bool)
    got = score_segmentations(preds, [((0, 0, 10, 10), whole)] * 4)
    assert got["miou"] == pytest.approx(1 / 4) and got["boxacc/0.5"] == got["boxacc/0.75"] == pytest.approx(1 / 4)
    assert (got["invalid"], got["total"]) == (3, 4)
    # a plain list of objects (no text behind it): its first object is the answer's first
    assert score_segmentations([[Segmentation("", (0, 0, 10, 10), whole)]], [((0, 0, 10, 10), whole)])["miou"] == 1


def test_bad_score_input_is_named():
    m = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        score_segmentations([[]], [((0, 0, 1, 1), m)] * 2)
    with pytest.raises(ValueError, match="reference 0: expected a non-empty"):
        score_segmentations([[]], [((0, 0, 1, 1), np.zeros((4, 4), bool))])
    with pytest.raises(ValueError, match=r"example 0: predicted mask \(3, 4\) but reference mask \(4, 4\)"):
        score_segmentations([[Segmentation("", (0, 0, 1, 1), np.ones((3, 4), bool))]], [((0, 0, 1, 1), m)])


def _refcoco_example(seed=0):
    """An image-sized mask (uint8 0 / 255, three channels as in RefCOCO) of an ellipse and its integer box."""
    g = np.random.default_rng(seed)
    h, w = 160, 200
    y, x = np.mgrid[0:h, 0:w] + 0.5
    cy, cx, ry, rx = g.uniform(70, 90), g.uniform(90, 110), g.uniform(8, 65), g.uniform(8, 85)
    m = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
    ys, xs = m.nonzero()
    return m, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def test_segment_tokens_equal_refcoco_mask2str(tmp_path):
    """big_vision's preprocessing op (crop, antialiased resize, TF encoder, tokens) on the same mask and box.
    Crops of both sizes: smaller than 64 (upsampled) and larger (downsampled)."""
    pytest.importorskip("tensorflow", reason="big_vision's refcoco_mask2str needs `pip install tensorflow-cpu==2.21.0`"
                                             " (the setup.cfg test extra)")
    from tests.tasks.reference import big_vision_encoder as bv
    path = random_vae(tmp_path / "vae.npz", D=16)
    encoder = MaskEncoder.from_npz(path)
    op = bv.get_refcoco_mask2str(str(path))
    for seed in range(8):  # crops from 21 x 19 to 127 x 28 and 107 x 106: up- and downsampled
        m, (x0, y0, x1, y1) = _refcoco_example(seed)
        h, w = m.shape
        data = {"objects/mask": np.repeat(m[..., None] * np.uint8(255), 3, axis=2),
                "objects/refs/sentence": "the thing", "objects/bbox": np.array([y0 / h, x0 / w, y1 / h, x1 / w], np.float32)}
        want = op(data)["suffix"].numpy().decode()
        assert segment_tokens(m, (x0, y0, x1, y1), encoder) == want, seed


def test_segment_tokens_round_trip_box(tmp_path):
    """The box survives tokens -> parse to within one bin; bad masks and boxes are named."""
    path = random_vae(tmp_path / "vae.npz", D=8)
    encoder, decoder = MaskEncoder.from_npz(path), MaskDecoder.from_npz(path)
    m, box = _refcoco_example(1)
    text = segment_tokens(m, box, encoder)
    assert text.count("<loc") == 4 and text.count("<seg") == 16
    (s,) = parse_segmentations(text + " thing", 200, 160, decoder)
    assert np.abs(np.array(s.box) - np.array(box)).max() <= 200 / 1023
    with pytest.raises(ValueError, match=r"box \(0, 0, 0.2, 5\) rounds to no pixels of a 200 x 160 mask"):
        segment_tokens(m, (0, 0, 0.2, 5), encoder)
    with pytest.raises(ValueError, match=r"expected a \(height, width\) mask, got shape \(2, 160, 200\)"):
        segment_tokens(np.stack([m, m]), box, encoder)


def test_draw_tints_masks_only(blocky):
    image = Image.new("RGB", (256, 256), (0, 0, 0))
    (s,) = parse_segmentations(loc(0, 0, 1023, 512) + TOP + " sky", 256, 256, blocky)
    out = np.asarray(draw_segmentations(image, [s]))
    assert out.shape == (256, 256, 3)
    assert (out[60, 60] > 0).any() and (out[60, 200] == 0).all() and (out[200, 60] == 0).all()
    with pytest.raises(ValueError, match=r"mask 0 is \(256, 256\), the image \(10, 10\)"):
        draw_segmentations(Image.new("RGB", (10, 10)), [s], min_size=1)
