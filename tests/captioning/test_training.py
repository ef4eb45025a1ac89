"""paligemma/captioning/training.py: the pieces of train.py, and its checkpoints: read without running
code, refused by name when damaged, foreign, or resumed with other settings."""
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from paligemma.captioning.data import Example
from paligemma.captioning.run_folder import (ResumeError, check_run_folder, check_settings, load_train_state,
                                             read_train_state, save_train_state)
from paligemma.captioning.training import Batches, blind, check_labels, first_loss_check, lr_at, make_trainable


def test_lr_schedule_hand_values():
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)


def test_every_example_needs_a_label():
    labels = torch.tensor([[-100, 5, 1], [-100, -100, -100]])
    with pytest.raises(ValueError, match=r"\['1'\] have no unmasked label token"):
        check_labels({"labels": labels})


def test_uniform_first_loss_warns_for_pretrained():
    with pytest.warns(UserWarning, match="ln\\(vocab\\)"):
        first_loss_check(11.57, 257_216, pretrained=True)


def test_blind_control_keeps_captions_and_moves_images():
    examples = [Example(image=f"{i}.png", captions=[f"caption {i}"]) for i in range(50)]
    shuffled = blind(examples, seed=0)
    assert [e.captions for e in shuffled] == [e.captions for e in examples]
    assert sorted(e.image for e in shuffled) == sorted(e.image for e in examples)
    assert sum(a.image == b.image for a, b in zip(examples, shuffled)) <= 3


LORA = dict(lora_targets="decoder", r=4, alpha=8.0, dropout=0.0, rslora=False, train_modules=[])  # make_trainable's
# the same, as train.py's settings saved in a checkpoint
ARGS = dict(lora="decoder", lora_r=4, lora_alpha=8.0, lora_dropout=0.0, rslora=False, train_modules=[])


def lora_model(pg1_dir, r=4):
    from paligemma import PaliGemma
    model = PaliGemma.from_pretrained(pg1_dir)
    make_trainable(model, False, **dict(LORA, r=r))
    return model


def saved_run(pg1_dir, folder, args=None):
    """A LoRA checkpoint after one optimizer step, as train.py writes it, and the objects it came from."""
    model = lora_model(pg1_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    batches, rng = Batches(list(range(10)), 3, 0), random.Random(5)
    batches.next()
    rng.random()
    args = dict(model=str(pg1_dir), **ARGS) if args is None else args
    save_train_state(folder, model, optimizer, 1, batches, rng, False, args, extra={"best": {"step": 1}})
    return model, optimizer, batches, rng


def test_checkpoint_round_trip_with_weights_only(pg1_dir, tmp_path):
    """What save_train_state writes loads with torch.load(weights_only=True) and restores everything."""
    model, optimizer, batches, rng = saved_run(pg1_dir, tmp_path / "checkpoint")
    torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    fresh = lora_model(pg1_dir)
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    b2, r2 = Batches(list(range(10)), 3, 0), random.Random(0)
    step, extra = load_train_state(tmp_path / "checkpoint", fresh, opt, b2, r2, args=dict(model=str(pg1_dir), **ARGS))
    assert step == 1 and extra == {"best": {"step": 1}}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    assert b2.next() == batches.next() and r2.random() == rng.random()
    assert str(opt.state_dict()["state"]) == str(optimizer.state_dict()["state"])


class Planted:
    """A pickle that runs code when unpickled: it creates a marker file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_malicious_checkpoint_runs_no_code(pg1_dir, tmp_path):
    folder = tmp_path / "run" / "checkpoint"
    saved_run(pg1_dir, folder)
    state = torch.load(folder / "state.pt", weights_only=True)
    marker = tmp_path / "pwned"
    torch.save(dict(state, extra=Planted(str(marker))), folder / "state.pt")
    torch.load(folder / "state.pt", weights_only=False)  # the old loader: the code runs ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ResumeError, match=r"state.pt: refused: .*could run code.*Run folder: .*run"):
        read_train_state(folder)
    assert not marker.exists()  # ... ours refuses before any of it runs


def test_damaged_checkpoint_names_the_run_folder(pg1_dir, tmp_path):
    folder = tmp_path / "run" / "checkpoint"
    saved_run(pg1_dir, folder)
    data = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(ResumeError, match=rf"state.pt: unreadable checkpoint, damaged or truncated .*Run folder: {tmp_path / 'run'}"):
        read_train_state(folder)
    torch.save({"weights": torch.zeros(2)}, folder / "state.pt")
    with pytest.raises(ResumeError, match="not a train.py checkpoint"):
        read_train_state(folder)


def test_resume_with_other_settings_names_them(pg1_dir, tmp_path):
    saved = dict(model=str(pg1_dir), batch_size=8, **ARGS)
    with pytest.raises(ResumeError, match=r"--lora-r 8 \(checkpoint: 4\); --batch-size 4 \(checkpoint: 8\)"):
        check_settings(saved, dict(saved, lora_r=8, batch_size=4, steps=100), tmp_path)
    check_settings(saved, dict(saved, steps=100, lr=1.0, model=str(pg1_dir) + "/."), tmp_path)  # these may change


def test_resume_into_a_model_of_other_shapes_names_them(pg1_dir, tmp_path):
    saved_run(pg1_dir, tmp_path / "checkpoint")
    model = lora_model(pg1_dir, r=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ResumeError, match=r"wrong shapes \[.*lora_[AB].weight: checkpoint \(\d+, \d+\), model"):
        load_train_state(tmp_path / "checkpoint", model, opt, Batches([0], 1, 0), random.Random())


def test_run_folder_refusals(pg1_dir, tmp_path):
    with pytest.raises(ResumeError, match=r"--resume: .*checkpoint/state.pt does not exist, nothing to resume"):
        check_run_folder(tmp_path, resume=True)
    saved_run(pg1_dir, tmp_path / "checkpoint")
    with pytest.raises(ResumeError, match=r"already holds a run \(checkpoint at step 1\): pass --resume"):
        check_run_folder(tmp_path, resume=False)
    check_run_folder(tmp_path, resume=True)


# --- issue #27: runs that mixed silently are refused by name ---

def test_batch_larger_than_the_split_is_refused():
    with pytest.raises(ValueError, match=r"--batch-size 16 is larger than the train split \(10 examples\)"):
        Batches(list(range(10)), 16, 0)
    assert len(Batches(list(range(10)), 10, 0).next()) == 10


def test_resume_on_changed_rows_names_what_changed(tmp_path):
    from paligemma.captioning.data import fingerprint
    from paligemma.captioning.run_folder import check_same_data
    from pathlib import Path
    rows = [Example(image=Path(f"{i}.png"), captions=[f"caption {i}"]) for i in range(6)]
    saved = {"train": fingerprint(rows[:4]), "val": fingerprint(rows[4:])}
    check_same_data(saved, {"train": fingerprint(rows[:4]), "val": fingerprint(rows[4:])}, tmp_path)
    check_same_data(None, {"train": []}, tmp_path)  # a checkpoint from before fingerprints
    with pytest.raises(ResumeError, match=r"train split \(4 -> 5 rows\): 1 rows added \(e.g. \['9.png'\]\)"):
        check_same_data(saved, dict(saved, train=fingerprint(rows[:4] + [Example(Path("9.png"), ["x"])])), tmp_path)
    with pytest.raises(ResumeError, match=r"val split \(2 -> 1 rows\): 1 rows removed \(e.g. \['5.png'\]\)"):
        check_same_data(saved, dict(saved, val=fingerprint(rows[4:5])), tmp_path)
    edited = rows[:3] + [Example(Path("3.png"), ["another caption"])]
    with pytest.raises(ResumeError, match=r"train split \(4 -> 4 rows\): captions changed on 1 rows \(e.g. \['3.png'\]\)"):
        check_same_data(saved, dict(saved, train=fingerprint(edited)), tmp_path)
    with pytest.raises(ResumeError, match="the same rows in another order"):
        check_same_data(saved, dict(saved, train=fingerprint(rows[:4][::-1])), tmp_path)


def test_invalid_lora_regex_names_the_flag(pg1_dir):
    from paligemma import PaliGemma
    model = PaliGemma.from_pretrained(pg1_dir)
    with pytest.raises(ValueError, match=r"^--lora '\(q_proj': LoRA targets '\(q_proj': not a preset \(decoder, vision, projector, all\) and not a valid regular expression"):
        make_trainable(model, False, **dict(LORA, lora_targets="(q_proj"))


def test_wandb_files_go_under_the_run_folder(tmp_path, monkeypatch):
    import sys
    from paligemma.captioning.run_folder import wandb_run
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=lambda **k: calls.append(k) or "run"))
    assert wandb_run("proj", {"a": 1}, 0, tmp_path / "out") == "run"
    assert calls == [{"project": "proj", "config": {"a": 1}, "dir": str(tmp_path / "out")}]
    assert wandb_run("proj", {}, 1, tmp_path) is None and len(calls) == 1  # rank 0 only


def test_full_disk_during_a_checkpoint_save_is_named_and_keeps_the_last(pg1_dir, tmp_path, monkeypatch):
    """torch.save's own error on a full disk (as measured on a 64 KiB tmpfs) names nothing: the save
    says 'no space left on device' with the checkpoint's path, and the previous checkpoint stays whole."""
    from paligemma import atomic
    from paligemma.captioning import run_folder
    model, optimizer, batches, rng = saved_run(pg1_dir, tmp_path / "checkpoint")
    before = (tmp_path / "checkpoint" / "state.pt").read_bytes()
    real = atomic.shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=0))

    def full(obj, path):
        open(path, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(run_folder.torch, "save", full)
    with pytest.raises(OSError, match=rf"no space left on device: {tmp_path / 'checkpoint'} \(the previous"):
        save_train_state(tmp_path / "checkpoint", model, optimizer, 2, batches, rng, False, dict(ARGS))
    assert (tmp_path / "checkpoint" / "state.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_collate_puts_each_row_under_its_own_prefix_with_labels_on_the_suffix_only(pg1_tok_dir):
    """Rows with a prefix are tokenized as the processor does for that prompt (the reference: one call
    per row), a row without one under the run's prompt; the labels are the suffix and <eos> alone."""
    from PIL import Image
    from paligemma.captioning.training import collate
    from paligemma.processor import IGNORE, Processor
    proc = Processor.from_pretrained(pg1_tok_dir)
    im = Image.new("RGB", (16, 16), "red")
    rows = [Example(im, ["two"], prefix="answer en how many?"), Example(im, ["a red square"]),
            Example(im, ["<loc0000><loc0001><loc0002><loc0003> x"], prefix="detect x")]
    batch = collate(proc, rows, "caption en", random.Random(0))
    for i, (prompt, e) in enumerate(zip(["answer en how many?", "caption en", "detect x"], rows)):
        one = proc([im], [prompt], e.captions)
        n = one["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][i, -n:], one["input_ids"][0])  # left-padded: the row ends the batch
        assert torch.equal(batch["labels"][i, -n:], one["labels"][0])
        suffix = proc.tokenizer.encode(e.captions[0]) + [proc.tokenizer.eos_id]
        assert batch["labels"][i][batch["labels"][i] != IGNORE].tolist() == suffix


def test_the_run_task_comes_from_the_prefixes_and_mixed_tasks_are_refused():
    from paligemma.captioning.data import DataError, run_task
    cap, det = Example(Path("a.png"), ["a field"]), Example(Path("b.png"), ["<loc0000><loc0000><loc0001><loc0001> x"], prefix="detect x")
    assert run_task("caption en", [cap], [cap]) == "caption"
    assert run_task("describe the scene please", [cap]) == "caption"  # captions under a free-form prompt, as before
    assert run_task("caption en", [det], [det]) == "detect"
    assert run_task("answer en what?", [cap]) == "answer"  # the prompt names the task of rows without a prefix
    with pytest.raises(DataError, match=r"rows of 2 tasks in one run: caption \(e.g. a.png: 'caption en'\), detect "
                                        r"\(e.g. b.png: 'detect x'\)\. Train one task per run"):
        run_task("caption en", [cap], [det])
    with pytest.raises(DataError, match=r"c.png: prefix 'find x': cannot tell the task"):
        run_task("caption en", [Example(Path("c.png"), ["x"], prefix="find x")])


def test_full_fine_tuning_with_a_frozen_tower_steps_only_the_rest(pg1_dir):
    """--freeze vision_tower: an optimizer step over the trainable parameters moves the decoder and the
    projector and leaves every vision weight bit for bit; a module that does not exist is named."""
    from paligemma import PaliGemma
    model = PaliGemma.from_pretrained(pg1_dir)
    make_trainable(model, True, freeze=["vision_tower"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and len(params) < len(before)
    ids = torch.tensor([[model.config.image_token_index] * model.config.vision.num_patches + [2, 5, 6, 7]])
    pixels = torch.randn(1, 3, model.config.vision.image_size, model.config.vision.image_size)
    model(ids, pixels).float().logsumexp(-1).mean().backward()
    torch.optim.SGD(params, lr=1.0).step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(not n.startswith("vision_tower.") for n in moved)
    assert any(n.startswith("multi_modal_projector.") for n in moved)
    assert any(n.startswith("language_model.") for n in moved)
    with pytest.raises(ValueError, match=r"^--freeze vision_towr: no such module"):
        make_trainable(PaliGemma.from_pretrained(pg1_dir), True, freeze=["vision_towr"])


def test_prefixes_too_long_for_max_length_are_named_by_the_first_rows_line(tiny_run):
    """A RISC CSV, one prompt: --max-length one below prefix + 1 suffix token names the first train row
    (line 2, under the header) and says how many rows of the split do not fit; one more fits."""
    from paligemma.captioning.data import DataError, load_examples
    from paligemma.captioning.training import check_prefixes_fit
    from paligemma.processor import Processor
    model, data = tiny_run
    processor = Processor.from_pretrained(model)
    splits = {s: load_examples(data, s)[0] for s in ("train", "val", "test")}
    fits = len(processor.prefix_ids("caption en")) + 1
    with pytest.raises(DataError, match=rf"^{data}:2: prefix 'caption en' takes {fits - 1} tokens .* --max-length "
                                        rf"{fits - 1} \({len(splits['train'])} train rows do not\)"):
        check_prefixes_fit(processor, splits, "caption en", fits - 1, data)
    check_prefixes_fit(processor, splits, "caption en", fits, data)
    check_prefixes_fit(processor, splits, "caption en", None, data)
