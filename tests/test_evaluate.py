"""evaluate.py end to end: its files, its metrics against pycocoevalcap, --compare, protocols, bad input."""
import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import evaluate
from paligemma.captioning.data import DataError, load_examples
from paligemma.captioning.metrics import tokenize


@pytest.fixture(autouse=True)
def no_java(request, monkeypatch):
    """--meteor auto falls back to nltk here: the JVM takes ~20 s to start, once per evaluate.main; the
    tests that take the `real_java` fixture run the jar."""
    if "real_java" not in request.fixturenames:
        from paligemma.captioning import meteor_java
        monkeypatch.setattr(meteor_java, "unavailable", lambda *a, **k: "Java METEOR: off in tests/test_evaluate.py")


@pytest.fixture
def real_java():
    from paligemma.captioning import meteor_java
    if not meteor_java.available():
        pytest.skip(f"Java METEOR cannot run here: {meteor_java.unavailable()}")


def without_paired(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "paired"}


def run(model, data, out, *extra):
    return evaluate.main(["--model", model, "--data", data, "--out", str(out), "--split", "test",
                          "--batch-size", "3", "--max-new-tokens", "8", *extra])


def read_jsonl(path):
    return [json.loads(l) for l in open(path)]


def test_outputs_are_the_models_batched_captions(tiny_run, tmp_path):
    from paligemma import PaliGemma
    from paligemma.processor import Processor
    model, data = tiny_run
    results = run(model, data, tmp_path / "e", "--max-samples", "7")  # 3 + 3 + 1: a ragged last batch
    rows = read_jsonl(tmp_path / "e" / "predictions.jsonl")
    examples, _ = load_examples(data, "test")
    assert [r["image"] for r in rows] == [str(e.image) for e in examples[:7]]
    assert all(r["references"] == e.captions and r["prompt"] == "caption en" for r, e in zip(rows, examples))
    # each prediction is what the model says for that image alone
    m, proc = PaliGemma.from_pretrained(model).eval(), Processor.from_pretrained(model)
    for r, e in zip(rows, examples[:7]):
        alone = proc.batch_decode(m.generate(**proc([e.image], "caption en"), max_new_tokens=8))[0]
        assert r["prediction"] == alone
    with open(tmp_path / "e" / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["prediction"] for t in table] == [r["prediction"] for r in rows]
    assert [t["caption_5"] for t in table] == [e.captions[4] for e in examples[:7]]
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert saved["protocol"]["images"] == 7 and saved["protocol"]["references"] == "all"
    name = next(k for k in saved if k != "protocol")
    assert saved[name] == results[name]  # JSON round-trips floats exactly
    assert set(saved[name]) >= {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "health"}
    assert set(saved[name]["health"]) >= {"empty", "repeated_token_3plus", "distinct_1", "distinct_2", "mean_length"}


def write_predictions(path, examples, rng, fmt="jsonl"):
    """Perturbed references: scores well above zero and below one."""
    preds = []
    for e in examples:
        words = tokenize(rng.choice(e.captions[1:]))
        words[rng.randrange(len(words))] = rng.choice(["plane", "lake", "the"])
        preds.append(" ".join(words[: max(2, len(words) - rng.randrange(3))]))
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"image": f"/elsewhere/{e.image.name}", "prediction": p}) + "\n"
                                for e, p in zip(examples, preds)))
    else:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "prediction"])
            w.writerows([e.image.name, p] for e, p in zip(examples, preds))
    return preds


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_scored_predictions_equal_pycocoevalcap(tiny_run, tmp_path, fmt):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    preds = write_predictions(tmp_path / f"p.{fmt}", examples, random.Random(1), fmt)
    result = evaluate.main(["--predictions", str(tmp_path / f"p.{fmt}"), "--data", data, "--split", "val",
                            "--out", str(tmp_path / "e")])
    ours = next(iter(result.values()))
    hyps = {str(i): [" ".join(tokenize(p))] for i, p in enumerate(preds)}
    refs = {str(i): [" ".join(tokenize(c)) for c in e.captions] for i, e in enumerate(examples)}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    assert [round(ours[f"BLEU-{n}"], 4) for n in range(1, 5)] == [round(b, 4) for b in bleu]
    assert round(ours["ROUGE-L"], 4) == round(Rouge().compute_score(refs, hyps)[0], 4)
    assert round(ours["CIDEr-D"], 4) == round(Cider().compute_score(refs, hyps)[0], 4)
    assert 0.1 < ours["BLEU-4"] < 0.95


def test_references_first_is_the_single_reference_protocol(tiny_run, tmp_path):
    """Predictions equal to caption_2 are perfect against all references, not against caption_1 alone."""
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    examples = [e for e in examples if tokenize(e.captions[0]) != tokenize(e.captions[1])]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": e.image.name, "prediction": e.captions[1]}) + "\n"
                                              for e in examples))
    subset = tmp_path / "subset.csv"  # only the images whose first two captions differ
    with open(data) as f, open(subset, "w", newline="") as g:
        reader = csv.DictReader(f)
        w = csv.DictWriter(g, reader.fieldnames)
        w.writeheader()
        keep = {e.image.name for e in examples}
        w.writerows(r for r in reader if r["split"] == "val" and r["image"] in keep)
    common = ["--predictions", str(tmp_path / "p.jsonl"), "--data", str(subset), "--split", "val"]
    (tmp_path / "images").symlink_to(load_examples(data, "val")[0][0].image.parent)
    every = next(iter(evaluate.main(common + ["--out", str(tmp_path / "all")]).values()))
    first = next(iter(evaluate.main(common + ["--out", str(tmp_path / "first"), "--references", "first"]).values()))
    assert every["BLEU-4"] == pytest.approx(1.0) and every["CIDEr-D"] > first["CIDEr-D"]
    assert first["BLEU-1"] < 1.0
    assert json.loads((tmp_path / "first" / "metrics.json").read_text())["protocol"]["references"] == "first"


def test_compare_base_and_adapter(tiny_run, tmp_path):
    import lora
    from paligemma import PaliGemma
    model, data = tiny_run
    m = PaliGemma.from_pretrained(model)
    lora.inject(m, "decoder", r=4, alpha=64)
    torch.manual_seed(0)
    for layer in lora.lora_layers(m).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # an adapter that changes the captions
    lora.save(m, tmp_path / "adapter")
    both = run(model, data, tmp_path / "c", "--compare", str(tmp_path / "adapter"), "--max-samples", "4")
    base = run(model, data, tmp_path / "b", "--max-samples", "4")
    tuned = run(model, data, tmp_path / "t", "--adapter", str(tmp_path / "adapter"), "--max-samples", "4")
    a, b = list(both)
    assert a.startswith("A: ") and b.startswith("B: ") and b.endswith("adapter")
    assert both[a] == next(iter(base.values())) and without_paired(both[b]) == next(iter(tuned.values()))
    rows = read_jsonl(tmp_path / "c" / "predictions.jsonl")
    assert [r["model"] for r in rows] == [a] * 4 + [b] * 4
    assert [r["prediction"] for r in rows[:4]] != [r["prediction"] for r in rows[4:]]
    # the compare run's predictions.jsonl scored again: its two models as two rows, B paired against A, as the run did
    saved = tmp_path / "c" / "predictions.jsonl"
    again = evaluate.main(["--predictions", str(saved), "--data", data, "--out", str(tmp_path / "r"), "--split", "test",
                           "--max-samples", "4"])
    assert list(again) == [f"{a} (predictions: {saved})", f"{b} (predictions: {saved})"]
    named = lambda r: {k: {**v, "against": None} if k == "paired" else v for k, v in r.items()}  # noqa: E731 (the row names differ)
    assert [named(r) for r in again.values()] == [named(both[a]), named(both[b])] and "paired" in both[b]
    assert again[f"{b} (predictions: {saved})"]["paired"]["against"] == f"{a} (predictions: {saved})"
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if i != 5 or k != "model"})
                                                  + "\n" for i, r in enumerate(rows)))
    from paligemma.captioning.data import DataError
    with pytest.raises(DataError, match=r"mixed\.jsonl:6: no 'model' field, which other rows have"):
        evaluate.main(["--predictions", str(tmp_path / "mixed.jsonl"), "--data", data, "--out", str(tmp_path / "m"),
                       "--split", "test", "--max-samples", "4"])


def test_existing_output_is_never_overwritten(tiny_run, tmp_path):
    model, data = tiny_run
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.json").write_text("mine")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run(model, data, tmp_path / "e", "--max-samples", "2")
    assert (tmp_path / "e" / "metrics.json").read_text() == "mine"
    run(model, data, tmp_path / "e", "--max-samples", "2", "--overwrite")
    assert "BLEU-4" in (tmp_path / "e" / "metrics.json").read_text()
    assert not [p for p in (tmp_path / "e").iterdir() if p.name.startswith(".")]  # no temp files left


def test_bad_input_is_named(tiny_run, tmp_path):
    model, data = tiny_run
    examples, _ = load_examples(data, "val")
    rng = random.Random(0)
    write_predictions(tmp_path / "p.jsonl", examples[:-1], rng)
    with pytest.raises(DataError, match=rf"p.jsonl: .*1 without a prediction .*{examples[-1].image.name}"):
        evaluate.main(["--predictions", str(tmp_path / "p.jsonl"), "--data", data, "--split", "val",
                       "--out", str(tmp_path / "e")])
    write_predictions(tmp_path / "q.jsonl", examples + load_examples(data, "test")[0][:1], rng)
    with pytest.raises(DataError, match=r"q.jsonl: .*1 not in the split"):
        evaluate.main(["--predictions", str(tmp_path / "q.jsonl"), "--data", data, "--split", "val",
                       "--out", str(tmp_path / "e")])
    (tmp_path / "r.jsonl").write_text(json.dumps({"img": "x.png", "caption": "a"}) + "\n")
    with pytest.raises(DataError, match=r"r.jsonl:1: expected an 'image' and a 'prediction' field"):
        evaluate.main(["--predictions", str(tmp_path / "r.jsonl"), "--data", data, "--split", "val",
                       "--out", str(tmp_path / "e")])
    with pytest.raises(DataError, match="no examples in split 'tset'"):
        run(model, data, tmp_path / "e", "--split", "tset")
    broken = tmp_path / "broken"
    shutil.copytree(examples[0].image.parent.parent, broken)
    (broken / examples[1].image.parent.name / examples[1].image.name).unlink()
    with pytest.raises(DataError, match=rf"captions.csv:\d+: image file .*{examples[1].image.name} not found"):
        run(model, str(broken / "captions.csv"), tmp_path / "e", "--split", "val")
    assert not (tmp_path / "e").exists()  # nothing written for a failed run


def test_command_line_errors_are_one_line(tiny_run, tmp_path):
    import subprocess
    import sys
    _, data = tiny_run
    p = subprocess.run([sys.executable, "evaluate.py", "--predictions", str(tmp_path / "none.jsonl"), "--data", data,
                        "--out", str(tmp_path / "e")], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 1 and p.stderr.strip() == f"evaluate.py: {tmp_path / 'none.jsonl'}: predictions file not found"


def test_faulty_prediction_files_name_file_and_line(tiny_run, tmp_path):
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    lines = [json.dumps({"image": e.image.name, "prediction": "a lake"}) for e in examples]
    cases = {"broken": (lines[:2] + ['{"image": "x.png", "prediction": '] + lines[2:], r"broken.jsonl:3: not JSON"),
             "twice": (lines + [lines[4]], rf"twice.jsonl:{len(lines) + 1}: a second prediction for "
                                           rf"{examples[4].image.name} \(the first is on line 5\)"),
             "number": (lines[:1] + [json.dumps({"image": "y.png", "prediction": 3})], r"number.jsonl:2: 'prediction' is int"),
             "null": (lines[:3] + [json.dumps({"image": examples[3].image.name, "prediction": None})] + lines[4:],
                      r"null.jsonl:4: 'prediction' is empty \(null, or a CSV row cut short\)")}
    for name, (rows, message) in cases.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
        with pytest.raises(DataError, match=message):
            evaluate.main(["--predictions", str(tmp_path / f"{name}.jsonl"), "--data", data, "--split", "val",
                           "--out", str(tmp_path / "e")])


def test_a_csv_row_cut_short_is_named_not_scored_as_empty(tiny_run, tmp_path):
    """Every image of the split has a row, but line 3 ends after its image (a file cut off): its missing
    prediction cell is refused by line and field, never scored as an empty caption."""
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    rows = [f"{e.image.name},a lake" for e in examples]
    rows[1] = examples[1].image.name
    (tmp_path / "p.csv").write_text("image,prediction\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"p\.csv:3: 'prediction' is empty \(null, or a CSV row cut short\)"):
        evaluate.main(["--predictions", str(tmp_path / "p.csv"), "--data", data, "--split", "val",
                       "--out", str(tmp_path / "e")])


def test_skip_bad_is_accepted_and_reported(tiny_run, tmp_path):
    """The missing-image message suggests --skip-bad: evaluate.py takes it and records what it skipped."""
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    broken = tmp_path / "broken"
    shutil.copytree(examples[0].image.parent.parent, broken)
    (broken / examples[1].image.parent.name / examples[1].image.name).unlink()
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": e.image.name, "prediction": e.captions[0]}) + "\n"
                                              for e in examples if e is not examples[1]))
    evaluate.main(["--predictions", str(tmp_path / "p.jsonl"), "--data", str(broken / "captions.csv"), "--split", "val",
                   "--out", str(tmp_path / "e"), "--skip-bad"])
    protocol = json.loads((tmp_path / "e" / "metrics.json").read_text())["protocol"]
    assert protocol["images"] == len(examples) - 1
    assert len(protocol["skipped"]) == 1 and f"{examples[1].image.name} not found" in protocol["skipped"][0]


def test_file_without_splits_needs_split_all(tiny_run, tmp_path):
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    with open(data) as f, open(tmp_path / "nosplit.csv", "w", newline="") as g:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
        w = csv.DictWriter(g, [k for k in rows[0] if k != "split"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "images").symlink_to(examples[0].image.parent)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": e.image.name, "prediction": "a"}) + "\n"
                                              for e in examples))
    common = ["--predictions", str(tmp_path / "p.jsonl"), "--data", str(tmp_path / "nosplit.csv")]
    with pytest.raises(DataError, match="no 'split' column, so there is no split 'test'"):
        evaluate.main(common + ["--out", str(tmp_path / "e")])
    evaluate.main(common + ["--out", str(tmp_path / "e"), "--split", "all"])
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["protocol"]["images"] == len(examples)


@pytest.mark.parametrize("flag, value", [("--max-samples", "-1"), ("--max-samples", "0"), ("--batch-size", "0"),
                                         ("--num-beams", "0"), ("--top-p", "0"), ("--temperature", "0"),
                                         ("--top-p", "nan"), ("--temperature", "nan"), ("--temperature", "inf")])
def test_bad_numbers_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--model", "m", "--data", "d", "--out", "o", flag, value])
    assert e.value.code == 2 and f"argument {flag}: expected " in capsys.readouterr().err


# --- issue #27: check before the first caption, keep every caption made, resume, never a mixed set ---

@pytest.fixture
def generations(monkeypatch):
    """Counts PaliGemma.generate calls (batches captioned); fail_at: the call number that raises."""
    from paligemma import PaliGemma
    real, state = PaliGemma.generate, {"calls": 0, "fail_at": None}

    def counted(self, *a, **k):
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise RuntimeError("simulated failure while captioning")
        return real(self, *a, **k)
    monkeypatch.setattr(PaliGemma, "generate", counted)
    return state


def finished(out):
    return {n: (out / n).read_bytes() for n in ("predictions.jsonl", "predictions.csv", "metrics.json")}


def adapter_of(model, folder):
    import lora
    from paligemma import PaliGemma
    m = PaliGemma.from_pretrained(model)
    lora.inject(m, "decoder", r=4, alpha=64)
    torch.manual_seed(0)
    for layer in lora.lora_layers(m).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    lora.save(m, folder)
    return folder


def test_every_model_of_compare_is_checked_before_the_first_caption(tiny_run, tmp_path, generations):
    model, data = tiny_run
    with pytest.raises(ValueError, match=f"{tmp_path / 'nowhere'}: not a checkpoint folder"):
        run(model, data, tmp_path / "e", "--compare", str(tmp_path / "nowhere"))
    broken = adapter_of(model, tmp_path / "adapter")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(Exception, match="adapter_model.safetensors"):
        run(model, data, tmp_path / "e", "--compare", str(broken))
    truncated = tmp_path / "model"
    shutil.copytree(model, truncated)
    (truncated / "model.safetensors").write_bytes((Path(model) / "model.safetensors").read_bytes()[:50000])
    with pytest.raises(ValueError, match=r"model/model.safetensors: .*truncated"):
        run(model, data, tmp_path / "e", "--compare", str(truncated))
    assert generations["calls"] == 0 and not (tmp_path / "e").exists()


def test_a_later_model_failing_keeps_the_first_models_captions_and_resume_makes_only_the_rest(
        tiny_run, tmp_path, generations, monkeypatch, capsys):
    model, data = tiny_run
    adapter = adapter_of(model, tmp_path / "adapter")
    args = ("--compare", str(adapter), "--max-samples", "6")
    run(model, data, tmp_path / "clean", *args)
    clean_calls, generations["calls"] = generations["calls"], 0
    real = evaluate.load_for_inference

    def b_fails(model_name, adapter, *a):
        if adapter:
            raise OSError("simulated: the second model's disk went away")
        return real(model_name, adapter, *a)
    monkeypatch.setattr(evaluate, "load_for_inference", b_fails)
    with pytest.raises(OSError, match="simulated"):
        run(model, data, tmp_path / "e", *args)
    assert "captions made so far are kept in" in capsys.readouterr().err
    kept = [json.loads(l) for l in open(tmp_path / "e" / ".partial" / "captions.jsonl")]
    assert len(kept) == 6 and {r["model"] for r in kept} == {f"A: {model}"}
    monkeypatch.setattr(evaluate, "load_for_inference", real)
    generations["calls"] = 0
    with pytest.raises(evaluate.store.ResultsError, match="pass --resume to continue it"):
        run(model, data, tmp_path / "e", *args)
    run(model, data, tmp_path / "e", *args, "--resume")
    assert generations["calls"] == clean_calls // 2  # only model B's batches
    assert finished(tmp_path / "e") == finished(tmp_path / "clean")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["metrics.json", "predictions.csv", "predictions.jsonl"]


def test_scoring_failure_loses_no_caption(tiny_run, tmp_path, monkeypatch):
    model, data = tiny_run
    run(model, data, tmp_path / "clean", "--max-samples", "5")
    real = evaluate.Scorer.score
    monkeypatch.setattr(evaluate.Scorer, "score", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(model, data, tmp_path / "e", "--max-samples", "5")
    monkeypatch.setattr(evaluate.Scorer, "score", real)  # not undo(): the no_java fixture's patch stays
    from paligemma import PaliGemma
    monkeypatch.setattr(PaliGemma, "generate", lambda *a, **k: 1 / 0)  # resuming must caption nothing
    run(model, data, tmp_path / "e", "--max-samples", "5", "--resume")
    assert finished(tmp_path / "e") == finished(tmp_path / "clean")


def test_a_kill_mid_run_and_a_half_written_line_are_recovered(tiny_run, tmp_path, generations, capsys):
    """Batch 3 (of 3 + 3 + 2 images... at batch size 3) fails; a half line as a kill leaves it is added;
    --resume drops it, keeps the two whole batches, and makes what an uninterrupted run makes, also
    when sampling (each batch keeps its seed)."""
    model, data = tiny_run
    sampling = ("--do-sample", "--temperature", "1.5", "--seed", "3")
    run(model, data, tmp_path / "clean", *sampling)
    generations.update(calls=0, fail_at=3)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(model, data, tmp_path / "e", *sampling)
    log = tmp_path / "e" / ".partial" / "captions.jsonl"
    assert len(log.read_text().splitlines()) == 6
    with open(log, "a") as f:
        f.write('{"model": "A", "image": "x.png", "predi')
    generations.update(calls=0, fail_at=None)
    run(model, data, tmp_path / "e", *sampling, "--resume")
    assert "dropped a half-written last line" in capsys.readouterr().out
    assert generations["calls"] == 1
    assert finished(tmp_path / "e") == finished(tmp_path / "clean")


def test_resume_is_refused_by_name_when_it_would_mix_two_evaluations(tiny_run, tmp_path, generations):
    model, data = tiny_run
    with pytest.raises(evaluate.store.ResultsError, match="holds no unfinished evaluation .*nothing to resume"):
        run(model, data, tmp_path / "e", "--resume")
    generations["fail_at"] = 2
    with pytest.raises(RuntimeError):
        run(model, data, tmp_path / "e")
    with pytest.raises(evaluate.store.ResultsError, match=r"something else: max_new_tokens: 9 \(unfinished run: 8\)"):
        run(model, data, tmp_path / "e", "--resume", "--max-new-tokens", "9")
    generations["fail_at"] = None
    run(model, data, tmp_path / "e", "--resume")
    with pytest.raises(evaluate.store.ResultsError, match=r"its results are finished \(metrics.json\)"):
        run(model, data, tmp_path / "e", "--resume")


def test_overwrite_onto_a_full_disk_keeps_the_old_set_whole(tiny_run, tmp_path, monkeypatch):
    """The issue's mixed set: a new metrics.json beside the old predictions. The new set is written
    beside the old one and swapped in only when whole; a full disk while writing it leaves the old
    set byte for byte, and the new captions for --resume."""
    import errno
    import os
    model, data = tiny_run
    run(model, data, tmp_path / "e", "--max-samples", "2")
    old = finished(tmp_path / "e")
    real = evaluate.write_outputs

    def full(folder, *a):
        real(folder, *a)  # metrics.json, predictions.jsonl written; the CSV hits the full disk
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(evaluate, "write_outputs", full)
    with pytest.raises(OSError, match="No space left"):
        run(model, data, tmp_path / "e", "--max-samples", "4", "--overwrite")
    assert finished(tmp_path / "e") == old
    monkeypatch.undo()  # ... and with the failure inside atomic_file itself, named with the path
    from paligemma import atomic
    real_fsync = atomic.os.fsync

    def fsync(fd):
        if ".metrics.json." in os.readlink(f"/proc/self/fd/{fd}"):  # metrics.json's temp file: the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError, match=rf"no space left on device: {tmp_path / 'e' / '.partial' / 'metrics.json'}"):
        run(model, data, tmp_path / "e", "--max-samples", "4", "--overwrite")
    monkeypatch.undo()
    assert finished(tmp_path / "e") == old
    run(model, data, tmp_path / "e", "--max-samples", "4", "--resume")
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["protocol"]["images"] == 4


def test_unwritable_or_too_small_output_is_found_before_the_first_caption(tiny_run, tmp_path, generations,
                                                                         monkeypatch):
    from paligemma.captioning import results
    model, data = tiny_run
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="file"):
        run(model, data, tmp_path / "file" / "e")
    real = results.shutil.disk_usage
    monkeypatch.setattr(results.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OSError, match=r"e: about \d+\.\d MB needed .* 0.0 MB free: no space left on device"):
        run(model, data, tmp_path / "e")
    assert generations["calls"] == 0 and not (tmp_path / "e").exists()


def test_without_wordnet_meteor_is_left_out_and_said(tiny_run, tmp_path, monkeypatch, capsys):
    from paligemma.captioning import wordnet
    model, data = tiny_run
    monkeypatch.setattr(wordnet, "available", lambda: False)
    result = next(iter(run(model, data, tmp_path / "e", "--max-samples", "3").values()))  # auto: no Java, no WordNet
    assert "METEOR" not in result and "METEOR" not in result["ci95"] and {"BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(result)
    printed = capsys.readouterr()
    assert "left out (no WordNet)" in printed.out and "METEOR left out: METEOR needs WordNet" in printed.err
    protocol = json.loads((tmp_path / "e" / "metrics.json").read_text())["protocol"]
    assert protocol["meteor"].startswith("left out: no WordNet")


def test_skip_bad_skips_every_kind_of_bad_image(tiny_run, tmp_path):
    from tests.helpers import bad_images
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    broken = tmp_path / "broken"
    shutil.copytree(examples[0].image.parent.parent, broken)
    folder = broken / examples[0].image.parent.name
    for e, bad in zip(examples[1:4], bad_images(tmp_path / "bad").values()):
        shutil.copyfile(bad, folder / e.image.name)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": e.image.name, "prediction": e.captions[0]}) + "\n"
                                              for e in examples if e not in examples[1:4]))
    evaluate.main(["--predictions", str(tmp_path / "p.jsonl"), "--data", str(broken / "captions.csv"), "--split",
                   "val", "--out", str(tmp_path / "e"), "--skip-bad"])
    protocol = json.loads((tmp_path / "e" / "metrics.json").read_text())["protocol"]
    assert protocol["images"] == len(examples) - 3 and len(protocol["skipped"]) == 3
    assert all("is corrupt" in r for r in protocol["skipped"])



# --- issue #28: which reference --references first scores against, what each --compare row loads ---

def test_references_first_scores_against_caption_1_as_pycocoevalcap_does(tiny_run, tmp_path):
    """--references first equals pycocoevalcap given caption_1 alone as each image's reference."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    preds = write_predictions(tmp_path / "p.jsonl", examples, random.Random(2))
    result = evaluate.main(["--predictions", str(tmp_path / "p.jsonl"), "--data", data, "--split", "val",
                            "--out", str(tmp_path / "e"), "--references", "first"])
    ours = next(iter(result.values()))
    hyps = {str(i): [" ".join(tokenize(p))] for i, p in enumerate(preds)}
    refs = {str(i): [" ".join(tokenize(e.captions[0]))] for i, e in enumerate(examples)}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    assert [round(ours[f"BLEU-{n}"], 4) for n in range(1, 5)] == [round(b, 4) for b in bleu]
    assert round(ours["ROUGE-L"], 4) == round(Rouge().compute_score(refs, hyps)[0], 4)
    assert round(ours["CIDEr-D"], 4) == round(Cider().compute_score(refs, hyps)[0], 4)
    assert ours["BLEU-1"] > 0.1
    rows = read_jsonl(tmp_path / "e" / "predictions.jsonl")
    assert [r["references"] for r in rows] == [e.captions for e in examples]  # the file keeps all five


def test_compare_rows_by_hand(tmp_path):
    """--compare base: --model without the adapter; int8 / nf4: --model with the adapter, quantized; an
    adapter folder: on --model; anything else: another model, alone. --quantize applies to both rows."""
    (tmp_path / "other_adapter").mkdir()
    (tmp_path / "other_adapter" / "adapter_config.json").write_text("{}")
    other = str(tmp_path / "other_adapter")

    def rows(*extra):
        return evaluate.rows_to_run(evaluate.parse_args(["--model", "m", "--data", "d", "--out", "o", *extra]))
    assert rows() == {"model": ("m", None, None)}
    assert rows("--adapter", "a") == {"model": ("m", "a", None)}
    assert rows("--adapter", "a", "--compare", "base") == {"A": ("m", "a", None), "B": ("m", None, None)}
    assert rows("--adapter", "a", "--compare", "int8") == {"A": ("m", "a", None), "B": ("m", "a", "int8")}
    assert rows("--compare", "nf4") == {"A": ("m", None, None), "B": ("m", None, "nf4")}
    assert rows("--adapter", "a", "--compare", other) == {"A": ("m", "a", None), "B": ("m", other, None)}
    assert rows("--adapter", "a", "--compare", "m2") == {"A": ("m", "a", None), "B": ("m2", None, None)}
    assert rows("--quantize", "nf4", "--adapter", "a", "--compare", "base") == {"A": ("m", "a", "nf4"),
                                                                               "B": ("m", None, "nf4")}
    assert rows("--quantize", "int8", "--compare", other) == {"A": ("m", None, "int8"), "B": ("m", other, "int8")}


def test_compare_int8_keeps_the_adapter(tiny_run, tmp_path):
    """--adapter A --compare int8: row B is the adapted model quantized, the same captions as a run
    with --adapter A --quantize int8, and named so."""
    import lora
    from paligemma import PaliGemma
    model, data = tiny_run
    m = PaliGemma.from_pretrained(model)
    lora.inject(m, "decoder", r=4, alpha=64)
    torch.manual_seed(0)
    for layer in lora.lora_layers(m).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    adapter = str(tmp_path / "adapter")
    lora.save(m, adapter)
    both = run(model, data, tmp_path / "c", "--adapter", adapter, "--compare", "int8", "--max-samples", "3")
    alone = run(model, data, tmp_path / "q", "--adapter", adapter, "--quantize", "int8", "--max-samples", "3")
    assert list(both) == [f"A: {model} + {adapter}", f"B: {model} + {adapter} (int8)"]
    assert without_paired(both[f"B: {model} + {adapter} (int8)"]) == next(iter(alone.values()))
    rows = read_jsonl(tmp_path / "c" / "predictions.jsonl")
    assert [r["prediction"] for r in rows[3:]] == [r["prediction"] for r in read_jsonl(tmp_path / "q" / "predictions.jsonl")]


def test_an_existing_empty_output_folder_is_used(tiny_run, tmp_path):
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": e.image.name, "prediction": "a"}) + "\n"
                                              for e in examples))
    (tmp_path / "e").mkdir()
    evaluate.main(["--predictions", str(tmp_path / "p.jsonl"), "--data", data, "--split", "val", "--out", str(tmp_path / "e")])
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["metrics.json", "predictions.csv", "predictions.jsonl"]


def test_prediction_csv_lines_are_counted_across_quoted_newlines(tiny_run, tmp_path):
    """A prediction over two lines (a model may emit a newline; predictions.csv quotes it): the next
    rows' errors still name the line they start on. Hand-counted: 1 header, 2-3 first image, 4 second,
    5 blank, 6 the first image again."""
    _, data = tiny_run
    examples, _ = load_examples(data, "val")
    a, b = examples[0].image.name, examples[1].image.name
    (tmp_path / "p.csv").write_text(f'image,prediction\n{a},"a lake\nand a road"\n{b},a field\n\n{a},again\n')
    with pytest.raises(DataError, match=rf"p.csv:6: a second prediction for {a} \(the first is on line 2\)"):
        evaluate.main(["--predictions", str(tmp_path / "p.csv"), "--data", data, "--split", "val",
                       "--out", str(tmp_path / "e")])


METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]


def scored_predictions(data, tmp_path, seed=2):
    """16 validation images with perturbed references as predictions, the flags that score them, and
    the scorers' inputs (image -> prediction, image -> references) as evaluate.py builds them."""
    examples, _ = load_examples(data, "val")
    preds = write_predictions(tmp_path / "p.jsonl", examples, random.Random(seed))
    common = ["--predictions", str(tmp_path / "p.jsonl"), "--data", data, "--split", "val"]
    return common, {str(e.image): p for e, p in zip(examples, preds)}, {str(e.image): e.captions for e in examples}


def test_intervals_are_the_bootstrap_of_the_scored_captions(tiny_run, tmp_path, capsys):
    """--bootstrap N: every metric's ci95 in metrics.json and in the printed table, the percentile
    bootstrap of these captions (bootstrap.py, seed 0); --bootstrap 0: the same values, no intervals."""
    from paligemma.captioning import bootstrap
    _, data = tiny_run
    common, preds, refs = scored_predictions(data, tmp_path)
    row = next(iter(evaluate.main(common + ["--out", str(tmp_path / "e"), "--bootstrap", "300"]).values()))
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert saved[next(k for k in saved if k != "protocol")]["ci95"] == row["ci95"]
    expected = bootstrap.intervals(bootstrap.measure(preds, refs, meteor="nltk"), n=300, seed=0)
    assert list(row["ci95"]) == METRICS and row["ci95"] == expected
    assert all(lo < hi for lo, hi in row["ci95"].values())  # 16 different images: never a point
    printed = capsys.readouterr().out
    for k in METRICS:
        assert f"{row[k]:.4f} [{row['ci95'][k][0]:.4f}, {row['ci95'][k][1]:.4f}]" in printed
    assert saved["protocol"]["meteor"].startswith("nltk meteor_score")  # auto without Java: named
    assert "300 resamples, seed 0" in saved["protocol"]["ci95"]
    off = next(iter(evaluate.main(common + ["--out", str(tmp_path / "o"), "--bootstrap", "0"]).values()))
    assert off == {k: v for k, v in row.items() if k != "ci95"}
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["protocol"]["ci95"].startswith("not computed")
    assert "[" not in capsys.readouterr().out.split("output health")[0]


def test_compare_rows_gain_the_paired_bootstrap(tiny_run, tmp_path, capsys):
    """--compare base on a model without adapter: identical captions, so B - A is exactly 0 with the
    interval [0, 0] on every metric and B never beats A; the block is bootstrap.paired of the rows'
    captions, and the table prints it."""
    from paligemma.captioning import bootstrap
    model, data = tiny_run
    both = run(model, data, tmp_path / "c", "--compare", "base", "--max-samples", "5", "--bootstrap", "200")
    a, b = both
    assert "paired" not in both[a] and both[b]["paired"]["against"] == a
    assert list(both[b]["paired"])[1:] == METRICS
    for k in METRICS:
        assert both[b]["paired"][k] == {"difference": 0.0, "ci95": [0.0, 0.0], "b_beats_a": 0.0}, k
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())[b]["paired"] == both[b]["paired"]
    assert "| B - A, paired | +0.0000 [+0.0000, +0.0000], beats in 0.0 % |" in capsys.readouterr().out
    # two different rows: the block is the paired bootstrap of their captions
    rows = read_jsonl(tmp_path / "c" / "predictions.jsonl")
    refs = {r["image"]: r["references"] for r in rows}
    corpus = [bootstrap.measure({r["image"]: r["prediction"] for r in rows if r["model"] == m}, refs, meteor="nltk")
              for m in (a, b)]
    assert bootstrap.paired(*corpus, n=200, seed=0) == {k: v for k, v in both[b]["paired"].items() if k != "against"}


def test_meteor_java_where_java_is_missing_is_refused_before_any_caption(tiny_run, tmp_path, generations):
    model, data = tiny_run
    with pytest.raises(ValueError, match="--meteor java: Java METEOR: off in tests/test_evaluate.py"):
        run(model, data, tmp_path / "e", "--meteor", "java")
    assert generations["calls"] == 0 and not (tmp_path / "e").exists()


def test_meteor_java_is_pycocoevalcaps_and_named(tiny_run, tmp_path, real_java):
    """--meteor auto, where Java is here: the jar's METEOR, equal to pycocoevalcap's Meteor().compute_score
    on the same (tokenised) captions, with an interval, and the protocol names Meteor 1.5."""
    from pycocoevalcap.meteor.meteor import Meteor
    _, data = tiny_run
    common, preds, refs = scored_predictions(data, tmp_path, seed=3)
    row = next(iter(evaluate.main(common + ["--out", str(tmp_path / "e"), "--bootstrap", "100"]).values()))
    from paligemma.captioning.metrics import tokenised_inputs
    h, r = tokenised_inputs(preds, refs)
    assert row["METEOR"] == pytest.approx(Meteor().compute_score(r, h)[0], rel=1e-12)
    assert row["ci95"]["METEOR"][0] < row["ci95"]["METEOR"][1]
    protocol = json.loads((tmp_path / "e" / "metrics.json").read_text())["protocol"]
    assert protocol["meteor"].startswith("Meteor 1.5 (pycocoevalcap's meteor-1.5.jar")
