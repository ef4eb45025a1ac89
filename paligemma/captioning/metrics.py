"""Captioning metrics with the conventions of the COCO caption toolkit (pycocoevalcap), which remote
sensing papers report: BLEU-1..4 (corpus level, closest reference length), ROUGE-L (beta 1.2),
CIDEr-D (sigma 6, clipped counts, x10, document frequencies from the evaluated references), and
METEOR through nltk with WordNet synonyms (pycocoevalcap runs Meteor 1.5 in Java, which
meteor_java.py runs the same way: close, not identical). Inputs are dicts image -> list of captions,
one prediction per image. The per-image pieces (bleu_counts, rouge_l_images, meteor_images) are
what bootstrap.py resamples.
"""
import math
import re
from collections import Counter

import numpy as np

# PTBTokenizer drops these tokens; we approximate its splitting by lower-casing and stripping them
_PUNCT = re.compile(r"''|``|--|\.\.\.|[.?!,:;\-'`\"()\[\]{}]")


def tokenize(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu_counts(hyp: list[str], refs: list[list[str]], n: int = 4) -> list[int]:
    """One image's BLEU statistics: clipped matches and guesses for 1..n-grams, then the hypothesis
    length and the closest reference length (ties: the shorter). Corpus BLEU sums these."""
    correct, guess = [], []
    for k in range(1, n + 1):
        max_ref = Counter()
        for r in refs:
            max_ref |= ngrams(r, k)
        correct.append(sum(min(c, max_ref[g]) for g, c in ngrams(hyp, k).items()))
        guess.append(max(len(hyp) - k + 1, 0))
    return correct + guess + [len(hyp), min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]]


def bleu_from_counts(totals: np.ndarray, n: int = 4) -> np.ndarray:
    """BLEU-1..n from summed bleu_counts: totals (..., 2n + 2) -> scores (..., n); any leading shape
    (one corpus, or one row per bootstrap resample)."""
    totals = np.asarray(totals, dtype=np.float64)
    correct, guess, hyp_len, ref_len = totals[..., :n], totals[..., n:2 * n], totals[..., -2], totals[..., -1]
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's smoothing of empty counts
    precision = np.cumprod((correct + tiny) / (guess + small), axis=-1)
    scores = precision ** (1 / np.arange(1, n + 1))
    ratio = (hyp_len + tiny) / (ref_len + small)
    penalty = np.exp(1 - 1 / np.minimum(ratio, 1.0))  # 1 where the hypotheses are not shorter
    return scores * penalty[..., None]


def bleu(hyps: dict, refs: dict, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n: clipped n-gram matches summed over the corpus; brevity penalty against the
    reference length closest to each hypothesis (ties: the shorter)."""
    totals = np.sum([bleu_counts(hyp[0].split(), [r.split() for r in refs[key]], n) for key, hyp in hyps.items()], 0)
    return bleu_from_counts(totals, n).tolist()


def lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_images(hyps: dict, refs: dict, beta: float = 1.2) -> list[float]:
    """Per image, the LCS F-measure with the best precision and best recall over references."""
    out = []
    for key, hyp in hyps.items():
        h = hyp[0].split()
        p = max((lcs(r.split(), h) / len(h) if h else 0.0) for r in refs[key])
        r = max((lcs(r_.split(), h) / len(r_.split()) if r_.split() else 0.0) for r_ in refs[key])
        out.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0)
    return out


def rouge_l(hyps: dict, refs: dict, beta: float = 1.2) -> float:
    """Mean over images of the LCS F-measure (rouge_l_images)."""
    return sum(rouge_l_images(hyps, refs, beta)) / len(hyps)


def cider_d(hyps: dict, refs: dict, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D: tf-idf n-gram cosine, hypothesis counts clipped by the reference's, a Gaussian
    penalty on the length difference, averaged over references and n, times 10."""
    df = Counter()
    for key in hyps:
        df.update({g for r in refs[key] for k in range(1, n + 1) for g in ngrams(r.split(), k)})
    log_n = math.log(float(len(hyps)))

    def vec(words):
        v = [{} for _ in range(n)]
        norms = [0.0] * n
        for k in range(1, n + 1):
            for g, tf in ngrams(words, k).items():
                v[k - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
                norms[k - 1] += v[k - 1][g] ** 2
        return v, [math.sqrt(x) for x in norms], len(words)

    total = 0.0
    for key, hyp in hyps.items():
        vh, nh, lh = vec(hyp[0].split())
        score = 0.0
        for r in refs[key]:
            vr, nr, lr = vec(r.split())
            for k in range(n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                score += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        total += score / n / len(refs[key]) * 10.0
    return total / len(hyps)


def meteor_images(hyps: dict, refs: dict) -> list[float]:
    """Per image, nltk METEOR (exact, stem and WordNet-synonym matches; best over references)."""
    from nltk.translate.meteor_score import meteor_score
    from .wordnet import ensure_wordnet
    wn = ensure_wordnet()
    return [meteor_score([r.split() for r in refs[k]], h[0].split(), wordnet=wn) for k, h in hyps.items()]


def meteor(hyps: dict, refs: dict) -> float:
    """Mean nltk METEOR over images (meteor_images)."""
    return sum(meteor_images(hyps, refs)) / len(hyps)


def tokenised_inputs(predictions: dict, references: dict) -> tuple[dict, dict]:
    """predictions: image -> caption; references: image -> [captions] -> the scorers' inputs, image ->
    [tokenised captions joined by spaces], in the predictions' order. Same tokenisation for both."""
    missing = sorted(set(predictions) ^ set(references))
    if missing:
        raise ValueError(f"predictions and references cover different images, e.g. {missing[:5]}")
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    empty = [k for k, v in references.items() if not v]
    if empty:
        raise ValueError(f"images without a reference caption, e.g. {empty[:5]}")
    hyps = {k: [" ".join(tokenize(v))] for k, v in predictions.items()}
    refs = {k: [" ".join(tokenize(r)) for r in references[k]] for k in predictions}
    return hyps, refs


def score_all(predictions: dict, references: dict, with_meteor: bool = True) -> dict:
    """predictions: image -> caption; references: image -> [captions]; METEOR by nltk."""
    hyps, refs = tokenised_inputs(predictions, references)
    b = bleu(hyps, refs)
    out = {f"BLEU-{i + 1}": b[i] for i in range(4)}
    if with_meteor:
        out["METEOR"] = meteor(hyps, refs)
    out["ROUGE-L"] = rouge_l(hyps, refs)
    out["CIDEr-D"] = cider_d(hyps, refs)
    return out


def health(predictions: dict, references: dict) -> dict:
    """Symptoms of the study's failures: empty outputs, stuttering ('plis plis bav bav'), low diversity."""
    toks = [tokenize(p) for p in predictions.values()]
    ref_lens = [len(tokenize(r)) for rs in references.values() for r in rs]
    stutter = sum(any(t[i] == t[i + 1] == t[i + 2] for i in range(len(t) - 2)) for t in toks)
    uni = [w for t in toks for w in t]
    bi = [g for t in toks for g in zip(t, t[1:])]
    n = max(len(toks), 1)
    return {
        "empty": sum(not t for t in toks) / n,
        "repeated_token_3plus": stutter / n,
        "distinct_1": len(set(uni)) / max(len(uni), 1),
        "distinct_2": len(set(bi)) / max(len(bi), 1),
        "mean_length": sum(map(len, toks)) / n,
        "mean_reference_length": sum(ref_lens) / max(len(ref_lens), 1),
    }
