"""paligemma/captioning/validation.py: which evaluation is best, when to stop, and the sample's spread."""
import json

import pytest

from paligemma.captioning.validation import Best, spread


def test_best_keeps_the_first_of_equals_and_counts_stale_evaluations():
    best = Best(patience=2)
    assert [best.update(s, c) for s, c in [(10, 0.0), (20, 0.4), (30, 0.4), (40, 0.3)]] == [True, True, False, False]
    assert (best.step, best.score, best.stale, best.stop) == (20, 0.4, 2, True)
    assert not Best().stop and Best(patience=1).update(5, -1.0)


def test_resumed_tracker_adopts_a_better_best_written_after_the_checkpoint(tmp_path):
    (tmp_path / "best.json").write_text(json.dumps({"step": 300, "val_CIDEr-D": 1.5}))
    best = Best(patience=3)
    best.load({"step": 100, "score": 1.2, "stale": 1}, tmp_path / "best.json")
    assert (best.step, best.score) == (300, 1.5)
    best.load({"step": 100, "score": 1.7, "stale": 1}, tmp_path / "best.json")
    assert (best.step, best.score, best.stale) == (100, 1.7, 1)


def test_replaying_the_adopted_best_step_is_no_evaluation_without_improvement(tmp_path):
    """Checkpoint at step 100 (best: step 100, stale 1 as counted then); OUT/best written at step 300,
    then the kill. The resumed run evaluates 200 and 300 again: the model of step 300 is the best one
    measured again (and 200 an older one), so neither is an evaluation since the best; 400 is."""
    (tmp_path / "best.json").write_text(json.dumps({"step": 300, "val_CIDEr-D": 1.5}))
    best = Best(patience=1)
    best.load({"step": 100, "score": 1.2, "stale": 1}, tmp_path / "best.json")
    assert (best.step, best.stale, best.stop) == (300, 0, False)
    assert [best.update(s, c) for s, c in [(200, 1.3), (300, 1.5)]] == [False, False]
    assert (best.step, best.stale, best.stop) == (300, 0, False)
    assert not best.update(400, 1.5) and (best.stale, best.stop) == (1, True)


def test_spread_covers_the_split():
    assert spread(list(range(100)), 4) == [0, 25, 50, 75]
    assert spread(list(range(3)), 8) == [0, 1, 2] and spread(list(range(9)), 0) == []


def test_a_best_json_selected_by_another_metric_is_read_by_its_key(tmp_path):
    (tmp_path / "best.json").write_text(json.dumps({"step": 300, "selected_by": "val_mAP@0.5", "val_mAP@0.5": 0.8}))
    best = Best()
    best.load({"step": 100, "score": 0.5, "stale": 0}, tmp_path / "best.json")
    assert (best.step, best.score) == (300, 0.8)


def test_flat_scores_name_each_class_and_keep_no_none():
    import math
    from paligemma.captioning.validation import flat
    from paligemma.tasks import score_texts
    ref = "<loc0000><loc0000><loc0512><loc0512> plane ; <loc0512><loc0512><loc1023><loc1023> tank"
    hit_one = "<loc0000><loc0000><loc0512><loc0512> plane ; <loc0000><loc0600><loc0300><loc1000> tank"
    scores = flat(score_texts("detect", [hit_one, "junk"], [[ref], ["<loc0000><loc0000><loc0100><loc0100> plane"]]))
    # plane: 2 references, 1 hit ranked first -> AP@0.5 = (101 recall points: 51 at precision 1) / 101
    assert scores["AP@0.5 plane"] == pytest.approx(51 / 101) and scores["AP@0.5 tank"] == 0.0
    assert scores["mAP@0.5"] == pytest.approx(51 / 202) and scores["dropped"] == 1 and "per_class" not in scores
    assert math.isnan(flat({"mAP": None})["mAP"])


def test_a_segment_set_without_the_vae_is_refused_by_name():
    from paligemma.captioning.validation import Validation
    with pytest.raises(ValueError, match=r"train.py scores a segment set by its masks: pass --vae PATH .*vae-oid\.npz"):
        Validation(None, [], "segment cat", 8, 0, task="segment")


def test_answers_are_generated_under_each_rows_prefix_and_boxes_ranked_by_their_loc_probabilities(monkeypatch):
    """The shared prefix of a detection set (not the run's --prompt) goes to generation, rows of several
    prompts go as a list, and a box's score is the mean of its four <loc> probabilities."""
    from pathlib import Path
    from paligemma import inference
    from paligemma.captioning.data import Example
    from paligemma.captioning.validation import caption_and_score
    box, wrong = "<loc0000><loc0000><loc0512><loc0512> plane", "<loc0512><loc0512><loc1023><loc1023> plane"
    asked = []

    def fake_caption(model, processor, images, prompt, batch_size, max_new_tokens, loc_scores=False):
        asked.append(prompt)
        answers = [(wrong, [0.1] * 4), (box, [0.9] * 4)]  # the wrong box first in file order, but less sure
        return iter(answers if loc_scores else [t for t, _ in answers])
    monkeypatch.setattr(inference, "caption", fake_caption)
    model = type("M", (), {"eval": lambda self: None})()
    rows = [Example(Path("a.png"), [box], prefix="detect plane"), Example(Path("b.png"), [box], prefix="detect plane")]
    scores, _, _, stats = caption_and_score(model, None, rows, "caption en", task="detect")
    assert asked == ["detect plane"]
    # ranked by score: the hit first -> precision 1 up to recall 0.5: AP@0.5 = 51 / 101; in file order it is 0.5 * 51 / 101
    assert scores["mAP@0.5"] == pytest.approx(51 / 101)
    caption_and_score(model, None, [rows[0], Example(Path("b.png"), ["x"])], "caption en", task="answer")
    assert asked[-1] == ["detect plane", "caption en"]


def test_segment_texts_score_against_decoded_answers_or_mask_files(tmp_path):
    """score_texts (validation's scorer) on a segment answer whose box is the whole 64 x 32 image and whose
    mask its top half (1024 px): against a <seg> reference of the whole image, decoded by the hand-built
    VQ-VAE, mask IoU 1024 / 2048 = 0.5 and box IoU 1; against a mask file of rows 0..7 (512 px, box x 0..64,
    y 0..8) mask IoU 512 / 1024 = 0.5 too, but box IoU 512 / 2048 = 0.25: no hit at 0.5."""
    import numpy as np
    from PIL import Image
    from paligemma.tasks import MaskDecoder, score_texts
    from paligemma.tasks.mask_files import MaskObject
    from tests.tasks.vae_files import blocky_vae
    decoder = MaskDecoder.from_npz(blocky_vae(tmp_path / "b.npz"))
    box = "<loc0000><loc0000><loc1023><loc1023>"
    top, full = box + "<seg001>" * 8 + "<seg000>" * 8 + " a", box + "<seg001>" * 16 + " a"
    decoded = score_texts("segment", [top], [[full]], [(64, 32)], decoder=decoder)
    assert decoded["miou"] == 0.5 and decoded["boxacc/0.75"] == 1.0
    m = np.zeros((32, 64), np.uint8)
    m[:8] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    files = score_texts("segment", [top], [[]], [(64, 32)], decoder=decoder,
                        masks=[(MaskObject("m.png", tmp_path / "m.png", "a", (0, 0, 64, 8)),)])
    assert files["miou"] == 0.5 and files["boxacc/0.5"] == 0.0 and files["boxacc/0.75"] == 0.0
