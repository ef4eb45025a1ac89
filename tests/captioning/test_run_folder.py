"""paligemma/captioning/run_folder.py, the promises test_training.py's checkpoint tests leave open: every
setting that changes what a checkpoint's weights, optimizer state or data position mean is refused
on --resume by its flag (one at a time, written out here from what each setting does), and a saved
tensor of the right size but the wrong shape is named instead of failing inside copy_."""
import random
import re

import pytest
import torch

from paligemma.captioning.run_folder import ResumeError, check_settings, load_train_state
from paligemma.captioning.training import Batches
from tests.captioning.test_training import ARGS, lora_model, saved_run

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
