"""Parity with transformers (eager attention, loaded from the saved files) on tiny random checkpoints."""
import pytest
import torch
from torch.testing import assert_close

from paligemma import PaliGemma
from tests.helpers import batch, load_hf, save_hf, tiny_hf_config

N_IMG = 16  # (16 / 4)^2 patches in the tiny configs


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def pair(request):
    folder = request.getfixturevalue(f"{request.param}_dir")
    return PaliGemma.from_pretrained(folder), load_hf(folder), folder


def test_siglip_matches(pair):
    ours, hf, _ = pair
    x = batch(N_IMG)["pixel_values"]
    with torch.no_grad():
        assert_close(ours.vision_tower(x), hf.model.vision_tower(x).last_hidden_state, rtol=1e-5, atol=1e-5)
        assert_close(ours.image_features(x), hf.model.get_image_features(x).pooler_output, rtol=1e-5, atol=1e-5)


def test_decoder_layer_matches(pair):
    ours, hf, _ = pair
    torch.manual_seed(0)
    B, T, D = 2, 10, ours.config.text.hidden_size
    x = torch.randn(B, T, D)
    pos = torch.arange(1, T + 1)[None].expand(B, T)
    from paligemma.gemma import rope
    from paligemma.model import attention_masks
    valid = torch.ones(B, T, dtype=torch.bool)
    masks = attention_masks(0, T, valid, torch.zeros_like(valid), ours.config.text.sliding_window)
    cos, sin = rope(pos, ours.config.text.head_dim, ours.config.text.rope_theta, x.dtype)
    hf_lm = hf.model.language_model
    hf_pos = hf_lm.rotary_emb(x, pos)
    for i in range(len(ours.language_model.model.layers)):
        mask = masks["sliding" if ours.language_model.model.layers[i].sliding else "full"]
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(x.dtype).min)  # the layer, not the mask
        ref = hf_lm.layers[i](x, attention_mask=additive, position_embeddings=hf_pos, position_ids=pos)
        ref = ref[0] if isinstance(ref, tuple) else ref
        assert_close(ours.language_model.model.layers[i](x, cos, sin, mask), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix_len", [0, 4])
def test_logits_match(pair, suffix_len):
    ours, hf, _ = pair
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=suffix_len)
    with torch.no_grad():
        assert_close(ours(**inputs), hf(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_padded_batch_matches(pair):
    """Left padding: logits of real tokens equal transformers', and equal each row run alone."""
    ours, hf, _ = pair
    inputs = batch(N_IMG, prompt_lens=(3, 9), suffix_len=3)
    mask = inputs["attention_mask"].bool()
    positions = inputs["attention_mask"].cumsum(-1).clamp(min=1)  # what transformers' generate passes
    with torch.no_grad():
        got = ours(**inputs)
        ref = hf(**inputs, position_ids=positions).logits
        assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-5)
        for i in range(2):
            keep = mask[i]
            alone = ours(inputs["input_ids"][i:i + 1, keep], inputs["pixel_values"][i:i + 1],
                         token_type_ids=inputs["token_type_ids"][i:i + 1, keep])
            assert_close(got[i, keep], alone[0], rtol=1e-5, atol=1e-5)


def test_bf16_close_to_float32_reference(pair):
    _, hf, folder = pair
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=3)
    ours = PaliGemma.from_pretrained(folder, dtype=torch.bfloat16)  # float32 files read as bf16
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = ours(**inputs).float()
    assert_close(got, ref, rtol=0.05, atol=0.05)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("steps", [12])
def test_cache_matches_full_forward(pair, steps):
    """Prefill + one-token steps == one full forward, including past the sliding window (8)."""
    ours, _, _ = pair
    inputs = batch(N_IMG, prompt_lens=(3, 6), suffix_len=steps)
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        full = ours(**inputs)
        P = T - steps
        cache = ours.new_cache(2, T)
        first = ours(inputs["input_ids"][:, :P], inputs["pixel_values"], inputs["attention_mask"][:, :P],
                     inputs["token_type_ids"][:, :P], cache=cache)
        outs = [first]
        for t in range(P, T):
            outs.append(ours(inputs["input_ids"][:, t:t + 1], None, inputs["attention_mask"][:, t:t + 1],
                             inputs["token_type_ids"][:, t:t + 1], cache=cache))
    mask = inputs["attention_mask"].bool()
    assert_close(torch.cat(outs, 1)[mask], full[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("image_size,n_tokens", [(224, 256), (448, 1024), (896, 4096)])
def test_hub_resolutions(tmp_path, image_size, n_tokens):
    """224 / 448 / 896 px at patch 14: the number of image tokens and the vision output match."""
    folder = save_hf(tiny_hf_config("gemma", image_size=image_size, patch_size=14), tmp_path)
    ours, hf = PaliGemma.from_pretrained(folder), load_hf(folder)
    assert ours.config.num_image_tokens == n_tokens
    x = torch.rand(1, 3, image_size, image_size) * 2 - 1
    with torch.no_grad():
        got = ours.image_features(x)
        assert got.shape == (1, n_tokens, ours.config.text.hidden_size)
        assert_close(got, hf.model.get_image_features(x).pooler_output, rtol=1e-5, atol=1e-5)
        if image_size == 224:
            inputs = batch(n_tokens, prompt_lens=(4,), suffix_len=2, image_size=image_size)
            assert_close(ours(**inputs), hf(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_loss_matches_transformers(pair):
    ours, hf, _ = pair
    inputs = batch(N_IMG, prompt_lens=(3, 6), suffix_len=4)
    labels = inputs["input_ids"].masked_fill(inputs["token_type_ids"] == 0, -100)
    with torch.no_grad():
        positions = inputs["attention_mask"].cumsum(-1).clamp(min=1)
        ref = hf(**inputs, labels=labels, position_ids=positions).loss
        assert_close(ours.loss(labels=labels, **inputs), ref, rtol=1e-5, atol=1e-5)


def test_image_tokens_without_pixels_is_an_error(pair):
    ours, _, _ = pair
    inputs = batch(N_IMG)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(inputs["input_ids"])
    with pytest.raises(ValueError, match="<image> tokens"):
        ours(inputs["input_ids"][:, 1:], inputs["pixel_values"])
