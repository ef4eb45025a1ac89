"""95 % intervals for the task metrics, and paired B - A comparisons: the captions' percentile bootstrap
over images (captioning/bootstrap.py), with the same draws (seed, resamples), so a caption table and a
task table read alike.

Each metric is computed on a resample as its definition computes it on the whole set:

- VQA accuracy, exact match, ANLS, segmentation's miou and boxacc/t: means of per-item scores, so a
  resample's value is the mean over the items it drew;
- CER is a corpus ratio, sum(edits) / sum(reference characters) (jiwer's cer, answers.py): both sums
  are resampled, not a mean of per-item ratios (a long reference weighs more, as on the whole set);
- mAP@0.5 and mAP are recomputed on each resample of images (resampled_ap.py: equal to
  average_precision.py on the resampled image list); an image drawn twice counts its boxes twice.

The counts (invalid, total, dropped) and per_class have no interval. A resample where a metric is
undefined (mAP with no reference box drawn) is left out of that metric's interval.
"""
import zlib
from dataclasses import dataclass

import numpy as np

from ..captioning.bootstrap import interval, paired_block, resample_counts
from .resampled_ap import resampled_map


@dataclass
class Statistics:
    """One row's answers, per item: its point scores and what every resample needs, computed once."""
    scores: dict  # the point scores (score_split's metrics)
    ratios: dict  # name -> (numerators (N,), denominators (N,)): the metric is their sums' ratio (a mean: 1s)
    matches: dict | None  # detection: label -> average_precision.ClassMatches
    items: int
    references: int  # checksum of the references: a paired comparison needs the same

    def values(self, counts: np.ndarray) -> dict:
        """Every metric on every resample: counts (B, N), how often each item is drawn -> name -> (B,)."""
        counts = np.asarray(counts)
        out = resampled_map(self.matches, counts) if self.matches is not None else {}
        with np.errstate(invalid="ignore", divide="ignore"):
            for k, (num, den) in self.ratios.items():
                out[k] = counts @ np.asarray(num, dtype=np.float64) / (counts @ np.asarray(den, dtype=np.float64))
        return {k: v for k, v in out.items() if self.scores.get(k) is not None}


def statistics(scores: dict, ratios: dict, references, matches=None) -> Statistics:
    """A row's Statistics; references: its examples' reference texts (their checksum is kept)."""
    return Statistics(scores, ratios, matches, len(references), zlib.crc32(repr(references).encode()))


def _interval(samples: np.ndarray):
    kept = samples[~np.isnan(samples)]
    return interval(kept) if len(kept) else None


def intervals(s: Statistics, n: int = 1000, seed: int = 0) -> dict:
    """name -> [lo, hi], the 95 % percentile interval over n resamples of the items (bootstrap.py's draws)."""
    return {k: _interval(v) for k, v in s.values(resample_counts(s.items, n, seed)).items()}


def paired(a: Statistics, b: Statistics, n: int = 1000, seed: int = 0) -> dict:
    """B against A on the same resampled items: name -> {'difference', 'ci95', 'b_beats_a'} (bootstrap.paired's)."""
    if a.items != b.items or a.references != b.references:
        raise ValueError("a paired comparison needs the same items, in the same order, with the same references")
    counts = resample_counts(a.items, n, seed)
    va, vb = a.values(counts), b.values(counts)
    both = [k for k in va if k in vb]
    return paired_block({k: va[k] for k in both}, {k: vb[k] for k in both}, a.scores, b.scores, _interval)
