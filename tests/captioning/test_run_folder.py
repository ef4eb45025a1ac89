"""paligemma/captioning/run_folder.py, the promises test_training.py's checkpoint tests leave open: every
setting that changes what a checkpoint's weights, optimizer state or data position mean is refused
on --resume by its flag (one at a time, written out here from what each setting does), and a saved
tensor of the right size but the wrong shape is named instead of failing inside copy_; the metrics log
through a full disk and a torn last line; model folders swapped in with their tokenizer; the GPU's
generator in the checkpoint."""
import errno
import random
import re

import pytest
import torch

from paligemma.captioning.run_folder import ResumeError, check_settings, load_train_state
from paligemma.captioning.training import Batches
from tests.captioning.test_training import ARGS, lora_model, saved_run
from tests.helpers import Crash

SAVED = dict(model="m", data="d", prompt="caption en", finetune="lora", lora="decoder", lora_r=4, lora_alpha=8.0,
             lora_dropout=0.0, rslora=False, train_modules=[], batch_size=8, grad_accum=1, seed=0,
             first_caption_only=False, max_length=64, dtype="float32", blind=False, overfit_batch=False,
             steps=100, lr=1e-4, eval_every=50, save_every=50, device="cpu")
CHANGED = {  # flag -> another value, and why a resumed run must not take it
    "model": "other",  # other base weights
    "data": "elsewhere",  # the data position indexes these rows
    "prompt": "describe",  # other inputs, other labels
    "finetune": "full",  # other trained weights
    "lora": "all", "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.1, "rslora": True,  # another adapter
    "train_modules": ["multi_modal_projector"],
    "batch_size": 4, "grad_accum": 2,  # the data position counts batches of this size
    "seed": 1,  # the data order (Batches is shuffled with it), the dropout and caption-sampling streams
    "first_caption_only": True, "max_length": 32, "dtype": "bfloat16", "blind": True, "overfit_batch": True,
}


@pytest.mark.parametrize("key", sorted(CHANGED))
def test_resume_refuses_each_setting_that_changes_the_run(key, tmp_path):
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ResumeError, match=re.escape(f"other settings than the checkpoint's: {flag} {CHANGED[key]!r} "
                                                    f"(checkpoint: {SAVED[key]!r})")):
        check_settings(SAVED, dict(SAVED, **{key: CHANGED[key]}), tmp_path)


def test_resume_may_change_length_schedule_and_device(tmp_path):
    check_settings(SAVED, dict(SAVED, steps=500, lr=1e-3, eval_every=10, save_every=10, device="cuda"), tmp_path)


def test_a_transposed_tensor_of_the_same_size_is_named(pg1_dir, tmp_path):
    """lora_A (r 4, in 32) saved as (32, 4): as many numbers, another shape."""
    saved_run(pg1_dir, tmp_path / "checkpoint")
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    name = next(k for k in state["model"] if k.endswith("lora_A.weight"))
    state["model"][name] = state["model"][name].t().contiguous()
    torch.save(state, tmp_path / "checkpoint" / "state.pt")
    model = lora_model(pg1_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    shape = tuple(model.state_dict()[name].shape)
    with pytest.raises(ResumeError, match=rf"wrong shapes \['{name}: checkpoint \({shape[1]}, {shape[0]}\), model"):
        load_train_state(tmp_path / "checkpoint", model, opt, Batches([0], 1, 0), random.Random(),
                         args=dict(model=str(pg1_dir), **ARGS))


# --- settings that silently changed on --resume: the quantized base, the frozen modules, weight decay ---

def test_resume_refuses_another_quantization_freeze_or_weight_decay(tmp_path):
    """--weight-decay would even be undone without a word: the optimizer state's param_groups put the
    saved value back. A checkpoint written before a setting existed holds no value for it: not checked."""
    saved = dict(SAVED, quantize=None, freeze=[], weight_decay=0.0)
    for key, value in (("quantize", "nf4"), ("freeze", ["vision_tower"]), ("weight_decay", 0.1)):
        flag = "--" + key.replace("_", "-")
        with pytest.raises(ResumeError, match=re.escape(f"{flag} {value!r} (checkpoint: {saved[key]!r})")):
            check_settings(saved, dict(saved, **{key: value}), tmp_path)
    check_settings(SAVED, dict(SAVED, quantize=None, freeze=[], weight_decay=0.0), tmp_path)  # an older checkpoint


# --- metrics.jsonl: a full disk named, a line a kill cut short left out, damage before it named ---

def test_a_full_disk_while_logging_names_the_log(tmp_path, monkeypatch):
    from paligemma.captioning import run_folder
    log = tmp_path / "metrics.jsonl"
    run_folder.append_jsonl(log, {"step": 1})

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # delayed allocation: found at fsync
    monkeypatch.setattr(run_folder.os, "fsync", fsync)
    with pytest.raises(OSError, match=rf"^\[Errno 28\] no space left on device: {re.escape(str(log))}"):
        run_folder.append_jsonl(log, {"step": 2})


def test_a_torn_last_line_is_left_out_with_a_warning_and_damage_before_it_is_named(tmp_path):
    from paligemma.captioning.run_folder import LogError, append_jsonl, read_log, trim_log
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0, "test_before": {"CIDEr-D": 0.1}}\n{"step": 1, "loss": 6.2}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match=re.escape(f"{log}:3: the last line is cut short")):
        trim_log(log, 5)
    assert log.read_text() == '{"step": 0, "test_before": {"CIDEr-D": 0.1}}\n{"step": 1, "loss": 6.2}\n'
    log.write_text(log.read_text() + '{"step": 2, "lo')  # and the next record written after a torn line
    cut_off = re.escape(f"{log}: cut off its last line, left unfinished") + r".*\(15 bytes\)"
    with pytest.warns(UserWarning, match=cut_off):
        append_jsonl(log, {"step": 2, "loss": 6.0})
    assert read_log(log) == [{"step": 0, "test_before": {"CIDEr-D": 0.1}}, {"step": 1, "loss": 6.2},
                             {"step": 2, "loss": 6.0}]
    log.write_text('{"step": 1, "loss": 6.2}\n{"step": 2, "lo\n{"step": 3, "loss": 5.0}\n')
    with pytest.raises(LogError, match=re.escape(f"{log}:2: not a JSON record")):
        trim_log(log, 5)
    with pytest.raises(LogError, match=re.escape(f"{log}:2: not a JSON record")):
        read_log(log)


def test_loss_png_is_drawn_from_a_log_whose_last_line_is_cut_short(tmp_path):
    pytest.importorskip("matplotlib")
    from paligemma.captioning import curves
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(f'{{"step": {s}, "loss": {6 - s}}}\n' for s in range(1, 5)) + '{"step": 5, "lo')
    with pytest.warns(UserWarning, match="cut short"):
        assert curves.plot(log, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_new_run_sets_an_earlier_log_aside_without_overwriting_one(tmp_path):
    from paligemma.captioning.run_folder import set_aside
    log = tmp_path / "metrics.jsonl"
    assert set_aside(log) is None
    for text, name in (("first", "metrics.jsonl.old"), ("second", "metrics.jsonl.old.2")):
        log.write_text(text)
        assert set_aside(log) == tmp_path / name and not log.exists()
    assert (tmp_path / "metrics.jsonl.old").read_text() == "first"
    assert (tmp_path / "metrics.jsonl.old.2").read_text() == "second"


# --- a model folder is swapped in with its tokenizer, never without ---

def test_a_kill_before_the_tokenizer_is_copied_leaves_no_model_folder_without_it(pg1_tok_dir, tmp_path, monkeypatch):
    import shutil
    from paligemma import PaliGemma
    from paligemma.captioning.run_folder import export
    model = PaliGemma.from_pretrained(pg1_tok_dir)
    folder = tmp_path / "final"
    real = shutil.copyfile

    def killed(src, dst, **k):
        raise Crash("killed before the tokenizer was copied")
    monkeypatch.setattr(shutil, "copyfile", killed)
    with pytest.raises(Crash):
        export(model, True, str(pg1_tok_dir), folder)
    assert not folder.exists()
    monkeypatch.setattr(shutil, "copyfile", real)
    export(model, True, str(pg1_tok_dir), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]


def test_the_demo_checkpoint_is_built_whole_or_not_at_all(tmp_path, monkeypatch):
    """make_checkpoint killed before its tokenizer is in: no model folder, so train.py builds it again
    (and a model folder an older version left without its tokenizer is rebuilt too)."""
    import shutil
    import train
    from paligemma.captioning.synthetic import make_checkpoint, make_dataset
    data = make_dataset(tmp_path / "data", n_train=8, n_val=2, n_test=2)
    real = shutil.copyfile

    def killed(src, dst, **k):
        if str(dst).endswith("tokenizer.model"):
            raise Crash("killed before the tokenizer was copied")
        return real(src, dst, **k)
    monkeypatch.setattr(shutil, "copyfile", killed)
    with pytest.raises(Crash):
        make_checkpoint(tmp_path / "out" / "model", ["one red tank in the top left of a field"], vocab_size=300)
    assert not (tmp_path / "out" / "model").exists()
    monkeypatch.setattr(shutil, "copyfile", real)
    model = tmp_path / "out" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"left by a kill")  # what the old make_checkpoint could leave
    train.prepare_from_scratch(tmp_path / "out", str(data))
    assert (model / "tokenizer.model").exists() and (model / "model.safetensors").read_bytes() != b"left by a kill"


# --- the GPU's generator (dropout's masks on CUDA) is saved and restored with the CPU's ---

def test_the_cuda_generator_is_saved_and_restored_on_a_gpu_and_absent_elsewhere(pg1_dir, tmp_path, monkeypatch):
    """On this CPU machine the GPU is played by torch.cuda's two generator calls: a model on cuda saves its
    generator, a resumed run on cuda puts it back into that device; a CPU checkpoint holds none, and
    resuming it (on a GPU too) leaves the generator alone."""
    from paligemma.captioning import run_folder
    saved_run(pg1_dir, tmp_path / "cpu")
    assert "cuda_rng" not in torch.load(tmp_path / "cpu" / "state.pt", weights_only=True)
    gpu, generator, restored = torch.device("cuda", 0), torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: generator if device == gpu else None)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    monkeypatch.setattr(run_folder, "device_of", lambda model: gpu)
    saved_run(pg1_dir, tmp_path / "gpu")
    assert torch.equal(torch.load(tmp_path / "gpu" / "state.pt", weights_only=True)["cuda_rng"], generator)
    for folder in ("gpu", "cpu"):
        model = lora_model(pg1_dir)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        load_train_state(tmp_path / folder, model, opt, Batches(list(range(10)), 3, 0), random.Random(),
                         args=dict(model=str(pg1_dir), **ARGS))
    assert len(restored) == 1 and torch.equal(restored[0][0], generator) and restored[0][1] == gpu
