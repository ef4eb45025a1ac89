"""segment_tokens with a box that is not on whole pixels (a box from a detector, or scaled): big_vision's
refcoco_mask2str rounds its corners (tf.round of bbox * size) before cropping, so ours must too; checked
against the op itself (test_segmentation.py's examples are whole-pixel boxes)."""
import numpy as np
import pytest

from paligemma.tasks import MaskEncoder, segment_tokens
from tests.tasks.test_segmentation import _refcoco_example
from tests.tasks.vae_files import random_vae


def test_fractional_box_is_rounded_as_refcoco_mask2str(tmp_path):
    pytest.importorskip("tensorflow", reason="big_vision's refcoco_mask2str needs `pip install tensorflow-cpu==2.21.0`"
                                             " (the setup.cfg test extra)")
    from tests.tasks.reference import big_vision_encoder as bv
    path = random_vae(tmp_path / "vae.npz", D=16)
    encoder, op = MaskEncoder.from_npz(path), bv.get_refcoco_mask2str(str(path))
    m, (x0, y0, x1, y1) = _refcoco_example(3)
    h, w = m.shape
    box = (x0 + 0.7, y0 + 0.7, x1 - 0.3, y1 - 0.3)  # rounds to (x0 + 1, y0 + 1, x1, y1); truncation would differ
    data = {"objects/mask": np.repeat(m[..., None] * np.uint8(255), 3, axis=2), "objects/refs/sentence": "the thing",
            "objects/bbox": np.array([box[1] / h, box[0] / w, box[3] / h, box[2] / w], np.float32)}
    ours = segment_tokens(m, box, encoder)
    assert ours == op(data)["suffix"].numpy().decode()
    truncated = segment_tokens(m, (x0, y0, x1 - 1, y1 - 1), encoder)  # the crop int() would cut
    assert ours[36:] != truncated[36:]  # the <seg> codes after the four 9-character <loc> tokens differ
