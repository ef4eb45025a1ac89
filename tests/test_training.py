"""Training pieces and train.py end to end on a tiny synthetic set."""
import random

import pytest
import torch

from paligemma.captioning.data import DataError, Example, load_examples, sample_caption
from paligemma.captioning.training import check_labels, first_loss_check, lr_at
from tests.helpers import Crash, crash_after


def test_lr_schedule_hand_values():
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)


def test_caption_sampling():
    e = Example(image=None, captions=["a", "b", "c", "d", "e"])
    rng = random.Random(0)
    assert {sample_caption(e, rng) for _ in range(200)} == set("abcde")
    assert {sample_caption(e, rng, first_only=True) for _ in range(20)} == {"a"}


def test_every_example_needs_a_label():
    labels = torch.tensor([[-100, 5, 1], [-100, -100, -100]])
    with pytest.raises(ValueError, match=r"\['1'\] have no unmasked label token"):
        check_labels({"labels": labels})


def test_uniform_first_loss_warns_for_pretrained():
    with pytest.warns(UserWarning, match="ln\\(vocab\\)"):
        first_loss_check(11.57, 257_216, pretrained=True)


def write_csv(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "captions.csv").write_text("source,split,image,caption_1,caption_2\n" + "\n".join(rows) + "\n")
    return folder / "captions.csv"


def test_bad_data(tmp_path):
    from PIL import Image
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"junk")
    path = write_csv(tmp_path, ["x,train,ok.png,a field,a lake", "x,train,missing.png,a,b",
                                "x,train,corrupt.png,a,b", "x,train,ok.png,a field,"])
    with pytest.raises(DataError, match=r"captions.csv:3: image file .*missing.png not found"):
        load_examples(path, "train")
    examples, skipped = load_examples(path, "train", skip_bad=True)
    assert len(examples) == 1 and len(skipped.reasons) == 3
    assert "corrupt" in skipped.report() and "empty caption(s) [2]" in skipped.report()
    with pytest.raises(DataError, match="no examples in split 'test'"):
        load_examples(path, "test")
    (tmp_path / "nocap.csv").write_text("image,text\nok.png,a\n")
    with pytest.raises(DataError, match="no caption column"):
        load_examples(tmp_path / "nocap.csv")


def train_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--batch-size", "8", "--eval-every", "4",
            "--eval-samples", "4", "--save-every", "3", "--lr", "1e-3", "--warmup", "2", *extra]


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
    import json
    import train
    model, data = tiny_run
    train.main(train_args(model, data, tmp_path, "--steps", "12", "--finetune", "full"))
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    assert any("image_gap" in r for r in records)
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "final" / "tokenizer.model").exists()


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
    import json
    from pathlib import Path
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
    state = torch.load(two_out / "checkpoint" / "state.pt", weights_only=False)["model"]
    ref = one.state_dict()
    assert state and all(torch.allclose(v, ref[k], atol=1e-5) for k, v in state.items())


def test_overfit_batch_memorises_and_plots(tiny_run, tmp_path, capsys):
    import json
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


def test_blind_control_keeps_captions_and_moves_images():
    from paligemma.captioning.training import blind
    examples = [Example(image=f"{i}.png", captions=[f"caption {i}"]) for i in range(50)]
    shuffled = blind(examples, seed=0)
    assert [e.captions for e in shuffled] == [e.captions for e in examples]
    assert sorted(e.image for e in shuffled) == sorted(e.image for e in examples)
    assert sum(a.image == b.image for a, b in zip(examples, shuffled)) <= 3


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
    import json
    from pathlib import Path
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


def test_fsdp_needs_full_finetuning_under_torchrun(tiny_run, tmp_path):
    import train
    model, data = tiny_run
    with pytest.raises(SystemExit, match="--fsdp shards full fine-tuning"):
        train.main(train_args(model, data, tmp_path, "--steps", "2", "--fsdp", "--finetune", "full"))
