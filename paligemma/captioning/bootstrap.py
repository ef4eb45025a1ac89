"""95 % confidence intervals for the captioning metrics, and paired comparisons: a percentile
bootstrap over images.

A resample draws N images with replacement from the N evaluated (resample b is the b-th call of
`rng.integers(0, N, N)` with `rng = np.random.default_rng(seed)`) and every metric is computed again
on it as its definition requires:

- BLEU-1..4: clipped n-gram matches, guesses and lengths summed over the resample, then the
  geometric mean and brevity penalty (metrics.bleu_counts per image, summed with weights);
- CIDEr-D: document frequencies recounted from the resample's references (resampled_cider.py);
- METEOR, Java: the jar's corpus score from the resample's summed statistics (the number
  pycocoevalcap reports is that aggregate, not a mean of segment scores, so it is re-aggregated);
- METEOR, nltk, and ROUGE-L: means of per-image scores, as their corpus values are.

Precompute per-image statistics once (`measure`); a resample is then a vector of counts, how often
each image was drawn, and a corpus statistic a weighted sum: one matrix product for 1000 resamples.
The interval is the 2.5th and 97.5th percentile of the resampled values (numpy's linear
interpolation). A paired comparison draws the same images for A and B, so the difference's
interval leaves out the images' own difficulty, which both share.
"""
import zlib
from dataclasses import dataclass

import numpy as np

from . import meteor_java
from .metrics import bleu_counts, bleu_from_counts, meteor_images, rouge_l_images, tokenised_inputs
from .resampled_cider import CiderD

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]
NLTK_NAME = "nltk meteor_score (WordNet 3.0): a mean of per-image scores, not comparable with published Meteor 1.5"


def resolve_meteor(choice: str) -> str:
    """'java', 'nltk' or 'auto' (Java when it can run here, else nltk) -> 'java' / 'nltk'; asking for
    Java where it cannot run is an error that says what is missing."""
    if choice not in ("java", "nltk", "auto"):
        raise ValueError(f"meteor: expected 'java', 'nltk' or 'auto', got {choice!r}")
    reason = meteor_java.unavailable() if choice != "nltk" else None
    if choice == "java" and reason:
        raise RuntimeError(reason)
    return "nltk" if choice == "nltk" or reason else "java"


def meteor_name(kind: str | None) -> str:
    """The METEOR implementation as the protocol names it."""
    return {"java": meteor_java.NAME, "nltk": NLTK_NAME, None: "not computed"}[kind]


@dataclass
class Corpus:
    """Per-image statistics of one set of predictions: everything a resample needs, computed once."""
    images: list[str]
    references: int  # checksum of the tokenised references: a paired comparison needs the same
    bleu: np.ndarray  # (N, 10) bleu_counts
    rouge: np.ndarray  # (N,)
    meteor: np.ndarray | None  # (N, 23) the jar's statistics, (N,) nltk scores, or None
    meteor_kind: str | None  # 'java', 'nltk' or None
    cider: CiderD


def measure(predictions: dict, references: dict, meteor: str | None = "auto", jvm=None) -> Corpus:
    """predictions: image -> caption; references: image -> [captions]; tokenised as metrics.score_all
    does. meteor: 'java' / 'nltk' / 'auto' / None (no METEOR); jvm: an open meteor_java.Meteor15 to
    reuse (evaluate.py scores two rows with one JVM), else one is started for this call."""
    hyps, refs = tokenised_inputs(predictions, references)
    images = list(hyps)
    h = [hyps[k][0].split() for k in images]
    r = [[x.split() for x in refs[k]] for k in images]
    kind = None if meteor is None else resolve_meteor(meteor)
    if kind == "java":
        if jvm is None:
            with meteor_java.Meteor15() as own:
                met = own.stats([hyps[k][0] for k in images], [refs[k] for k in images])
        else:
            met = jvm.stats([hyps[k][0] for k in images], [refs[k] for k in images])
    elif kind == "nltk":
        met = np.array(meteor_images(hyps, refs))
    else:
        met = None
    return Corpus(images=images, references=zlib.crc32(repr([refs[k] for k in images]).encode()),
                  bleu=np.array([bleu_counts(x, y) for x, y in zip(h, r)], dtype=np.float64),
                  rouge=np.array(rouge_l_images(hyps, refs)), meteor=met, meteor_kind=kind, cider=CiderD(h, r))


def resample_draws(n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """(B, N) image indices: row b is the b-th call of rng.integers(0, N, N) (a plain loop's draws)."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, n_images, n_images) for _ in range(n_resamples)]
    return np.array(draws, dtype=np.int64).reshape(n_resamples, n_images)


def resample_counts(n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """(B, N): how often each resample draws each image; rows sum to N."""
    flat = (resample_draws(n_images, n_resamples, seed) + n_images * np.arange(n_resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * n_images).reshape(n_resamples, n_images)


def values(c: Corpus, weights: np.ndarray) -> dict:
    """Every metric on every resample: weights (B, N) -> name -> (B,). Ones (1, N): the corpus itself."""
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum(1)
    out = dict(zip(METRICS[:4], bleu_from_counts(weights @ c.bleu).T))
    if c.meteor_kind == "java":
        out["METEOR"] = meteor_java.corpus_score(c.meteor, weights)
    elif c.meteor_kind == "nltk":
        out["METEOR"] = weights @ c.meteor / total
    out["ROUGE-L"] = weights @ c.rouge / total
    out["CIDEr-D"] = c.cider.scores(weights)
    return out


def scores(c: Corpus) -> dict:
    """The corpus values (metrics.score_all's, with the METEOR of c.meteor_kind)."""
    return {k: float(v[0]) for k, v in values(c, np.ones((1, len(c.images)))).items()}


def interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def intervals(c: Corpus, n: int = 1000, seed: int = 0) -> dict:
    """name -> [lo, hi], the 95 % percentile interval over n resamples of the images."""
    return {k: interval(v) for k, v in values(c, resample_counts(len(c.images), n, seed)).items()}


def mean_intervals(per_item: dict, n: int = 1000, seed: int = 0) -> dict:
    """Any score that is a mean over items (VQA accuracy, ANLS, a per-image mean): name -> per-item
    values (N,) -> name -> [lo, hi], resampled as `intervals` draws the images (same seed, same draws)."""
    sizes = {k: len(v) for k, v in per_item.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"mean_intervals: every score needs one value per item, the same items, got {sizes}")
    weights = resample_counts(next(iter(sizes.values())), n, seed)
    return {k: interval(weights @ np.asarray(v, dtype=np.float64) / weights.sum(1)) for k, v in per_item.items()}


def paired(a: Corpus, b: Corpus, n: int = 1000, seed: int = 0) -> dict:
    """B against A on the same resampled images: name -> {'difference': B - A on the corpus,
    'ci95': [lo, hi] of B - A, 'b_beats_a': share of resamples where B scores higher}."""
    if a.images != b.images or a.references != b.references:
        raise ValueError("a paired comparison needs the same images, in the same order, with the same references")
    if a.meteor_kind != b.meteor_kind:
        raise ValueError(f"A's METEOR is {a.meteor_kind}, B's {b.meteor_kind}: compare one implementation")
    weights = resample_counts(len(a.images), n, seed)
    return paired_block(values(a, weights), values(b, weights), scores(a), scores(b))


def paired_block(va: dict, vb: dict, sa: dict, sb: dict, interval_of=interval) -> dict:
    """name -> A's and B's values on the same resamples (B,), and their corpus values -> name ->
    {'difference', 'ci95', 'b_beats_a'} (tasks/resampling.py's paired too)."""
    return {k: {"difference": sb[k] - sa[k], "ci95": interval_of(vb[k] - va[k]),
                "b_beats_a": float(np.mean(vb[k] > va[k]))} for k in va}
