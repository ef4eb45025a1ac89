"""The scores of one evaluation (captions, or any task's rows), each with its 95 % interval; --compare's
paired block.

evaluate.py and train.py call this, so that both print the same table:

    with Scorer(choose_meteor("auto"), resamples=1000) as s:
        a = s.score("A", predictions_a, references)   # {"BLEU-1": .., "CIDEr-D": .., "ci95": {..}}
        b = s.score("B", predictions_b, references)
        s.add_paired(rows := {"A": a, "B": b})        # B gains "paired": B - A on the same images
    print(table(rows))

A task row (detection, VQA, OCR, segmentation) comes as tasks/evaluation.measure_split's statistics:
`s.score_task("A", statistics)`, resampled with the same draws (tasks/resampling.py).

The METEOR implementation is chosen once, before any caption is made (asking for Java where it
cannot run fails then, not after hours of captioning); one JVM serves every row (it takes ~20 s to
load its paraphrase table); each row's per-image statistics are kept so that a paired comparison
resamples A and B on the same images (bootstrap.py says how every metric is resampled).
"""
from . import bootstrap, meteor_java, wordnet

SEED = 0  # the bootstrap's: fixed, so two evaluations of one model resample the same images


def choose_meteor(choice: str, wordnet_available: bool | None = None) -> tuple[str | None, str | None]:
    """--meteor java / nltk / auto -> (implementation or None, why it is left out or None).
    auto: the jar where Java and pycocoevalcap are here, else nltk; nltk needs WordNet, without it
    METEOR is left out and said. java where it cannot run: a ValueError saying what is missing."""
    if choice not in ("java", "nltk", "auto"):
        raise ValueError(f"--meteor: expected 'java', 'nltk' or 'auto', got {choice!r}")
    if choice != "nltk":
        reason = meteor_java.unavailable()
        if reason is None:
            return "java", None
        if choice == "java":
            raise ValueError(f"--meteor java: {reason}")
    if wordnet.available() if wordnet_available is None else wordnet_available:
        return "nltk", None
    return None, "no WordNet"


class Scorer:
    """Scores rows of one evaluation; resamples 0: the corpus values only (no "ci95")."""

    def __init__(self, meteor: str | None, resamples: int = 1000, seed: int = SEED):
        if resamples < 0:
            raise ValueError(f"resamples: expected 0 (no intervals) or more, got {resamples}")
        self.meteor, self.resamples, self.seed = meteor, resamples, seed
        self.corpora = {}  # row name -> bootstrap.Corpus
        self._jvm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._jvm is not None:
            self._jvm.close()
            self._jvm = None

    def score(self, name: str, predictions: dict, references: dict) -> dict:
        """predictions: image -> caption; references: image -> [captions] -> metric -> value, and
        "ci95": metric -> [lo, hi] when resampling."""
        if self.meteor == "java" and self._jvm is None:
            self._jvm = meteor_java.Meteor15()
        corpus = bootstrap.measure(predictions, references, self.meteor, self._jvm)
        self.corpora[name] = corpus
        out = bootstrap.scores(corpus)
        if self.resamples:
            out["ci95"] = bootstrap.intervals(corpus, self.resamples, self.seed)
        return out

    def score_task(self, name: str, statistics) -> dict:
        """A task row (tasks/resampling.py's Statistics, from evaluation.measure_split) -> its scores, and
        "ci95": metric -> [lo, hi] when resampling (the captions' draws); kept for a paired comparison."""
        from ..tasks import resampling
        self.corpora[name] = statistics
        out = dict(statistics.scores)
        if self.resamples:
            out["ci95"] = resampling.intervals(statistics, self.resamples, self.seed)
        return out

    def paired(self, a: str, b: str) -> dict:
        """Row b against row a: "against": a, and per metric B - A, its interval and the share of
        resamples where B scores higher (bootstrap.paired; resampling.paired for task rows)."""
        from ..tasks import resampling
        if not self.resamples:
            raise ValueError("a paired comparison needs resamples (--bootstrap above 0)")
        ca, cb = self.corpora[a], self.corpora[b]
        compare = bootstrap.paired if isinstance(ca, bootstrap.Corpus) else resampling.paired
        return {"against": a, **compare(ca, cb, self.resamples, self.seed)}

    def add_paired(self, rows: dict):
        """--compare: the second row gains "paired" (against the first) when resampling."""
        if len(rows) == 2 and self.resamples:
            a, b = rows
            rows[b]["paired"] = self.paired(a, b)

    def protocol(self, task: str = "caption") -> dict:
        """What metrics.json says about these scores (a task set's: no METEOR, its own resampling)."""
        if not self.resamples:
            ci95 = "not computed (--bootstrap 0)"
        elif task == "caption":
            ci95 = (f"percentile bootstrap over images, {self.resamples} resamples, seed {self.seed}; corpus "
                    "metrics (BLEU, CIDEr-D's document frequencies, the jar's METEOR) recomputed per resample; "
                    "--compare: paired (the same images for A and B)")
        else:
            ci95 = (f"percentile bootstrap over images, {self.resamples} resamples, seed {self.seed} (the captions' "
                    "draws); means of per-item scores resampled, CER as sum(edits) / sum(characters), mAP "
                    "recomputed per resample (an image drawn twice counts its boxes twice); --compare: paired")
        return dict(ci95=ci95) if task != "caption" else dict(meteor=bootstrap.meteor_name(self.meteor), ci95=ci95)


def cell(value, ci: list | None = None) -> str:
    """0.6839 [0.5163, 0.8885]; a count as it is, None as n/a."""
    if value is None or isinstance(value, int):
        return "n/a" if value is None else str(value)
    return f"{value:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def table(rows: dict, left_out: dict | None = None) -> str:
    """Markdown table: rows name -> score() (+ "paired"), any task's; `left_out`: metric -> why it is
    missing. Intervals in brackets; a paired row shows B - A [its interval] and P(B > A). Only numbers
    are columns (per_class, health are in metrics.json)."""
    skip = {"health", "ci95", "paired"}
    names = [k for k, v in next(iter(rows.values())).items() if k not in skip and (v is None or
             isinstance(v, (int, float)))] + [k for k in left_out or {}]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, r in rows.items():
        ci = r.get("ci95", {})
        lines.append(f"| {label} | " + " | ".join(cell(r[n], ci.get(n)) if n in r else f"left out ({left_out[n]})"
                                                  for n in names) + " |")
        if "paired" in r:
            p = r["paired"]
            lines.append(f"| {label.split(':')[0]} - {p['against'].split(':')[0]}, paired | " + " | ".join(
                f"{p[n]['difference']:+.4f} [{p[n]['ci95'][0]:+.4f}, {p[n]['ci95'][1]:+.4f}], "
                f"beats in {100 * p[n]['b_beats_a']:.1f} %" if n in p and p[n]["ci95"] else "" for n in names) + " |")
    return "\n".join(lines)
