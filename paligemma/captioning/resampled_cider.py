"""CIDEr-D of a thousand bootstrap resamples at once, the document frequencies recomputed in each.

CIDEr-D's idf comes from the evaluated references: df(g) counts the images whose references hold
n-gram g, and idf(g) = log N - log max(1, df(g)). A resample is a new test set, so its df is
recounted; an image drawn twice is two documents, as pycocoevalcap counts an image listed twice
(and N stays the number of entries). With weights w (B, N), how often resample b draws image i:

    df_b(g) = sum_i w_bi [g in refs of i]                 (one sparse product)
    u_b(g)  = (log N_b - log max(1, df_b(g)))^2

Every piece of the score is then linear in u, because the tf-idf vectors are tf(g) * idf(g) and
clipping commutes with a common factor: min(tf_h idf, tf_r idf) * tf_r idf = min(tf_h, tf_r) tf_r u.

    numerator(i, r, n) = sum_g min(tf_h, tf_r) tf_r u_b(g)   |h|^2 = sum_g tf_h^2 u_b(g)   |r|^2 likewise
    score_b(i) = 10 / (4 m_i) sum_{r, n} numerator / (|h| |r|) * exp(-(len h - len r)^2 / 2 sigma^2)

so one resample costs three sparse-matrix products with its u. N-grams held by the same set of
images have the same df in every resample, so they share one column (about a fifth of the n-grams
on RSICD-like captions: each image's own rare n-grams collapse into one), which keeps u in cache.
"""
import math
import warnings
from collections import defaultdict

import numpy as np
import torch

from .metrics import ngrams

CHUNK = 1 << 22  # elements per dense (rows x resamples) block: 32 MB of float64


def _csr(rows: list[int], cols: list[int], vals: list[float], shape) -> torch.Tensor:
    """Sparse matrix with duplicate (row, col) entries summed (n-grams sharing a column add up)."""
    coo = torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.int64).reshape(2, -1),
                                  torch.tensor(vals, dtype=torch.float64), shape, check_invariants=False)
    with warnings.catch_warnings():  # "CSR support is in beta": the products used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


class CiderD:
    """CIDEr-D tables for one set of hypotheses, built once; `scores(weights)` per resample."""

    def __init__(self, hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4, sigma: float = 6.0):
        self.n, self.n_images = n, len(hyps)
        ref_grams = [[[ngrams(r, k) for k in range(1, n + 1)] for r in rs] for rs in refs]
        hyp_grams = [[ngrams(h, k) for k in range(1, n + 1)] for h in hyps]
        holders = defaultdict(list)  # n-gram -> images whose references hold it, ascending
        for i, rs in enumerate(ref_grams):
            for g in {g for r in rs for counts in r for g in counts}:
                holders[g].append(i)
        column = {(): 0}  # image set -> column; hypothesis-only n-grams share the empty set (df 0 always)
        col = {g: column.setdefault(tuple(images), len(column)) for g, images in holders.items()}
        col_of = lambda g: col.get(g, 0)  # noqa: E731
        h_rows, h_cols, h_vals = [], [], []
        r_rows, r_cols, r_vals, m_rows, m_cols, m_vals = [], [], [], [], [], []
        ref_image, penalty = [], []
        for i, (hg, rs) in enumerate(zip(hyp_grams, ref_grams)):
            for k in range(n):
                for g, tf in hg[k].items():
                    h_rows.append(i * n + k), h_cols.append(col_of(g)), h_vals.append(tf * tf)
            for r_words, rg in zip(refs[i], rs):
                row = len(ref_image) * n
                for k in range(n):
                    for g, tf in rg[k].items():
                        r_rows.append(row + k), r_cols.append(col_of(g)), r_vals.append(tf * tf)
                        if g in hg[k]:
                            m_rows.append(row + k), m_cols.append(col_of(g)), m_vals.append(min(hg[k][g], tf) * tf)
                ref_image.append(i)
                penalty.append(math.exp(-((len(hyps[i]) - len(r_words)) ** 2) / (2 * sigma ** 2)))
        n_cols, n_refs = len(column), len(ref_image)
        d_rows = [c for images, c in column.items() for _ in images]
        d_cols = [i for images in column for i in images]
        self.holders = _csr(d_rows, d_cols, [1.0] * len(d_rows), (n_cols, self.n_images))  # (G, N)
        self.hyp_sq = _csr(h_rows, h_cols, h_vals, (self.n_images * n, n_cols))  # (N n, G)
        self.ref_sq = _csr(r_rows, r_cols, r_vals, (n_refs * n, n_cols))  # (R n, G)
        self.matched = _csr(m_rows, m_cols, m_vals, (n_refs * n, n_cols))  # (R n, G)
        self.ref_image = torch.tensor(ref_image, dtype=torch.int64)  # (R,)
        self.penalty = torch.tensor(penalty, dtype=torch.float64)  # (R,)
        per_image = torch.bincount(self.ref_image, minlength=self.n_images).double()
        self.scale = 10.0 / (n * per_image)  # (N,) the mean over n-gram orders and references, x10

    def image_scores(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-image CIDEr-D under each resample's document frequencies: weights (B, N) -> (B, N)."""
        b = weights.shape[0]
        df = self.holders @ weights.T  # (G, B)
        u = (torch.log(weights.sum(1)) - torch.log(df.clamp(min=1.0))) ** 2  # (G, B) squared idf
        hyp_norm = (self.hyp_sq @ u).sqrt().view(self.n_images, self.n, b)[self.ref_image]  # (R, n, B)
        ref_norm = (self.ref_sq @ u).sqrt().view(-1, self.n, b)  # (R, n, B)
        num = (self.matched @ u).view(-1, self.n, b)
        norm = hyp_norm * ref_norm
        # pycocoevalcap divides only where both norms are non-zero (else the numerator is 0 anyway)
        val = torch.where(norm > 0, num / torch.where(norm > 0, norm, 1.0), num)
        per_ref = (val.sum(1) * self.penalty[:, None])  # (R, B)
        per_image = torch.zeros(self.n_images, b, dtype=torch.float64).index_add_(0, self.ref_image, per_ref)
        return (per_image * self.scale[:, None]).T

    def scores(self, weights: np.ndarray) -> np.ndarray:
        """Corpus CIDEr-D of each resample: weights (B, N) -> (B,), in chunks that bound memory."""
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        rows = max(self.holders.shape[0], self.ref_sq.shape[0], 1)
        step = max(1, CHUNK // rows)
        out = []
        for w in weights.split(step):
            out.append((self.image_scores(w) * w).sum(1) / w.sum(1))
        return torch.cat(out).numpy()
