"""answers.py at the edges test_answers.py's examples do not reach: ANLS normalises by the longer of the
two strings (an answer longer than its reference), and vqaEval.py's period quirk (`re.UNICODE` passed
as `sub`'s count: at most 32 periods are stripped), both hand-computed."""
import pytest

from paligemma.tasks import anls, normalize_answer


def test_anls_divides_by_the_longer_string():
    # "helloooo" vs "hello": 3 insertions over max(8, 5) = 8 -> 1 - 3/8 = 0.625; over the reference's 5
    # it would be 0.6, past the 0.5 threshold, so 0
    assert anls("helloooo", ["hello"]) == pytest.approx(0.625)


def test_vqa_normalisation_strips_at_most_32_periods():
    # 40 periods, none before a digit: vqaEval.py's periodStrip.sub("", text, re.UNICODE) removes 32
    assert normalize_answer("." * 40) == "." * 8
    assert normalize_answer("." * 32) == ""
