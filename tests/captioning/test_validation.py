"""paligemma/captioning/validation.py: which evaluation is best, when to stop, and the sample's spread."""
import json

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


def test_spread_covers_the_split():
    assert spread(list(range(100)), 4) == [0, 25, 50, 75]
    assert spread(list(range(3)), 8) == [0, 1, 2] and spread(list(range(9)), 0) == []
