"""Bootstrap intervals: resampled metrics against the plain metrics (ours and pycocoevalcap's) run on
the resampled sets, a hand-written bootstrap loop, and the 1/sqrt(images) law on generated data."""
import random

import numpy as np
import pytest

from paligemma.captioning import bootstrap, metrics
from paligemma.captioning.synthetic import scene
from paligemma.captioning.wordnet import DEBIAN

from .test_metrics import caption_pairs


def generated(n, seed):
    """Synthetic scenes' five captions; predictions copied from them with edits, a fifth from another image."""
    rng = random.Random(seed)
    refs = {str(i): scene(rng, 16)[1] for i in range(n)}
    keys, preds = list(refs), {}
    for k in keys:
        words = rng.choice(refs[k] if rng.random() < 0.8 else refs[rng.choice(keys)]).split()
        if rng.random() < 0.5:
            words[rng.randrange(len(words))] = rng.choice(["plane", "red", "the", "river", "lake"])
        if rng.random() < 0.3:
            words = words[: max(1, len(words) // 2)]
        preds[k] = " ".join(words)
    return preds, refs


def with_edge_cases(preds, refs):
    """An empty prediction, an empty reference (RSICD has one), a perfect match, a 1-word caption."""
    return ({**preds, "e1": "", "e2": "a plane on a runway", "e3": "a lake with a bridge", "e4": "bridge"},
            {**refs, "e1": ["a plane on a runway", "planes"], "e2": ["", "a plane on a runway"],
             "e3": ["a lake with a bridge"], "e4": ["a bridge over a river", "bridge"]})


def resampled(d: dict, draws) -> dict:
    """The resampled set as a plain dict: an image drawn twice is two entries."""
    keys = list(d)
    return {f"{keys[i]}#{j}": d[keys[i]] for j, i in enumerate(draws)}


def test_resampled_bleu_and_cider_equal_the_metrics_on_the_resampled_sets():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    preds, refs = with_edge_cases(*caption_pairs(60, seed=3))
    c = bootstrap.measure(preds, refs, meteor=None)
    draws = bootstrap.resample_draws(len(preds), 4, seed=7)
    got = bootstrap.values(c, bootstrap.resample_counts(len(preds), 4, seed=7))
    assert any(len(set(d)) < len(d) for d in draws)  # images drawn twice: duplicates count in the df
    h, r = metrics.tokenised_inputs(preds, refs)
    for b, d in enumerate(draws):
        hb, rb = resampled(h, d), resampled(r, d)
        plain = metrics.bleu(hb, rb) + [metrics.rouge_l(hb, rb), metrics.cider_d(hb, rb)]
        coco = Bleu(4).compute_score(rb, hb, verbose=0)[0] + [Cider().compute_score(rb, hb)[0]]
        ours = [got[k][b] for k in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"]]
        assert ours == pytest.approx(plain, rel=1e-9, abs=1e-12)
        assert ours[:4] + ours[5:] == pytest.approx(coco, rel=1e-9, abs=1e-12)
    # no resampling: the corpus values score_all reports
    assert bootstrap.scores(c) == pytest.approx(metrics.score_all(preds, refs, with_meteor=False), rel=1e-12)


def test_identical_predictions_differ_by_exactly_zero():
    preds, refs = generated(80, seed=1)
    a = bootstrap.measure(preds, refs, meteor=None)
    b = bootstrap.measure(dict(preds), refs, meteor=None)  # measured again, from its own copy
    for k, v in bootstrap.paired(a, b, n=300, seed=5).items():
        assert v == {"difference": 0.0, "ci95": [0.0, 0.0], "b_beats_a": 0.0}, k


def test_paired_sees_a_better_model_and_the_same_images_are_drawn_for_both():
    preds, refs = generated(120, seed=2)
    a = bootstrap.measure(preds, refs, meteor=None)
    better = bootstrap.measure({k: v[0] for k, v in refs.items()}, refs, meteor=None)  # copies a reference
    p = bootstrap.paired(a, better, n=200, seed=0)
    assert all(v["difference"] > 0 and v["ci95"][0] > 0 and v["b_beats_a"] == 1.0 for v in p.values())
    # each resample's difference is the difference of the two resampled scores, draw for draw
    w = bootstrap.resample_counts(120, 200, seed=0)
    diff = bootstrap.values(better, w)["CIDEr-D"] - bootstrap.values(a, w)["CIDEr-D"]
    assert p["CIDEr-D"]["ci95"] == bootstrap.interval(diff)
    with pytest.raises(ValueError, match="same images"):
        bootstrap.paired(a, bootstrap.measure(dict(list(preds.items())[:60]), dict(list(refs.items())[:60]),
                                              meteor=None))


def test_mean_metric_interval_matches_a_hand_written_bootstrap():
    """ROUGE-L is a mean over images: a plain loop over resamples, the metric run on each resampled
    set, and the percentile by hand (linear interpolation between the sorted values)."""
    preds, refs = caption_pairs(40, seed=4)
    n, seed = 200, 11
    rng = np.random.default_rng(seed)
    h, r = metrics.tokenised_inputs(preds, refs)
    samples = []
    for _ in range(n):
        d = rng.integers(0, len(h), len(h))
        samples.append(metrics.rouge_l(resampled(h, d), resampled(r, d)))
    samples.sort()

    def percentile(q):
        pos = q * (n - 1)
        i = int(pos)
        return samples[i] + (pos - i) * (samples[i + 1] - samples[i])

    got = bootstrap.intervals(bootstrap.measure(preds, refs, meteor=None), n=n, seed=seed)["ROUGE-L"]
    assert got == pytest.approx([percentile(0.025), percentile(0.975)], rel=1e-12)


def test_mean_intervals_of_any_per_item_score_match_a_hand_written_bootstrap():
    """A generic mean-decomposable score (e.g. VQA accuracy, 0/1 per question): the loop over
    rng.integers draws, the mean of each resample, numpy's percentile; and the same draws as the captions'."""
    rng = np.random.default_rng(2)
    correct, anls = (rng.random(57) < 0.6).astype(float), rng.random(57)
    loop = np.random.default_rng(9)
    means = [correct[loop.integers(0, 57, 57)].mean() for _ in range(300)]
    got = bootstrap.mean_intervals({"accuracy": correct, "ANLS": anls}, n=300, seed=9)
    assert got["accuracy"] == pytest.approx(list(np.percentile(means, [2.5, 97.5])), rel=1e-12)
    assert got["accuracy"][0] < correct.mean() < got["accuracy"][1]
    preds, refs = caption_pairs(57, seed=1)
    rouge = bootstrap.measure(preds, refs, meteor=None).rouge
    assert bootstrap.mean_intervals({"r": rouge}, 300, 9)["r"] == bootstrap.intervals(
        bootstrap.measure(preds, refs, meteor=None), 300, 9)["ROUGE-L"]
    with pytest.raises(ValueError, match="one value per item"):
        bootstrap.mean_intervals({"a": correct, "b": anls[:10]})


def test_seeded_runs_are_reproducible():
    c = bootstrap.measure(*generated(60, seed=0), meteor=None)
    assert bootstrap.intervals(c, n=100, seed=3) == bootstrap.intervals(c, n=100, seed=3)
    assert bootstrap.intervals(c, n=100, seed=3) != bootstrap.intervals(c, n=100, seed=4)


def test_intervals_shrink_as_one_over_sqrt_images():
    """16x the images: intervals 4x narrower. Measured over seeds 0-5: 3.1-4.8 for every metric; the
    band 2.5-6.4 (4 / 1.6 to 4 x 1.6) fails for 1/N (16x) or 1/N^(1/4) (2x)."""
    small, large = (bootstrap.measure(*generated(n, seed=0), meteor=None) for n in (50, 800))
    ws, wl = (bootstrap.intervals(c, n=300, seed=0) for c in (small, large))
    ratios = {k: (ws[k][1] - ws[k][0]) / (wl[k][1] - wl[k][0]) for k in ws}
    assert all(2.5 < v < 6.4 for v in ratios.values()), ratios


@pytest.mark.skipif(not (DEBIAN / "data.noun").exists(), reason="Debian wordnet-base not installed")
def test_nltk_meteor_is_resampled_as_a_mean():
    preds, refs = caption_pairs(8, seed=5)
    c = bootstrap.measure(preds, refs, meteor="nltk")
    assert bootstrap.scores(c)["METEOR"] == pytest.approx(metrics.score_all(preds, refs)["METEOR"], rel=1e-12)
    w = bootstrap.resample_counts(8, 2, seed=0)
    h, r = metrics.tokenised_inputs(preds, refs)
    for b, d in enumerate(bootstrap.resample_draws(8, 2, seed=0)):
        assert bootstrap.values(c, w)["METEOR"][b] == pytest.approx(metrics.meteor(resampled(h, d), resampled(r, d)))


def test_meteor_choice_is_checked():
    with pytest.raises(ValueError, match="expected 'java', 'nltk' or 'auto'"):
        bootstrap.resolve_meteor("jar")
    assert bootstrap.resolve_meteor("nltk") == "nltk"
