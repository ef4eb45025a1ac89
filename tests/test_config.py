"""Our parsing of the hub's terse config.json against transformers' PaliGemmaConfig."""
import json
from pathlib import Path

import pytest
import torch

from paligemma import ConfigError, PaliGemma, PaliGemmaConfig

DATA = Path(__file__).parent / "data"
HUB_CONFIGS = ["paligemma-3b-pt-224.config.json", "paligemma2-3b-pt-224.config.json"]


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_config_defaults_match_transformers(name):
    from transformers import PaliGemmaConfig as HFConfig
    d = json.loads((DATA / name).read_text())
    ours, hf = PaliGemmaConfig.from_dict(d), HFConfig.from_dict(d)
    ht, hv = hf.text_config, hf.vision_config
    t, v = ours.text, ours.vision
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (ht.hidden_size, ht.intermediate_size, ht.num_hidden_layers)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (ht.num_attention_heads, ht.num_key_value_heads, ht.head_dim)
    assert (t.vocab_size, t.rms_norm_eps) == (ht.vocab_size, ht.rms_norm_eps)
    assert t.rope_theta == ht.rope_parameters["rope_theta"]
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == \
        (hv.hidden_size, hv.intermediate_size, hv.num_hidden_layers, hv.num_attention_heads)
    assert (v.image_size, v.patch_size, v.layer_norm_eps) == (hv.image_size, hv.patch_size, hv.layer_norm_eps)
    assert ours.num_image_tokens == ht.num_image_tokens == 256
    assert ours.image_token_index == hf.image_token_index == 257152
    assert ours.projection_dim == hv.projection_dim == t.hidden_size
    if t.model_type == "gemma2":
        assert t.hidden_size == 2304 != d["hidden_size"]  # the top-level hidden_size is stale
        assert (t.attn_logit_softcapping, t.final_logit_softcapping) == (ht.attn_logit_softcapping, ht.final_logit_softcapping)
        assert (t.sliding_window, t.query_pre_attn_scalar) == (ht.sliding_window, ht.query_pre_attn_scalar)
        assert t.layer_types == ht.layer_types
    else:
        assert t.attn_scale == ht.head_dim ** -0.5 and t.final_logit_softcapping is None


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_3b_shapes_match_transformers_on_meta(name):
    """Every parameter of the full-size model, by name and shape, without allocating weights."""
    from transformers import PaliGemmaConfig as HFConfig, PaliGemmaForConditionalGeneration
    from paligemma.weights import canonical
    d = json.loads((DATA / name).read_text())
    with torch.device("meta"):
        ours = PaliGemma(PaliGemmaConfig.from_dict(d))
        hf = PaliGemmaForConditionalGeneration(HFConfig.from_dict(d))
    hf_shapes = {canonical(k): tuple(p.shape) for k, p in hf.state_dict().items()
                 if "lm_head" not in k}  # tied
    ours_shapes = {k: tuple(p.shape) for k, p in ours.state_dict().items()}
    assert ours_shapes == hf_shapes
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in hf.parameters())  # lm_head is tied: counted once there too


def test_missing_field_names_it():
    d = json.loads((DATA / HUB_CONFIGS[0]).read_text())
    del d["text_config"]["num_hidden_layers"]
    with pytest.raises(ConfigError, match=r"text_config.*num_hidden_layers"):
        PaliGemmaConfig.from_dict(d)
    with pytest.raises(ConfigError, match="vision_config"):
        PaliGemmaConfig.from_dict({"model_type": "paligemma", "text_config": {}})


def test_projection_must_match_text_width():
    d = json.loads((DATA / HUB_CONFIGS[1]).read_text())
    d["projection_dim"] = 2048
    with pytest.raises(ConfigError, match="projection_dim 2048 != text_config.hidden_size 2304"):
        PaliGemmaConfig.from_dict(d)


def test_roundtrip_through_to_dict():
    d = json.loads((DATA / HUB_CONFIGS[1]).read_text())
    c = PaliGemmaConfig.from_dict(d)
    assert PaliGemmaConfig.from_dict(c.to_dict()) == c
