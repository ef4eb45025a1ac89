"""METEOR 1.5 as published captioning results run it: the jar pycocoevalcap ships, one JVM per evaluation.

pycocoevalcap starts `java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm` and talks to it over
stdin: `SCORE ||| ref 1 ||| ... ||| ref n ||| hypothesis` answers one line of 23 sufficient
statistics (the alignment against the best reference), and `EVAL ||| stats ||| stats ...` answers
one score per segment and then the corpus score. That corpus score is not a mean of segment scores:
the jar sums the statistics (matches per stage, lengths, chunks) and computes precision, recall and
the fragmentation penalty once, from the sums. `corpus_score` repeats that arithmetic in numpy, so a
bootstrap can re-aggregate resampled statistics without the JVM (tests check it against the jar).

The statistics line, as MeteorStats writes it (word counts for our -l en, not characters):
    0 test length  1 reference length  2 test function words  3 reference function words
    4 + 4s .. 7 + 4s: stage s (exact, stem, synonym, paraphrase) matches of test content words,
                      reference content words, test function words, reference function words
    20 chunks  21 test word matches  22 reference word matches
"""
import importlib.util
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

JAR = "meteor-1.5.jar"
PARAPHRASE = Path("data") / "paraphrase-en.gz"
ARGS = ["-Xmx2G", "-jar", JAR, "-", "-", "-stdio", "-l", "en", "-norm"]  # pycocoevalcap's, in java's order
# what the jar prints for these arguments (`Eval ID`, `Weights`, `Parameters` of its plain-text mode)
EVAL_ID = "meteor-1.5-wo-en-norm-0.85_0.2_0.6_0.75-ex_st_sy_pa-1.0_0.6_0.8_0.6"
ALPHA, BETA, GAMMA, DELTA = 0.85, 0.2, 0.6, 0.75  # F-mean weight, penalty exponent and scale, content weight
STAGE_WEIGHTS = np.array([1.0, 0.6, 0.8, 0.6])  # exact, stem, synonym, paraphrase
N_STATS = 23
NAME = f"Meteor 1.5 (pycocoevalcap's {JAR}, -l en -norm; {EVAL_ID})"
INSTALL = "pip install pycocoevalcap (or `pip install .[coco]`)"


def jar_folder() -> Path | None:
    """pycocoevalcap's meteor folder, found without importing the package (it is optional)."""
    spec = importlib.util.find_spec("pycocoevalcap")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "meteor").is_dir():
            return Path(root) / "meteor"
    return None


def unavailable(java: str = "java", folder: Path | None = None) -> str | None:
    """Why Java METEOR cannot run here, in one line, or None when it can (callers check this before
    hours of captioning). It does not start the JVM: `Meteor15()` reports a JVM that fails to start."""
    if shutil.which(java) is None:
        return f"Java METEOR needs a Java runtime: `{java}` is not on PATH (Debian: apt-get install default-jre-headless)"
    folder = folder or jar_folder()
    if folder is None:
        return f"Java METEOR needs pycocoevalcap's {JAR}: pycocoevalcap is not installed ({INSTALL})"
    for need in (folder / JAR, folder / PARAPHRASE):
        if not need.is_file():
            return f"Java METEOR needs {need}, which is missing (reinstall pycocoevalcap: {INSTALL})"
    return None


def available(java: str = "java", folder: Path | None = None) -> bool:
    return unavailable(java, folder) is None


def clean(text: str) -> str:
    """One caption as a protocol field: '|||' separates fields and a newline ends the request."""
    return " ".join(text.replace("|||", " ").split())


class Meteor15:
    """One JVM running the jar; `with Meteor15() as m: m.stats(hyps, refs)`. Every failure (no Java,
    no jar, a JVM that dies) is a RuntimeError naming what is missing, with the JVM's last words."""

    def __init__(self, java: str = "java", folder: Path | None = None):
        reason = unavailable(java, folder)
        if reason:
            raise RuntimeError(reason)
        self.command = [java] + ARGS
        self.log = tempfile.TemporaryFile()  # stderr: read only on failure, so it can never fill a pipe
        self.proc = subprocess.Popen(self.command, cwd=folder or jar_folder(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def _ask(self, lines: list[str], answers: int) -> list[str]:
        """Send every request, read `answers` lines. A thread writes while this one reads: the JVM
        answers as it goes, and a full stdout pipe would otherwise stop it reading stdin."""
        failed = []

        def write():
            try:
                for line in lines:
                    self.proc.stdin.write((line + "\n").encode("utf-8"))
                self.proc.stdin.flush()
            except OSError as e:  # the JVM died: the reader below says why
                failed.append(e)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        out = []
        for _ in range(answers):
            line = self.proc.stdout.readline()
            if not line:
                break
            out.append(line.decode("utf-8").strip())
        writer.join()
        if len(out) < answers:
            self.proc.kill()
            code = self.proc.wait()
            self.log.seek(0)
            tail = " | ".join(self.log.read().decode("utf-8", "replace").strip().splitlines()[-3:])
            raise RuntimeError(f"the METEOR JVM ({' '.join(self.command)}) stopped after {len(out)} of {answers} "
                               f"answers, exit code {code}: {tail or 'nothing on stderr'}")
        return out

    def stats(self, hyps: list[str], refs: list[list[str]]) -> np.ndarray:
        """Sufficient statistics per segment, (N, 23), as pycocoevalcap's _stat requests them."""
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
        lines = [" ||| ".join(["SCORE"] + [clean(r) for r in rs] + [clean(h)]) for h, rs in zip(hyps, refs)]
        rows = self._ask(lines, len(lines))
        table = np.zeros((len(rows), N_STATS))
        for i, (row, line) in enumerate(zip(rows, lines)):
            try:
                table[i] = [float(x) for x in row.split()]
            except ValueError:  # e.g. 'Error: specify hypothesis and at least one reference'
                raise RuntimeError(f"the METEOR JVM answered {row!r} to {line!r}, expected {N_STATS} numbers") from None
        return table

    def evaluate(self, stats: np.ndarray) -> tuple[list[float], float]:
        """The jar's own scores for rows of statistics: one per segment, then the corpus score."""
        line = "EVAL ||| " + " ||| ".join(" ".join(repr(float(x)) for x in row) for row in stats)
        out = self._ask([line], len(stats) + 1)
        return [float(x) for x in out[:-1]], float(out[-1])


def _perfect(stats: np.ndarray) -> np.ndarray:
    """Segments where every word matched in one chunk (the jar's `test = ref` case)."""
    test_matches = stats[..., 4:20:2].sum(-1)  # test content + function matches over the 4 stages
    ref_matches = stats[..., 5:20:2].sum(-1)
    return (test_matches == stats[..., 0]) & (ref_matches == stats[..., 1]) & (stats[..., 20] == 1)


def score(stats: np.ndarray) -> np.ndarray:
    """The jar's computeMetrics: METEOR from statistics, (..., 23) -> (...); segment or summed rows."""
    stats = np.asarray(stats, dtype=np.float64)
    stage = stats[..., 4:20].reshape(stats.shape[:-1] + (4, 4))  # (..., stage, [tc, rc, tf, rf])
    test_matched = stage[..., 0] @ STAGE_WEIGHTS * DELTA + stage[..., 2] @ STAGE_WEIGHTS * (1 - DELTA)
    ref_matched = stage[..., 1] @ STAGE_WEIGHTS * DELTA + stage[..., 3] @ STAGE_WEIGHTS * (1 - DELTA)
    test_len = DELTA * (stats[..., 0] - stats[..., 2]) + (1 - DELTA) * stats[..., 2]
    ref_len = DELTA * (stats[..., 1] - stats[..., 3]) + (1 - DELTA) * stats[..., 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision, recall = test_matched / test_len, ref_matched / ref_len
        f_mean = 1.0 / ((1 - ALPHA) / precision + ALPHA / recall)
        frag = np.where(_perfect(stats), 0.0, stats[..., 20] / ((stats[..., 21] + stats[..., 22]) / 2))
        s = f_mean * (1 - GAMMA * frag ** BETA)
    return np.where(np.isnan(s), 0.0, np.maximum(s, 0.0))  # the jar's catch of 0 / 0


def aggregable(stats: np.ndarray) -> np.ndarray:
    """Per-segment rows whose sum is the jar's corpus statistics: MeteorStats.addStats skips the
    chunk of a perfect segment, so a corpus of perfect segments still has no fragmentation."""
    stats = np.array(stats, dtype=np.float64)
    stats[_perfect(stats), 20] = 0.0
    return stats


def corpus_score(stats: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The jar's corpus METEOR from per-segment statistics (N, 23); with weights (B, N) (how often
    each segment is drawn), one corpus score per row (B,)."""
    rows = aggregable(stats)
    return score(rows.sum(0) if weights is None else weights @ rows)
