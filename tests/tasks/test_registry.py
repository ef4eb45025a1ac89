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
