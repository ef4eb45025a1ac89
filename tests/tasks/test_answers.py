"""VQA accuracy (the official VQAv2 evaluator's normalisation and leave-one-out average), exact match,
ANLS and character error rate, on hand-computed examples."""
import pytest

from paligemma.tasks import anls, character_error_rate, exact_match, normalize_answer, score_answers, score_ocr, vqa_accuracy
from paligemma.tasks.answers import levenshtein


def test_normalisation_as_vqaeval():
    assert normalize_answer("The Dog!") == "dog"            # "!" -> space, lower case, article out
    assert normalize_answer("two dogs.") == "2 dogs"        # number word, final period
    assert normalize_answer("dont know") == "don't know"    # contraction restored
    assert normalize_answer("1,000") == "1000"              # a digit comma: punctuation deleted, not spaced
    assert normalize_answer("yes, it is") == "yes it is"    # ", " next to a space: deleted
    assert normalize_answer("black/white") == "black white"  # no space beside "/": becomes one
    assert normalize_answer("3.5 m") == "3.5 m"             # a period before a digit stays
    assert normalize_answer("  a\tcar\n") == "car"


def test_vqa_accuracy_leave_one_out_by_hand():
    # references disagree, so all are normalised: 3 x "2" (one was "two"), 7 x "3". Leaving out one of the
    # three "2": 2 / 3; leaving out a "3": min(1, 3 / 3) = 1 -> (3 * 2/3 + 7 * 1) / 10 = 0.9, not min(1, 3/3) = 1
    refs = ["2", "2", "two"] + ["3"] * 7
    assert vqa_accuracy("Two", refs) == pytest.approx(0.9)
    # two matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("The Dog!", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)  # 4 matches: 3 remain each time
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("1,000", ["1000"] * 3 + ["many"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cow", ["dog"] * 4 + ["cat"] * 6) == 0.0


def test_vqa_accuracy_official_quirks():
    # unanimous references: no normalisation at all (vqaEval.py), so case counts
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # newlines, tabs and outer spaces always go
    # one reference: unanimous, so never normalised; nothing to leave out: 1 for an equal answer after the
    # space clean-up (as big_vision's vqav2.py; its vqa.py compares single answers exactly too), else 0
    assert vqa_accuracy("Two.", ["2"]) == 0.0
    assert vqa_accuracy("Yes", ["yes"]) == 0.0 and vqa_accuracy("the dog", ["dog"]) == 0.0
    assert vqa_accuracy("2", ["2"]) == 1.0 and vqa_accuracy(" yes\t", ["yes\n"]) == 1.0
    with pytest.raises(ValueError, match="without reference"):
        vqa_accuracy("x", [])


def test_exact_match():
    assert exact_match(" Paris ", ["London", "Paris"]) == 1.0
    assert exact_match("paris", ["Paris"]) == 0.0


def test_levenshtein_by_hand():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2


def test_anls_by_hand():
    assert anls("hallo", ["hello"]) == pytest.approx(0.8)            # 1 edit / 5
    assert anls("help", ["hello"]) == pytest.approx(0.6)             # 2 edits / max(5, 4)
    assert anls("hxxxo", ["hello"]) == 0.0                           # 3 / 5 = 0.6 >= 0.5
    assert anls("hexlo", ["nothing like it", "hello"]) == pytest.approx(0.8)  # the best reference
    assert anls("ab", ["abcd"]) == 0.0                               # exactly 0.5: not under the threshold
    assert anls("", [""]) == 1.0 and anls("x", [""]) == 0.0
    assert anls("Hello", ["hello"]) == pytest.approx(0.8)            # case counts (as big_vision's anls_metric)


def test_character_error_rate_by_hand():
    # 1 edit of "abc" + 1 of "hello" over 3 + 5 characters; the second reference of a row is not used
    assert character_error_rate(["abd", "helo"], [["abc", "zzz"], ["hello"]]) == pytest.approx(2 / 8)
    assert character_error_rate(["abcabc"], [["abc"]]) == pytest.approx(1.0)  # insertions can pass 1


def test_set_scores():
    s = score_answers(["two", "cow"], [["2", "2", "two"] + ["3"] * 7, ["dog"] * 10])
    assert s == pytest.approx({"VQA accuracy": 0.45, "exact match": 0.5, "ANLS": (1.0 + 0.0) / 2})
    o = score_ocr(["hallo", "abc"], [["hello"], ["abc"]])
    assert o == pytest.approx({"ANLS": 0.9, "CER": 1 / 8, "exact match": 0.5})
    with pytest.raises(ValueError, match="2 predictions for 1 reference"):
        score_answers(["a", "b"], [["a"]])
