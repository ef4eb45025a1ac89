"""Metrics against pycocoevalcap's own scorers (same tokenised inputs) and hand-computed values."""
import csv
import math
import gzip
import random
import re
from pathlib import Path

import pytest

from paligemma.captioning import metrics
from paligemma.captioning.wordnet import DEBIAN, LEXNAMES, lexnames_text

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "rsicd-subset" / "captions_only.csv"


def caption_pairs(n=60, seed=0):
    """References from UCM-Captions when available (else synthetic), predictions perturbed from them."""
    rng = random.Random(seed)
    if SHARED.exists():
        with open(SHARED) as f:
            rows = list(csv.DictReader(f))[:n]
        refs = {r["image"]: [r[f"caption_{i}"] for i in range(1, 6)] for r in rows}
    else:
        from paligemma.captioning.synthetic import scene
        refs = {str(i): scene(rng, 16)[1] for i in range(n)}
    hyps = {}
    for k, rs in refs.items():
        words = metrics.tokenize(rng.choice(rs))
        if rng.random() < 0.5 and len(words) > 3:
            words[rng.randrange(len(words))] = rng.choice(["plane", "red", "the", "river"])
        if rng.random() < 0.3:
            words = words[: max(1, len(words) // 2)]
        hyps[k] = " ".join(words)
    return hyps, refs


def tokenised(hyps, refs):
    return ({k: [" ".join(metrics.tokenize(v))] for k, v in hyps.items()},
            {k: [" ".join(metrics.tokenize(r)) for r in v] for k, v in refs.items()})


def test_bleu_rouge_cider_match_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    h, r = tokenised(*caption_pairs())
    ours = metrics.bleu(h, r)
    ref, _ = Bleu(4).compute_score(r, h, verbose=0)
    assert [round(x, 4) for x in ours] == [round(x, 4) for x in ref]
    assert round(metrics.rouge_l(h, r), 4) == round(Rouge().compute_score(r, h)[0], 4)
    assert round(metrics.cider_d(h, r), 4) == round(Cider().compute_score(r, h)[0], 4)


@pytest.mark.parametrize("references", ["all", "first"])
def test_bleu_matches_nltk_corpus_bleu_where_conventions_agree(references):
    """nltk counts a hypothesis shorter than n as one n-gram guess (max(1, .)), the COCO toolkit as
    none; with every hypothesis at least 4 words long both are the same corpus BLEU."""
    from nltk.translate.bleu_score import corpus_bleu
    h, r = tokenised(*caption_pairs())
    h = {k: v for k, v in h.items() if len(v[0].split()) >= 4}
    r = {k: (r[k][:1] if references == "first" else r[k]) for k in h}
    ours = metrics.bleu(h, r)
    for n in range(1, 5):
        theirs = corpus_bleu([[x.split() for x in r[k]] for k in h], [h[k][0].split() for k in h],
                             weights=(1 / n,) * n)
        assert ours[n - 1] == pytest.approx(theirs, abs=1e-6)


def test_hand_computed():
    h = {"a": ["a red plane"]}
    r = {"a": ["a red plane", "two planes"]}
    b = metrics.bleu(h, r)
    assert b[0] == pytest.approx(1.0) and b[2] == pytest.approx(1.0)
    assert metrics.rouge_l(h, r) == pytest.approx(1.0)
    # half the words match, hypothesis as long as the closest reference: BLEU-1 = 2/4
    b = metrics.bleu({"a": ["a red big plane"]}, {"a": ["a blue small plane"]})
    assert b[0] == pytest.approx(0.5)
    # LCS 2 of 4 both ways -> P = R = 0.5 -> F = 0.5
    assert metrics.rouge_l({"a": ["a red big plane"]}, {"a": ["a blue small plane"]}) == pytest.approx(0.5)


def test_tokenize_like_ptb():
    assert metrics.tokenize("Many buildings, and a Plane.") == ["many", "buildings", "and", "a", "plane"]


def test_health_sees_the_studys_failures():
    preds = {"1": "plis plis plis bav bav", "2": "", "3": "a river"}
    refs = {k: ["a river near a bridge"] for k in preds}
    hl = metrics.health(preds, refs)
    assert hl["empty"] == pytest.approx(1 / 3) and hl["repeated_token_3plus"] == pytest.approx(1 / 3)
    assert hl["distinct_1"] == pytest.approx(4 / 7)


def test_mismatched_images_are_an_error():
    with pytest.raises(ValueError, match="different images"):
        metrics.score_all({"a": "x"}, {"b": ["x"]}, with_meteor=False)


needs_wordnet = pytest.mark.skipif(not (DEBIAN / "data.noun").exists(), reason="Debian wordnet-base not installed")


@needs_wordnet
def test_meteor_matches_nltk_and_uses_synonyms(tmp_path):
    from nltk.translate.meteor_score import meteor_score
    h, r = tokenised(*caption_pairs(20))
    wn = __import__("paligemma.captioning.wordnet", fromlist=["x"]).ensure_wordnet()
    expected = sum(meteor_score([x.split() for x in r[k]], h[k][0].split(), wordnet=wn) for k in h) / len(h)
    assert metrics.meteor(h, r) == pytest.approx(expected)
    # nltk matches synonyms after stemming, so a pair Porter leaves alone: auto ~ car
    exact = metrics.meteor({"a": ["an auto on the road"]}, {"a": ["a car on the road"]})
    assert exact > metrics.meteor({"a": ["an apple on the road"]}, {"a": ["a car on the road"]})


def test_lexnames_match_the_manual_page():
    page = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not page.exists():
        pytest.skip("lexnames(5WN) manual page not installed")
    names = re.findall(r"^\d\d\s+(\S+)", gzip.open(page, "rt").read(), re.M)
    assert names == LEXNAMES and len(lexnames_text().splitlines()) == 45


# --- data where the conventions bite (each also checked against pycocoevalcap) ----------------------

def coco(scorer, h, r):
    score, _ = scorer.compute_score(r, h, **({"verbose": 0} if type(scorer).__name__ == "Bleu" else {}))
    return score


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    """7 words against references of 2, 8 and 20: the closest (8) sets the penalty, exp(1 - 8/7);
    the shortest (2) would give none, the average (10) a harsher one. Ties go to the shorter."""
    from pycocoevalcap.bleu.bleu import Bleu
    h = {"a": ["a b c d e f g"]}
    r = {"a": ["a b", "a b c d e f g h", " ".join("abcdefghijklmnopqrst")]}
    ours = metrics.bleu(h, r)
    assert ours[0] == pytest.approx(math.exp(1 - 8 / 7), rel=1e-9)  # every unigram matches
    assert ours == pytest.approx(coco(Bleu(4), h, r), rel=1e-9)
    tie = {"a": ["a b c d e f"]}, {"a": ["a b c d", "a b c d e f x y"]}  # 6 words: 4 and 8 both 2 away
    assert metrics.bleu(*tie)[0] == pytest.approx(1.0) and coco(Bleu(4), *tie)[0] == pytest.approx(1.0)
    # over a corpus the lengths add up before the penalty: 7 + 6 words against 8 + 4
    corpus_h, corpus_r = {**h, "b": tie[0]["a"]}, {**r, "b": tie[1]["a"]}
    assert metrics.bleu(corpus_h, corpus_r) == pytest.approx(coco(Bleu(4), corpus_h, corpus_r), rel=1e-9)


def test_repeated_ngrams_are_clipped_to_the_reference_counts():
    """'plane plane plane plane' against references holding 'plane' at most twice: BLEU counts 2 of 4
    unigrams correct; CIDEr-D clips the repeated n-grams' tf-idf to the reference's."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    h = {"a": ["plane plane plane plane"], "b": ["a red roof"], "c": ["two ships ships ships near a pier"]}
    r = {"a": ["a plane near a plane", "one plane"], "b": ["a red roof on a house", "red roofs"],
         "c": ["two ships near a pier", "ships at a pier", "a pier with two ships"]}
    b1 = metrics.bleu({"a": h["a"]}, {"a": r["a"]})[0]
    assert b1 == pytest.approx(2 / 4 * math.exp(1 - 5 / 4), rel=1e-9)  # 4 words, closest reference 5
    assert metrics.bleu(h, r) == pytest.approx(coco(Bleu(4), h, r), rel=1e-9)
    ours = metrics.cider_d(h, r)
    assert ours == pytest.approx(coco(Cider(), h, r), rel=1e-9)
    unclipped = dict(h, a=["plane plane plane plane plane plane plane plane"])
    assert metrics.cider_d(unclipped, r) < ours  # more repeats, never a higher score


def test_hypotheses_shorter_than_four_words():
    """1-3 word hypotheses have no 4-gram (COCO counts zero guesses, not one); BLEU, ROUGE-L and
    CIDEr-D equal pycocoevalcap's on a corpus of them, mixed with longer ones."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    h = {"a": ["plane"], "b": ["red roof"], "c": ["two ships near"], "d": ["a lake with a bridge over it"]}
    r = {"a": ["a plane on a runway", "plane"], "b": ["a red roof", "red roofs of houses"],
         "c": ["two ships near a pier", "ships"], "d": ["a bridge over a lake", "a lake and a bridge"]}
    ours = metrics.bleu(h, r)
    assert ours == pytest.approx(coco(Bleu(4), h, r), rel=1e-9)
    assert metrics.rouge_l(h, r) == pytest.approx(coco(Rouge(), h, r), rel=1e-9)
    assert metrics.cider_d(h, r) == pytest.approx(coco(Cider(), h, r), rel=1e-9)
    # by hand for one image: 1 of 1 unigram; no bigram guess, smoothed (0 + 1e-15) / (0 + 1e-9), so
    # BLEU-2 = (1 x 1e-6)^(1/2); counting one guess (nltk's max(1, .)) would give 3e-8
    one = metrics.bleu({"a": h["a"]}, {"a": r["a"]})
    assert one[0] == pytest.approx(1.0) and one[1] == pytest.approx(1e-3, rel=1e-6)
