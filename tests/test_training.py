"""train.py end to end on a tiny synthetic set: resume, logs, torchrun, OUT/best, early stopping, and
what it does with faults and bad input. (Its pieces: tests/captioning/test_training.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import Crash, crash_after

ROOT = Path(__file__).resolve().parents[1]


def train_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--batch-size", "8", "--eval-every", "4",
            "--eval-samples", "4", "--save-every", "3", "--lr", "1e-3", "--warmup", "2", "--val-captions", "4", *extra]


@pytest.mark.parametrize("mode", [["--finetune", "full"], ["--finetune", "lora", "--lora", "all", "--lora-r", "4"]])
def test_resume_equals_uninterrupted(tiny_run, tmp_path, mode):
    import train
    model, data = tiny_run
    a = train.main(train_args(model, data, tmp_path / "a", "--steps", "6", *mode))
    with crash_after(train, 3), pytest.raises(Crash):
        train.main(train_args(model, data, tmp_path / "b", "--steps", "6", *mode))
    b = train.main(train_args(model, data, tmp_path / "b", "--steps", "6", "--resume", *mode))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    trained = [k for k in sa if (".lora_B" in k) or mode[1] == "full"]
    assert trained


def test_loss_falls_and_is_logged(tiny_run, tmp_path):
    import train
    model, data = tiny_run
    train.main(train_args(model, data, tmp_path, "--steps", "12", "--finetune", "full"))
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    evals = [r for r in records if "image_gap" in r]
    assert [r["step"] for r in evals] == [4, 8, 12] and all("val_CIDEr-D" in r and "val_BLEU-4" in r for r in evals)
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "final" / "tokenizer.model").exists()
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    scores = [r["val_CIDEr-D"] for r in evals]
    assert best["step"] == evals[scores.index(max(scores))]["step"] == records[-1]["best_step"]
    assert (tmp_path / "best" / "model.safetensors").exists() and (tmp_path / "best" / "tokenizer.model").exists()


def test_non_finite_loss_stops_with_step(tiny_run, tmp_path, monkeypatch):
    import train
    from paligemma import PaliGemma
    model, data = tiny_run
    original = PaliGemma.loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        loss = original(self, *a, **k)
        return loss * float("nan") if calls["n"] == 5 else loss
    monkeypatch.setattr(PaliGemma, "loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 4: non-finite loss"):
        train.main(train_args(model, data, tmp_path, "--steps", "8", "--finetune", "full", "--eval-every", "100"))
    assert (tmp_path / "checkpoint" / "state.pt").exists()  # the step-3 checkpoint survives


@pytest.mark.parametrize("mode", [["--finetune", "full"], ["--finetune", "lora", "--lora", "all", "--lora-r", "4"]])
def test_ddp_two_processes_equal_one(tiny_run, tmp_path, mode):
    """torchrun with 2 gloo processes on the same global batch (8 = 2 x 4, accumulated twice) takes the
    same steps as 1 process: same logged loss and gradient norm, same weights. float32 so that only
    summation order differs."""
    import train
    model, data = tiny_run
    args = train_args(model, data, tmp_path / "one", "--steps", "4", "--grad-accum", "2", "--amp", "none",
                      "--eval-every", "100", *mode)
    one = train.main(args)
    two_out = tmp_path / "two"
    args[args.index("--out") + 1] = str(two_out)
    torchrun(args, Path(train.__file__).parent)
    logs = [[json.loads(l) for l in open(d / "metrics.jsonl") if '"loss"' in l] for d in (tmp_path / "one", two_out)]
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert len(logs[1]) == 4
    state = torch.load(two_out / "checkpoint" / "state.pt", weights_only=True)["model"]
    ref = one.state_dict()
    assert state and all(torch.allclose(v, ref[k], atol=1e-5) for k, v in state.items())


def test_overfit_batch_memorises_and_plots(tiny_run, tmp_path, capsys):
    import train
    model, data = tiny_run
    train.main(train_args(model, data, tmp_path, "--steps", "60", "--finetune", "full", "--overfit-batch",
                          "--lr", "3e-3", "--eval-every", "100", "--eval-samples", "8"))
    out = capsys.readouterr().out
    assert "the pipeline learns" in out, out[-2000:]
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
    assert losses[-1] < 0.1 * losses[0]
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def torchrun(args, cwd, script=("train.py",), ok=True):
    import os
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *script, *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert (p.returncode == 0) == ok, p.stderr[-3000:]
    return p


def test_fsdp_two_processes_equal_one_and_resume(tiny_run, tmp_path):
    """FSDP2 full fine-tuning on 2 gloo processes: same steps as 1 process, and a run stopped after
    step 3 and resumed ends where the uninterrupted sharded run does."""
    from safetensors.torch import load_file
    import train
    model, data = tiny_run
    cwd = Path(train.__file__).parent

    def args(out, *extra):
        return train_args(model, data, out, "--steps", "6", "--grad-accum", "2", "--amp", "none",
                          "--eval-every", "100", "--finetune", "full", *extra)
    train.main(args(tmp_path / "one"))
    torchrun(args(tmp_path / "fsdp", "--fsdp"), cwd)
    crashed = torchrun(args(tmp_path / "resumed", "--fsdp"), cwd, ("tests/train_crashing.py", "3"), ok=False)
    assert "simulated crash after the checkpoint of step 3" in crashed.stderr, crashed.stderr[-3000:]
    torchrun(args(tmp_path / "resumed", "--fsdp", "--resume"), cwd)
    logs = {d: [json.loads(l) for l in open(tmp_path / d / "metrics.jsonl") if '"loss"' in l] for d in ("one", "fsdp")}
    for a, b in zip(logs["one"], logs["fsdp"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    one, fsdp, resumed = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "fsdp", "resumed"))
    assert set(one) == set(fsdp) == set(resumed)
    assert all(torch.allclose(fsdp[k], one[k], atol=1e-5) for k in one)
    assert all(torch.equal(resumed[k], fsdp[k]) for k in one)


def test_fsdp_needs_full_finetuning_under_torchrun(tiny_run, tmp_path, capsys):
    import train
    model, data = tiny_run
    with pytest.raises(SystemExit):  # argparse's error, before anything loads
        train.main(train_args(model, data, tmp_path, "--steps", "2", "--fsdp", "--finetune", "full"))
    assert "--fsdp shards full fine-tuning" in capsys.readouterr().err


def test_best_model_and_early_stop(tiny_run, tmp_path, monkeypatch, capsys):
    """Scripted validation CIDEr-D 0.1, 0.5, 0.3, 0.2 at steps 2, 4, 6, 8: OUT/best holds step 4's
    weights (compared with the checkpoint written at step 4), --early-stop 2 stops at step 8, and the
    report scores the test split with OUT/best too."""
    import shutil
    from safetensors.torch import load_file
    import train
    from paligemma.captioning import validation
    model, data = tiny_run
    scripted = iter([0.1, 0.5, 0.3, 0.2])
    real = validation.caption_and_score

    def scored(*a, **k):
        scores, health, preds, stats = real(*a, **k)
        return dict(scores, **{"CIDEr-D": next(scripted)}), health, preds, stats
    monkeypatch.setattr(validation, "caption_and_score", scored)
    saves, save = tmp_path / "saves", train.save_train_state

    def save_and_copy(directory, model, optimizer, step, *a, **k):  # every checkpoint kept, to compare with
        save(directory, model, optimizer, step, *a, **k)
        shutil.copytree(directory, saves / str(step))
    monkeypatch.setattr(train, "save_train_state", save_and_copy)
    out = tmp_path / "run"
    train.main(train_args(model, data, out, "--steps", "20", "--finetune", "full", "--eval-every", "2",
                          "--save-every", "2", "--early-stop", "2"))
    printed = capsys.readouterr().out
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["val_CIDEr-D"] for r in records if "val_CIDEr-D" in r] == [0.1, 0.5, 0.3, 0.2]
    assert "early stop at step 8: 2 evaluations without a better val CIDEr-D (best: step 4, 0.500)" in printed
    assert json.loads((out / "checkpoint" / "step.json").read_text())["step"] == 8
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == 4 and best["val_CIDEr-D"] == 0.5
    at_4 = torch.load(saves / "4" / "state.pt", weights_only=True)["model"]
    kept = load_file(out / "best" / "model.safetensors")
    assert set(kept) == set(at_4) and all(torch.equal(kept[k], at_4[k]) for k in at_4)
    assert not all(torch.equal(kept[k], v) for k, v in torch.load(saves / "8" / "state.pt", weights_only=True)["model"].items())
    assert "best: step 4 (val CIDEr-D 0.5000)" in printed and "| best (step 4) |" in printed
    assert "test_best" in records[-1] and records[-1]["best_step"] == 4
    # the final table's 95 % intervals (evaluate.py's bootstrap), logged and printed for the last and best models
    ci = records[-1]["test_ci95"]
    assert list(ci) == ["last (step 8)", "best (step 4)"] and all(lo <= hi for c in ci.values() for lo, hi in c.values())
    lo, hi = ci["best (step 4)"]["CIDEr-D"]
    assert f"{records[-1]['test_best']['CIDEr-D']:.4f} [{lo:.4f}, {hi:.4f}] |" in printed


def test_kill_inside_a_checkpoint_swap_loses_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    """Killed between 'live checkpoint moved aside' and 'new one renamed in' (issue #14: --resume then
    restarted at step 0): --resume continues from the newest whole checkpoint; --resume with another
    LoRA rank, or a new run in the same folder, is refused by name."""
    import train
    from paligemma import atomic
    from paligemma.captioning.run_folder import ResumeError
    model, data = tiny_run
    lora_args = ["--finetune", "lora", "--lora", "decoder", "--lora-r", "4", "--save-every", "2", "--eval-every", "100"]
    calls, real = [], atomic.os.replace

    def replace(src, dst):  # the third rename of the second checkpoint save: .checkpoint.new -> checkpoint
        calls.append(Path(dst).name)
        if calls.count("checkpoint") == 2:
            raise Crash("killed between the two renames")
        real(src, dst)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(Crash):
        train.main(train_args(model, data, tmp_path, "--steps", "4", *lora_args))
    monkeypatch.setattr(atomic.os, "replace", real)
    assert not (tmp_path / "checkpoint").exists()  # the state the old code turned into a restart at step 0
    with pytest.raises(ResumeError, match=r"--lora-r 8 \(checkpoint: 4\)"):
        train.main(train_args(model, data, tmp_path, "--steps", "4", "--resume", *lora_args[:-4], "--lora-r", "8",
                              *lora_args[-4:]))
    with pytest.raises(ResumeError, match="already holds a run \\(checkpoint at step 4\\): pass --resume"):
        train.main(train_args(model, data, tmp_path, "--steps", "4", *lora_args))
    capsys.readouterr()
    train.main(train_args(model, data, tmp_path, "--steps", "4", "--resume", *lora_args))
    assert "resumed at step 4" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_resume_without_checkpoint_is_refused(tiny_run, tmp_path):
    import train
    from paligemma.captioning.run_folder import ResumeError
    model, data = tiny_run
    with pytest.raises(ResumeError, match=r"--resume: .*state.pt does not exist, nothing to resume \(check --out"):
        train.main(train_args(model, data, tmp_path / "typo", "--steps", "2", "--resume"))


def command(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("flag, value, expected", [
    ("--steps", "0", "expected an integer >= 1, got '0'"),
    ("--batch-size", "0", "expected an integer >= 1, got '0'"),
    ("--lr", "0", "expected a number > 0, got '0'"),
    ("--lora-dropout", "1", "expected a number in [0, 1), got '1'"),
    ("--warmup", "x", "expected an integer >= 0, got 'x'"),
])
def test_bad_numbers_are_one_line_parse_errors(flag, value, expected):
    import train
    with pytest.raises(SystemExit) as e:
        train.parse_args([flag, value])
    assert e.value.code == 2
    p = command("train.py", flag, value)  # and as a user sees it: usage and one line, no traceback
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == f"train.py: error: argument {flag}: {expected}"


def test_bad_input_is_one_line_without_traceback(tiny_run, tmp_path):
    _, data = tiny_run
    p = command("train.py", "--model", "no/such-model", "--data", data, "--out", str(tmp_path / "x"))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("train.py: no/such-model: not a local folder; as a hub id: ") and len(p.stderr.splitlines()) == 1
    p = command("train.py", "--model", "no/such-model", "--data", data, "--out", str(tmp_path / "x"), "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr


# --- issue #27: what trains is exported; one run per folder; resume on the same rows; METEOR said ---

def test_projector_trained_beside_lora_is_in_adapter_and_best(tiny_run, tmp_path):
    """--lora decoder --train-modules multi_modal_projector (a README recipe): OUT/adapter and OUT/best
    carry the projector as PEFT's modules_to_save; PEFT on transformers computes what the run's model
    computes, and OUT/best as PEFT loads it is OUT/best as we load it."""
    import json
    from peft import PeftModel
    from safetensors.torch import load_file
    import lora
    import train
    from paligemma import PaliGemma
    from paligemma.captioning.data import load_examples
    from paligemma.processor import Processor
    from tests.helpers import load_hf
    model, data = tiny_run
    out = tmp_path / "run"
    trained = train.main(train_args(model, data, out, "--steps", "4", "--eval-every", "2", "--save-every", "4",
                                    "--lora", "decoder", "--lora-r", "4", "--train-modules", "multi_modal_projector"))
    base = load_file(Path(model) / "model.safetensors")
    images = [e.image for e in load_examples(data, "test")[0][:2]]
    inputs = Processor.from_pretrained(model)(images, "caption en", ["a field", "two planes near a road"])
    del inputs["labels"]
    real = inputs["attention_mask"].bool()  # left padding: what either side computes there is no output
    for folder in (out / "adapter", out / "best"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["model.multi_modal_projector"], folder
        weight = load_file(folder / "adapter_model.safetensors")["base_model.model.model.multi_modal_projector.linear.weight"]
        assert not torch.allclose(weight, base["multi_modal_projector.linear.weight"].float()), folder  # trained
        hf = PeftModel.from_pretrained(load_hf(model), folder).eval()
        ours = PaliGemma.from_pretrained(model)
        lora.load(ours, folder)
        with torch.no_grad():
            theirs = hf(**inputs).logits[real]
            torch.testing.assert_close(ours.eval()(**inputs)[real], theirs, rtol=1e-5, atol=1e-5)
            if folder.name == "adapter":
                torch.testing.assert_close(trained.eval()(**inputs)[real], theirs, rtol=1e-5, atol=1e-5)


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tiny_run, tmp_path):
    import signal
    import train
    from paligemma.atomic import FolderLocked
    from tests.test_atomic import HOLD
    model, data = tiny_run
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLocked, match=rf"{tmp_path} is in use by train.py \(pid {child.pid} on "):
            train.main(train_args(model, data, tmp_path, "--steps", "2"))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert not (tmp_path / "metrics.jsonl").exists()  # the refused run wrote nothing


def test_resume_on_changed_rows_is_refused_and_meteor_left_out_is_said(tiny_run, tmp_path, monkeypatch, capsys):
    import csv
    import train
    from paligemma.captioning import wordnet
    from paligemma.captioning.run_folder import ResumeError
    model, data = tiny_run
    own = tmp_path / "data"
    own.mkdir()
    (own / "images").symlink_to(Path(data).parent / "images")
    with open(data, newline="") as f:
        rows = list(csv.DictReader(f))

    def write(rows):
        with open(own / "captions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    write(rows)
    monkeypatch.setattr(wordnet, "available", lambda: False)
    args = train_args(model, str(own / "captions.csv"), tmp_path / "run", "--steps", "3", "--finetune", "lora",
                      "--lora", "decoder", "--lora-r", "2", "--eval-every", "100", "--val-captions", "0")
    train.main(args)
    printed = capsys.readouterr().out
    assert "METEOR left out of the test scores: METEOR needs WordNet" in printed
    assert "| METEOR | left out (no WordNet) |" in printed
    dropped = next(r for r in rows if r["split"] == "train")
    write([r for r in rows if r is not dropped])
    with pytest.raises(ResumeError, match=rf"--resume on other data than the checkpoint's: train split \(\d+ -> \d+ rows\): "
                                          rf"1 rows removed \(e.g. \['{dropped['image']}'\]\)"):
        train.main(args + ["--resume", "--steps", "4"])


def test_skip_bad_skips_every_kind_of_bad_image_in_training(tiny_run, tmp_path, capsys):
    """A decompression bomb, a broken PNG chunk and a truncated JPEG among the training images: with
    --skip-bad they are skipped and counted (they ended train.py before, PIL's errors being no OSError)."""
    import csv
    import shutil
    import train
    from tests.helpers import bad_images
    model, data = tiny_run
    own = tmp_path / "data"
    shutil.copytree(Path(data).parent, own)
    with open(own / "captions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    for row, bad in zip(rows[:3], bad_images(tmp_path / "bad").values()):
        shutil.copyfile(bad, own / "images" / row["image"])
    train.main(train_args(model, str(own / "captions.csv"), tmp_path / "run", "--steps", "1", "--lora", "decoder",
                          "--lora-r", "2", "--eval-every", "100", "--val-captions", "0", "--skip-bad"))
    printed = capsys.readouterr().out
    assert "skipped 3 bad examples" in printed and f"{len(rows) - 3} train" in printed
    assert "decompression bomb" in printed and "SyntaxError" in printed


# --- issue #28: the last step's evaluation, a resume that honours best.json, early stop between saves ---

def test_best_survives_a_crash_and_early_stop_between_saves_checkpoints(tiny_run, tmp_path, monkeypatch, capsys):
    """Scripted validation CIDEr-D. Run 1 (--steps 7, --eval-every 2, --save-every 5): 0.1, 0.2, 0.9 at
    steps 2, 4, 6 (OUT/best: step 6), checkpoint at 5; step 7 is the last, so it is evaluated although
    7 is no multiple of 2, and the process dies there. The resumed run (--steps 20) starts at 5 with
    the checkpoint's tracker (best: step 4) but adopts OUT/best/best.json (step 6, 0.9). Step 6 is
    evaluated again (0.5): that is the best step measured again, no evaluation since the best; 0.3,
    0.4, 0.2 at 8, 10, 12 are, so --early-stop 3 stops at step 12, between saves, and checkpoints it.
    best.json keeps step 6's record (image gap included) from run 1, as metrics.jsonl logged it."""
    import train
    from paligemma.captioning import validation
    model, data = tiny_run
    scripted = iter([0.1, 0.2, 0.9, Crash, 0.5, 0.3, 0.4, 0.2, 0.8])
    real = validation.caption_and_score

    def scored(*a, **k):
        score = next(scripted)
        if score is Crash:
            raise Crash("killed during the last step's evaluation")
        scores, health, preds, stats = real(*a, **k)
        return dict(scores, **{"CIDEr-D": score}), health, preds, stats
    monkeypatch.setattr(validation, "caption_and_score", scored)
    out = tmp_path / "run"
    common = ["--finetune", "full", "--eval-every", "2", "--save-every", "5", "--early-stop", "3", "--eval-samples", "2",
              "--val-captions", "2"]
    with pytest.raises(Crash):
        train.main(train_args(model, data, out, "--steps", "7", *common))
    first = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    assert json.loads((out / "checkpoint" / "step.json").read_text())["step"] == 5
    capsys.readouterr()
    train.main(train_args(model, data, out, "--steps", "20", "--resume", *common))
    printed = capsys.readouterr().out
    assert "resumed at step 5 (best so far: step 6, val CIDEr-D 0.900)" in printed
    assert "early stop at step 12: 3 evaluations without a better val CIDEr-D (best: step 6, 0.900)" in printed
    assert json.loads((out / "checkpoint" / "step.json").read_text())["step"] == 12
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [(r["step"], r["val_CIDEr-D"], r["best_step"]) for r in steps if "val_CIDEr-D" in r] == \
        [(2, 0.1, 2), (4, 0.2, 4), (6, 0.5, 6), (8, 0.3, 6), (10, 0.4, 6), (12, 0.2, 6)]
    assert [r for r in steps if r["step"] <= 5] == [first[s] for s in range(1, 6)]  # run 1's, kept by the resume
    at_6 = first[6]
    assert at_6["val_CIDEr-D"] == 0.9 and at_6["image_gap"] == at_6["val_loss_shuffled_images"] - at_6["val_loss"]
    kept = {"val_loss", "val_loss_shuffled_images", "image_gap", "val_CIDEr-D", "val_BLEU-4", "val_caption_s"}
    assert json.loads((out / "best" / "best.json").read_text()) == \
        {"step": 6, "selected_by": "val_CIDEr-D", **{k: at_6[k] for k in kept}}
    assert records[-1]["best_step"] == 6 and "test_best" in records[-1]


# --- issue #20: rows with their own prompts; a task's metric picks OUT/best and scores the test split ---

@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    from paligemma.captioning.data import load_examples
    from paligemma.captioning.synthetic import make_checkpoint, make_detection_dataset
    root = tmp_path_factory.mktemp("detect")
    data = make_detection_dataset(root / "data", n_train=16, n_val=8, n_test=4)
    examples, _ = load_examples(data, "train")
    model = make_checkpoint(root / "model", [c for e in examples for c in e.captions] + [examples[0].prefix],
                            vocab_size=300, task_tokens=True)
    return str(model), str(data)


def test_a_detection_set_is_validated_and_scored_by_map(detection_run, tmp_path, capsys):
    import train
    model, data = detection_run
    out = tmp_path / "run"
    train.main(train_args(model, data, out, "--steps", "4", "--finetune", "full", "--eval-every", "2"))
    printed = capsys.readouterr().out
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    vals = [r for r in records if "val_mAP@0.5" in r]
    assert [r["step"] for r in vals] == [2, 4] and all("val_mAP" in r and "val_CIDEr-D" not in r for r in vals)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["selected_by"] == "val_mAP@0.5" and best["step"] in (2, 4)
    after = records[-1]["test_after"]
    assert {"mAP@0.5", "mAP", "dropped"} <= set(after) and "CIDEr-D" not in after
    assert {f"AP@0.5 {k}" for k in ("building", "plane", "tank")} <= set(after)  # the test split's classes
    assert "task: detect (prefixes such as 'detect building ; plane ; tank')" in printed
    assert "| mAP@0.5 |" in printed and "METEOR" not in printed and (out / "detections.png").exists()
    ci = records[-1]["test_ci95"]["last (step 4)"]  # the task's intervals, as evaluate.py's (tasks/resampling.py)
    assert set(ci) == {"mAP@0.5", "mAP"} and all(lo <= hi for lo, hi in ci.values())
    lo, hi = ci["mAP@0.5"]
    assert f"| {after['mAP@0.5']:.4f} [{lo:.4f}, {hi:.4f}] |" in printed


def test_mixed_tasks_in_one_run_are_refused_in_one_line(detection_run, tmp_path):
    model, data = detection_run
    rows = Path(data).read_text().splitlines()
    mixed = Path(data).parent / "mixed.jsonl"
    first = json.loads(rows[0])
    mixed.write_text("\n".join(rows + [json.dumps(dict(first, prefix="answer en how many?", suffix="two"))]) + "\n")
    p = command("train.py", "--model", model, "--data", str(mixed), "--out", str(tmp_path / "x"))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("train.py: rows of 2 tasks in one run: detect (e.g. train_00000.png: 'detect building ; "
                               "plane ; tank'), answer (e.g. train_00000.png: 'answer en how many?'). Train one task")


def test_demo_flag_sets_its_defaults_and_the_given_flags_win():
    import train
    a = train.parse_args(["--demo", "detect"])
    assert (a.out, a.steps, a.lr) == ("runs/demo-detect", train.DEMOS["detect"]["steps"], train.DEMOS["detect"]["lr"])
    a = train.parse_args(["--demo", "detect", "--steps", "7", "--out", "x"])
    assert (a.out, a.steps) == ("x", 7)
    a = train.parse_args([])
    assert (a.demo, a.out, a.steps, a.lr) == ("caption", "runs/demo", 600, None)
    with pytest.raises(SystemExit):
        train.parse_args(["--demo", "detect", "--data", "x.jsonl"])


# --- review of the training loop: early stop on resume, --max-length at load, a new run's log, report keys ---

def test_resuming_an_early_stopped_checkpoint_finishes_without_training(tiny_run, tmp_path, monkeypatch, capsys):
    """Scripted validation CIDEr-D 0.5, 0.3 at steps 2, 4: --early-stop 1 stops at 4 and checkpoints it.
    --resume with the same --early-stop finishes that run (test scores, report) without a step more;
    a larger --early-stop continues it."""
    import train
    from paligemma.captioning import validation
    model, data = tiny_run
    scripted = iter([0.5, 0.3, 0.1])
    real = validation.caption_and_score

    def scored(*a, **k):
        scores, health, preds, stats = real(*a, **k)
        return dict(scores, **{"CIDEr-D": next(scripted)}), health, preds, stats
    monkeypatch.setattr(validation, "caption_and_score", scored)
    out = tmp_path / "run"
    common = ["--steps", "20", "--finetune", "full", "--eval-every", "2", "--save-every", "100", "--eval-samples", "2",
              "--val-captions", "2"]
    train.main(train_args(model, data, out, *common, "--early-stop", "1"))
    assert json.loads((out / "checkpoint" / "step.json").read_text())["step"] == 4
    capsys.readouterr()
    train.main(train_args(model, data, out, *common, "--early-stop", "1", "--resume"))
    printed = capsys.readouterr().out
    assert "early stop already reached at step 4: 1 evaluations without a better val CIDEr-D (best: step 2)" in printed
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[-1]["step"] == 4 and "test_after" in records[-1] and "| best (step 2) |" in printed
    train.main(train_args(model, data, out, *common, "--early-stop", "2", "--resume"))  # 0.1 at step 6: stale 2
    assert json.loads((out / "checkpoint" / "step.json").read_text())["step"] == 6


def test_a_max_length_too_short_for_a_prefix_is_named_by_file_and_line_at_load(tiny_run, tmp_path):
    """One validation row's question is too long for --max-length: refused before the model loads,
    naming its line, not when its batch comes up (hours in, and again on --resume)."""
    import csv
    import train
    from paligemma.captioning.data import DataError
    from paligemma.processor import Processor
    model, data = tiny_run
    own = tmp_path / "data"
    own.mkdir()
    (own / "images").symlink_to(Path(data).parent / "images")
    with open(data, newline="") as f:
        rows = [{"image": r["image"], "prefix": "caption en", "suffix": r["caption_1"], "split": r["split"]}
                for r in csv.DictReader(f)]
    long = next(i for i, r in enumerate(rows) if r["split"] == "val") + 3
    rows[long]["prefix"] = "caption en" + " the lake and the field" * 6
    (own / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    processor = Processor.from_pretrained(model)
    fits, need = len(processor.prefix_ids("caption en")) + 1, len(processor.prefix_ids(rows[long]["prefix"])) + 1
    assert fits < need
    out = tmp_path / "run"
    with pytest.raises(DataError, match=rf"^{own / 'rows.jsonl'}:{long + 1}: prefix .* takes {need - 1} tokens .* does "
                                        rf"not fit --max-length {fits} \(1 val rows do not\); use --max-length {need}"):
        train.main(train_args(model, str(own / "rows.jsonl"), out, "--steps", "2", "--max-length", str(fits)))
    assert not (out / "metrics.jsonl").exists()


def test_a_new_run_keeps_a_killed_runs_log_aside_and_reports_its_own_scores(tiny_run, tmp_path, capsys):
    """A run killed before its first checkpoint left metrics.jsonl (its test_before, a step); a new run in
    that folder starts its own log, keeps the old one as metrics.jsonl.old, and its table's "before"
    column is its own measurement, not the killed run's."""
    import train
    model, data = tiny_run
    out = tmp_path / "run"
    out.mkdir()
    old = '{"step": 0, "test_before": {"CIDEr-D": 123.0, "BLEU-4": 123.0}}\n{"step": 1, "loss": 9.9}\n'
    (out / "metrics.jsonl").write_text(old)
    train.main(train_args(model, data, out, "--steps", "2", "--finetune", "full", "--eval-samples", "2"))
    printed = capsys.readouterr().out
    assert f"the earlier run's metrics.jsonl is kept as {out / 'metrics.jsonl.old'}" in printed
    assert (out / "metrics.jsonl.old").read_text() == old
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    before = [r["test_before"] for r in records if "test_before" in r]
    assert len(before) == 1 and before[0]["CIDEr-D"] != 123.0 and [r["step"] for r in records if "loss" in r] == [1, 2]
    assert "123.0000" not in printed and f"| CIDEr-D | {before[0]['CIDEr-D']:.4f} |" in printed


def test_report_scores_rows_that_share_an_image_and_reads_a_log_with_a_torn_last_line(tmp_path, capsys):
    """Two test rows of one image (two prompts): the predictions are keyed "image | prefix"
    (validation.row_keys), so the references must be too; the log's last line was cut short by a kill."""
    from types import SimpleNamespace
    import train
    from paligemma.captioning.data import Example
    from paligemma.captioning.validation import Best, row_keys
    test = [Example(Path("a.png"), ["two planes on a runway"], "test", "caption en"),
            Example(Path("a.png"), ["deux avions sur une piste"], "test", "caption fr"),
            Example(Path("b.png"), ["a lake beside a field"], "test", "caption en")]
    preds = dict(zip(row_keys(test), ["two planes on a runway", "deux avions", "a field"]))
    scores = {"CIDEr-D": 1.0, "BLEU-4": 0.5}
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "test_before": {"CIDEr-D": 0.25, "BLEU-4": 0.125}}\n'
                                            '{"step": 1, "loss": 6.0}\n{"step": 2, "lo')
    args = SimpleNamespace(full=True, eval_samples=3, overfit_batch=False)
    with pytest.warns(UserWarning, match="cut short"):
        train.report(args, tmp_path, after=(scores, {}, preds, None), last=2, best=Best(), score_test=None, test=test,
                     skipped=None, losses=[])
    printed = capsys.readouterr().out
    assert "| metric [95 % interval] | before | last (step 2) |" in printed
    assert "| CIDEr-D | 0.2500 | 1.0000 [" in printed  # the torn log's test_before, this run's scores
    last = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][-1]
    lo, hi = last["test_ci95"]["last (step 2)"]["BLEU-4"]
    assert 0 <= lo <= hi <= 1 and last["test_after"] == scores
