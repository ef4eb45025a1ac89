"""float16 numerics (cards without bf16): the model in float16, and under float16 autocast, against
transformers in float32; and a residual stream past float16's 65504, where transformers in float16
turns to NaN and ours stays within float16's precision of float32."""
import pytest
import torch
from torch.testing import assert_close

from paligemma import PaliGemma
from tests.helpers import batch, load_hf, save_hf, tiny_hf_config

N_IMG = 16
FP16 = torch.float16


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def pair(request):
    folder = request.getfixturevalue(f"{request.param}_dir")
    return folder, load_hf(folder)


def test_float16_weights_close_to_float32_reference(pair):
    """bf16's tolerance (test_model.py's) for float16 weights: float16 has 3 more mantissa bits."""
    folder, hf = pair
    inputs = batch(N_IMG, prompt_lens=(6, 3), suffix_len=3)
    ours = PaliGemma.from_pretrained(folder, dtype=FP16)
    assert {p.dtype for p in ours.parameters()} == {FP16}
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**inputs, position_ids=inputs["attention_mask"].cumsum(-1).clamp(min=1)).logits[real]
        got = ours(**inputs)[real].float()
    assert_close(got, ref, rtol=0.05, atol=0.05)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_float16_autocast_close_to_float32_reference(pair):
    """float32 weights under torch.autocast(float16), as --amp fp16 trains; and the loss."""
    folder, hf = pair
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=3)
    labels = inputs["input_ids"].masked_fill(inputs["token_type_ids"] == 0, -100)
    ours = PaliGemma.from_pretrained(folder)
    with torch.no_grad():
        ref = hf(**inputs, labels=labels)
        with torch.autocast("cpu", dtype=FP16):
            got, loss = ours(**inputs), ours.loss(labels=labels, **inputs)
    assert got.dtype in (FP16, torch.float32)
    assert_close(got.float(), ref.logits, rtol=0.05, atol=0.05)
    assert_close(loss, ref.loss, rtol=0.01, atol=0.01)


def massive(folder, n_layers: int, big: float = 3000.0, c: float = 3.0):
    """Rewrite a tiny PaliGemma 1 checkpoint so that one residual dimension grows past 65504 while
    every branch (attention, MLP) stays below it, as Gemma's "massive activations" do: every text
    embedding gets `big` in dimension 0 (20785 after the sqrt(48) embedding scale), each layer's MLP
    reads that dimension through all-ones gate and up columns and writes c x their sum back into it,
    and the final norm's weight -1 there keeps it out of the logits."""
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    state = load_file(path)
    pre = "language_model.model."
    state[pre + "embed_tokens.weight"][:, 0] = big
    for i in range(n_layers):
        state[pre + f"layers.{i}.mlp.gate_proj.weight"][:, 0] = 1.0
        state[pre + f"layers.{i}.mlp.up_proj.weight"][:, 0] = 1.0
        state[pre + f"layers.{i}.mlp.down_proj.weight"][0, :] = c
    state[pre + "norm.weight"][0] = -1.0  # (1 + w) = 0: dimension 0 does not reach the tied head
    save_file(state, path, metadata={"format": "pt"})
    return folder


def test_residual_past_float16_range_stays_finite(tmp_path):
    folder = massive(save_hf(tiny_hf_config("gemma", hidden_size=48), tmp_path), n_layers=2)
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=2)
    ours32, ours16 = PaliGemma.from_pretrained(folder), PaliGemma.from_pretrained(folder, dtype=FP16)
    # the premise, in float32: the residual exceeds float16's largest value, no branch does
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: seen.__setitem__(name, out.abs().max().item()))
             for name, m in ours32.named_modules() if name.endswith(("hook_resid_post", "hook_mlp_out", "self_attn"))]
    with torch.no_grad():
        want = ours32(**inputs)
    for h in hooks:
        h.remove()
    resid = max(v for k, v in seen.items() if k.endswith("resid_post"))
    branch = max(v for k, v in seen.items() if not k.endswith("resid_post"))
    assert resid > 65504 > branch, seen
    with torch.no_grad():
        plain = load_hf(folder, dtype=FP16)(**inputs).logits  # transformers: the residual in float16
        got = ours16(**inputs)
    assert not torch.isfinite(plain).all()  # what plain float16 does with it
    assert torch.isfinite(got).all()
    assert_close(got.float(), want, rtol=0.02, atol=0.02 * want.abs().max().item())  # measured: 0.004 x max
