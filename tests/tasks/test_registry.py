"""task_of reads PaliGemma's prefixes; each task is scored by its own metric."""
import pytest

from paligemma.captioning.metrics import score_all
from paligemma.tasks import METRICS, TASKS, average_precision, score, score_answers, score_ocr, task_of


@pytest.mark.parametrize("prefix,task", [
    ("caption en", "caption"), ("caption es", "caption"), ("describe en", "caption"),
    ("detect plane ; ship", "detect"), ("detect storage tank", "detect"), ("Detect car", "detect"),
    ("answer en how many planes are there?", "answer"), ("ocr", "ocr"), ("  ocr\n", "ocr"),
    ("segment the left plane", "segment"), ("question en two", "caption"),
])
def test_task_of(prefix, task):
    assert task_of(prefix) == task and task in TASKS


@pytest.mark.parametrize("prefix", ["", "   ", "detectplane", "count the planes", None])
def test_task_of_refuses_what_it_cannot_tell(prefix):
    with pytest.raises(ValueError, match="cannot tell the task"):
        task_of(prefix)


def test_each_task_is_scored_by_its_metric():
    preds, refs = ["a plane on a field", "two ships"], [["a plane on a field"], ["two boats", "two ships at sea"]]
    assert score("caption", preds, refs) == score_all({0: preds[0], 1: preds[1]}, {0: refs[0], 1: refs[1]})
    assert score("answer", ["2"], [["two"] * 3 + ["3"] * 7]) == score_answers(["2"], [["two"] * 3 + ["3"] * 7])
    assert score("ocr", ["abc"], [["abd"]]) == score_ocr(["abc"], [["abd"]])
    boxes = [[("plane", (0, 0, 10, 10), 0.9)]], [[("plane", (0, 0, 10, 10))]]
    assert score("detect", *boxes) == average_precision(*boxes) and score("detect", *boxes)["mAP@0.5"] == pytest.approx(1.0)
    assert {t: METRICS[t][1] for t in ("caption", "detect", "answer", "ocr")} == {
        "caption": "CIDEr-D", "detect": "mAP@0.5", "answer": "VQA accuracy", "ocr": "ANLS"}
    with pytest.raises(ValueError, match="no metric for task 'count'"):
        score("count", [], [])


def test_score_texts_parses_detections_into_boxes_at_any_scale():
    """Texts -> boxes -> mAP. Hand count: ship has two references (one found, IoU 1) and plane one
    (found), so AP@0.5 is 1 for plane and 101-point-interpolated 0.5 for ship (precision 1 up to recall
    0.5, then nothing): 51/101. The pixel size does not move IoU; a malformed piece is counted."""
    from paligemma.tasks import detection_text, score_texts
    scene = detection_text([("ship", (1, 2, 30, 40)), ("plane", (5, 5, 9, 9))], 64, 64)
    other = detection_text([("ship", (1, 1, 5, 5))], 64, 64)
    for sizes in ([(64, 64)] * 2, None, [(640, 100)] * 2):
        got = score_texts("detect", [scene, "<loc0001> ship"], [[scene], [other]], sizes)
        assert got["per_class"]["plane"]["AP@0.5"] == pytest.approx(1.0)
        assert got["per_class"]["ship"]["AP@0.5"] == pytest.approx(51 / 101)
        assert got["mAP@0.5"] == pytest.approx((1 + 51 / 101) / 2)
        assert got["dropped"] == 1
    assert score_texts("answer", ["Two"], [["2", "two", "2"]]) == score("answer", ["Two"], [["2", "two", "2"]])
