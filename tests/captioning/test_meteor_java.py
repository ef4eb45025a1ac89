"""Java METEOR 1.5 against pycocoevalcap's own Meteor wrapper (same jar, same input strings), our
re-aggregation against the jar's EVAL, a segment scored by hand, and every way the JVM can be missing."""
import os
import stat

import numpy as np
import pytest

from paligemma.captioning import bootstrap, meteor_java, metrics

from .test_bootstrap import resampled, with_edge_cases
from .test_metrics import caption_pairs

needs_java = pytest.mark.skipif(not meteor_java.available(), reason=f"Java METEOR cannot run here: "
                                f"{meteor_java.unavailable()}")
# `a plane on a runway` against `a red plane on the runway`, as the jar states it (one JVM run)
ONE = [5, 6, 3, 3, 2, 2, 2, 2] + [0] * 12 + [3, 4, 4]


@pytest.fixture(scope="module")
def jvm():
    with meteor_java.Meteor15() as m:  # one JVM for the module: starting one takes 10-30 s here
        yield m


def test_segment_score_by_hand():
    """5 test / 6 reference words, 3 function words each; exact matches: 2 content + 2 function words
    on each side, in 3 chunks. P = (2 x 0.75 + 2 x 0.25) / (2 x 0.75 + 3 x 0.25), R likewise over
    (3 x 0.75 + 3 x 0.25); F = 1 / (0.15 / P + 0.85 / R); penalty 0.6 (3 / 4)^0.2."""
    p, r = 2.0 / 2.25, 2.0 / 3.0
    f = 1 / (0.15 / p + 0.85 / r)
    expected = f * (1 - 0.6 * 0.75 ** 0.2)
    assert meteor_java.score(np.array(ONE)) == pytest.approx(expected, rel=1e-15)
    assert expected == pytest.approx(0.30029263599865547, rel=1e-15)  # the jar's plain-text mode printed this
    # a perfect segment has no fragmentation, and a corpus of them still has none (addStats skips its chunk)
    perfect = np.array([4, 4, 2, 2, 2, 2, 2, 2] + [0] * 12 + [1, 4, 4])
    assert meteor_java.score(perfect) == 1.0 and meteor_java.corpus_score(np.stack([perfect] * 3)) == 1.0


@needs_java
def test_java_meteor_equals_pycocoevalcap(jvm):
    """Both fed the strings our pipeline makes: metrics.tokenised_inputs (lower case, punctuation
    dropped, single spaces), which the jar's -norm tokenises again (a no-op on them); pycocoevalcap's
    COCOEvalCap feeds it the PTB tokenizer's output instead, which is close to this."""
    from pycocoevalcap.meteor.meteor import Meteor
    preds, refs = with_edge_cases(*caption_pairs(40, seed=6))
    preds["s"], refs["s"] = "an auto on the road", ["a car on the road"]  # WordNet synonyms in the jar
    h, r = metrics.tokenised_inputs(preds, refs)
    coco = Meteor()
    score, per_image = coco.compute_score(r, h)
    c = bootstrap.measure(preds, refs, meteor="java", jvm=jvm)
    assert bootstrap.scores(c)["METEOR"] == pytest.approx(score, rel=1e-12)
    assert meteor_java.score(c.meteor) == pytest.approx(per_image, rel=1e-12, abs=1e-15)
    assert meteor_java.corpus_score(c.meteor) != pytest.approx(np.mean(per_image), rel=1e-3)  # not a mean
    # resampled: our re-aggregation equals the jar's EVAL and pycocoevalcap on the resampled set
    draws = bootstrap.resample_draws(len(h), 3, seed=1)
    ours = bootstrap.values(c, bootstrap.resample_counts(len(h), 3, seed=1))["METEOR"]
    for b, d in enumerate(draws):
        assert ours[b] == pytest.approx(jvm.evaluate(c.meteor[d])[1], rel=1e-12)
    d = draws[0]
    assert ours[0] == pytest.approx(coco.compute_score(resampled(r, d), resampled(h, d))[0], rel=1e-12)


@needs_java
def test_paired_java_meteor_of_identical_predictions_is_zero(jvm):
    preds, refs = caption_pairs(30, seed=8)
    a, b = (bootstrap.measure(preds, refs, meteor="java", jvm=jvm) for _ in range(2))
    assert bootstrap.paired(a, b, n=100)["METEOR"] == {"difference": 0.0, "ci95": [0.0, 0.0], "b_beats_a": 0.0}


def test_missing_java_is_named(monkeypatch):
    reason = meteor_java.unavailable(java="no-such-java-here")
    assert "`no-such-java-here` is not on PATH" in reason and not meteor_java.available(java="no-such-java-here")
    with pytest.raises(RuntimeError, match="no-such-java-here"):
        meteor_java.Meteor15(java="no-such-java-here")
    monkeypatch.setattr(meteor_java, "unavailable", lambda *a, **k: "no Java here")
    with pytest.raises(RuntimeError, match="no Java here"):
        bootstrap.resolve_meteor("java")
    assert bootstrap.resolve_meteor("auto") == "nltk"


def test_missing_jar_or_paraphrases_are_named(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    java = fake_java(tmp_path / "bin", "exit 0")
    assert meteor_java.unavailable(java, tmp_path) == (f"Java METEOR needs {tmp_path / 'meteor-1.5.jar'}, which is "
                                                       "missing (reinstall pycocoevalcap: pip install pycocoevalcap "
                                                       "(or `pip install .[coco]`))")
    (tmp_path / "meteor-1.5.jar").write_bytes(b"")
    assert "data/paraphrase-en.gz, which is missing" in meteor_java.unavailable(java, tmp_path)
    monkeypatch.setattr(meteor_java, "jar_folder", lambda: None)
    assert "pycocoevalcap is not installed" in meteor_java.unavailable(java)


def fake_java(folder, script: str) -> str:
    """A `java` in folder that runs `script` instead of the jar."""
    exe = folder / "java"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


@pytest.mark.skipif(os.name != "posix", reason="fake java is a shell script")
@pytest.mark.parametrize("script, message", [
    ("echo 'Error: Could not reserve enough space for 2097152KB object heap' >&2; exit 1",
     r"stopped after 0 of 2 answers, exit code 1: Error: Could not reserve enough space"),
    ("read a; echo '" + " ".join(map(str, ONE)) + "'; echo 'java.lang.OutOfMemoryError' >&2; exit 3",
     r"stopped after 1 of 2 answers, exit code 3: java.lang.OutOfMemoryError"),
    ("read a; echo 'Error: specify hypothesis and at least one reference'; read b; echo x",
     r"answered 'Error: specify hypothesis and at least one reference' to 'SCORE \|\|\| a plane \|\|\| a plane'"),
])
def test_a_dying_jvm_is_a_clear_error(tmp_path, script, message):
    (tmp_path / "data").mkdir()
    for f in ("meteor-1.5.jar", "data/paraphrase-en.gz"):  # the files it checks for, empty
        (tmp_path / f).write_bytes(b"")
    with meteor_java.Meteor15(java=fake_java(tmp_path, script), folder=tmp_path) as m:
        with pytest.raises(RuntimeError, match=message):
            m.stats(["a plane", "two planes"], [["a plane"], ["planes"]])
