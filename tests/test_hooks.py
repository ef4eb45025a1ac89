"""Hook points, run_with_cache and recorded generation against transformers (eager), PaliGemma 1 and 2,
left- and right-padded batches."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from paligemma import PaliGemma, probe
from paligemma.gemma import rope
from paligemma.packing import pack
from tests.helpers import batch, load_hf

N_IMG = 16  # (16 / 4)^2 patches in the tiny configs
LAYER = "language_model.model.layers.{}."
VISION = "vision_tower.vision_model.encoder.layers.{}."


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def pair(request):
    folder = request.getfixturevalue(f"{request.param}_dir")
    return PaliGemma.from_pretrained(folder), load_hf(folder)


def padded(side: str):
    """Rows of 3 and 8 prompt tokens and a 3-token suffix, padded on `side`."""
    inputs = batch(N_IMG, prompt_lens=(3, 8), suffix_len=3, seed=5)
    if side == "right":  # move each row's real tokens to the front
        order = (1 - inputs["attention_mask"]).argsort(dim=1, stable=True)
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            inputs[k] = inputs[k].gather(1, order)
    return inputs


def hf_forward(hf, inputs, **kwargs):
    positions = inputs["attention_mask"].cumsum(-1).clamp(min=1)  # ours: padding does not shift positions
    with torch.no_grad():
        return hf(**inputs, position_ids=positions, **kwargs)


@pytest.mark.parametrize("side", ["left", "right"])
def test_patterns_and_residuals_match_transformers(pair, side):
    ours, hf = pair
    inputs = padded(side)
    real = inputs["attention_mask"].bool()  # (B, T) real query rows
    logits, cache = probe.run_with_cache(ours, **inputs)
    ref = hf_forward(hf, inputs, output_attentions=True, output_hidden_states=True)
    L = ours.config.text.num_hidden_layers
    for l in range(L):
        got = cache[LAYER.format(l) + "self_attn.hook_pattern"].transpose(1, 2)  # (B, T, H, S)
        assert_close(got[real], ref.attentions[l].transpose(1, 2)[real], rtol=0, atol=1e-5)
        resid = cache[LAYER.format(l) + "hook_resid_post"]
        if l == L - 1:  # transformers' last hidden state is after the final norm
            resid = ours.language_model.model.norm(resid)
        assert_close(resid[real], ref.hidden_states[l + 1][real], rtol=1e-5, atol=1e-5)
    assert_close(cache["hook_embed"][real], ref.hidden_states[0][real], rtol=1e-5, atol=1e-5)
    assert_close(cache["language_model.lm_head"][real], ref.logits[real], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        vision = hf.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    for l in range(ours.config.vision.num_hidden_layers):
        assert_close(cache[VISION.format(l) + "self_attn.hook_pattern"], vision.attentions[l], rtol=0, atol=1e-5)
        assert_close(cache[VISION.format(l) + "hook_resid_post"], vision.hidden_states[l + 1], rtol=1e-5, atol=1e-5)


def test_recording_leaves_logits_exactly_equal(pair):
    ours, _ = pair
    inputs = padded("left")
    with torch.no_grad():
        plain = ours(**inputs)
        logits, cache = probe.run_with_cache(ours, **inputs)
    assert torch.equal(logits, plain)
    assert set(cache) == set(probe.hook_names(ours))
    rec = probe.generate(ours, **{k: v for k, v in inputs.items()}, max_new_tokens=6)
    assert torch.equal(rec.tokens, ours.generate(**inputs, max_new_tokens=6))


def test_hook_shapes(pair):
    ours, _ = pair
    inputs = padded("left")
    B, T = inputs["input_ids"].shape
    t, v = ours.config.text, ours.config.vision
    H, K, hd, D = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size
    _, cache = probe.run_with_cache(ours, **inputs)
    shapes = {"hook_image_features": (B, N_IMG, D), "hook_embed": (B, T, D), "language_model.lm_head": (B, T, t.vocab_size),
              VISION.format(0) + "self_attn.hook_pattern": (B, v.num_attention_heads, N_IMG, N_IMG),
              VISION.format(0) + "hook_resid_post": (B, N_IMG, v.hidden_size)}
    for name, shape in [("self_attn.hook_q", (B, H, T, hd)), ("self_attn.hook_k", (B, K, T, hd)),
                        ("self_attn.hook_v", (B, K, T, hd)), ("self_attn.hook_pattern", (B, H, T, T)),
                        ("self_attn.hook_z", (B, T, H, hd)), ("hook_attn_out", (B, T, D)), ("hook_resid_mid", (B, T, D)),
                        ("hook_mlp_out", (B, T, D)), ("hook_resid_post", (B, T, D))]:
        shapes[LAYER.format(1) + name] = shape
    assert {n: tuple(cache[n].shape) for n in shapes} == shapes
    # the residual stream adds up: resid_post = resid_mid + mlp_out
    l1 = LAYER.format(1)
    assert_close(cache[l1 + "hook_resid_post"], cache[l1 + "hook_resid_mid"] + cache[l1 + "hook_mlp_out"])


def test_generate_records_what_transformers_generate_returns(pair):
    ours, hf = pair
    inputs = batch(N_IMG, prompt_lens=(3, 8), seed=6)
    T = inputs["input_ids"].shape[1]
    rec = probe.generate(ours, **inputs, max_new_tokens=10, names=["*.self_attn.hook_pattern"])
    ref = hf.generate(**inputs, max_new_tokens=10, do_sample=False, output_attentions=True, output_logits=True,
                      return_dict_in_generate=True)
    assert torch.equal(rec.tokens, ref.sequences[:, T:])
    assert_close(rec.logits, torch.stack(ref.logits, 1), rtol=1e-5, atol=1e-5)
    real = inputs["attention_mask"].bool()
    for i in range(rec.tokens.shape[1]):
        for l in range(ours.config.text.num_hidden_layers):
            got = rec.values[LAYER.format(l) + "self_attn.hook_pattern"][i]  # (B, H, T or 1, slots)
            want = ref.attentions[i][l]  # (B, H, T or 1, keys so far), sliding layers: the window only
            if i == 0:
                got, want = got.transpose(1, 2)[real], want.transpose(1, 2)[real]  # real query rows
            seen = got[..., :T + i]
            assert_close(seen[..., seen.shape[-1] - want.shape[-1]:], want, rtol=0, atol=1e-5)
            assert not got[..., :seen.shape[-1] - want.shape[-1]].any()  # outside the window: nothing
            assert not got[..., T + i:].any()  # slots not yet written: nothing
        # image_share: the same numbers, summed over the image keys and averaged over heads
        is_image = F.pad(inputs["input_ids"] == ours.config.image_token_index, (0, i))  # (B, T + i) keys so far
        want = []
        for l in range(ours.config.text.num_hidden_layers):
            a = ref.attentions[i][l][:, :, -1]  # (B, H, keys): the last query's row
            want.append((a * is_image[:, None, is_image.shape[1] - a.shape[-1]:]).sum(-1).mean(-1))
        assert_close(rec.image_share(ours)[:, i], torch.stack(want, 1), rtol=1e-5, atol=1e-5)


def test_zeroed_image_features_match_transformers_ablation(pair):
    ours, hf = pair
    inputs = padded("left")
    real = inputs["attention_mask"].bool()
    with torch.no_grad(), probe.hooks(ours, {"hook_image_features": lambda x, name: torch.zeros_like(x)}):
        got = ours(**inputs)
    handle = hf.model.multi_modal_projector.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    try:
        ref = hf_forward(hf, inputs).logits
    finally:
        handle.remove()
    assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[real], hf_forward(hf, inputs).logits[real], atol=1e-3)  # it did ablate


def test_zeroed_head_matches_transformers_ablation(pair):
    """hook_z of one head zeroed == transformers' o_proj input with that head's columns zeroed."""
    ours, hf = pair
    inputs = padded("left")
    real = inputs["attention_mask"].bool()
    hd, head = ours.config.text.head_dim, 2

    def zero_head(z, name):
        return z.index_fill(2, torch.tensor([head]), 0.0)

    def hf_zero_head(module, args):
        x = args[0].clone()
        x[..., head * hd:(head + 1) * hd] = 0
        return (x,)

    with torch.no_grad(), probe.hooks(ours, {LAYER.format(1) + "self_attn.hook_z": zero_head}):
        got = ours(**inputs)
    handle = hf.model.language_model.layers[1].self_attn.o_proj.register_forward_pre_hook(hf_zero_head)
    try:
        ref = hf_forward(hf, inputs).logits
    finally:
        handle.remove()
    assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)


def test_replaced_pattern_is_used(pair):
    """A pattern edited in place, or returned anew, drives the output; reading it does not."""
    ours, _ = pair
    inputs = padded("left")
    name = LAYER.format(1) + "self_attn."
    with torch.no_grad():
        with probe.hooks(ours, {name + "hook_z": lambda z, n: torch.zeros_like(z)}):
            no_attention = ours(**inputs)
        with probe.hooks(ours, {name + "hook_pattern": lambda p, n: p.mul_(0)}):
            in_place = ours(**inputs)
        with probe.hooks(ours, {name + "hook_pattern": lambda p, n: torch.zeros_like(p)}):
            returned = ours(**inputs)
        with probe.hooks(ours, {name + "hook_pattern": lambda p, n: p.clone()}):
            same = ours(**inputs)
        plain = ours(**inputs)
    assert torch.equal(in_place, no_attention) and torch.equal(returned, no_attention)
    assert_close(same, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, no_attention, atol=1e-3)


def test_logit_lens_against_transformers(pair):
    ours, hf = pair
    inputs = padded("left")
    real = inputs["attention_mask"].bool()
    logits, cache = probe.run_with_cache(ours, ["*.hook_resid_post"], **inputs)
    probs, ids = probe.logit_lens(ours, cache, k=5)
    L = ours.config.text.num_hidden_layers
    assert probs.shape == ids.shape == (L, *inputs["input_ids"].shape, 5)
    top = logits.float().softmax(-1).topk(5)  # the last layer's lens is the model's output
    assert torch.equal(ids[-1], top.indices) and torch.equal(probs[-1], top.values)
    ref = hf_forward(hf, inputs, output_hidden_states=True).hidden_states[1]  # layer 0's output
    with torch.no_grad():
        hf_logits = hf.lm_head(hf.model.language_model.norm(ref))
        cap = ours.config.text.final_logit_softcapping
        if cap:
            hf_logits = torch.tanh(hf_logits / cap) * cap
    want = hf_logits.softmax(-1).topk(5)
    assert_close(probs[0][real], want.values[real], rtol=1e-5, atol=1e-5)


def test_image_grid_folds_the_image_keys(pair):
    """Key j of a left-padded row holds value j: the grid reads back pad + row * side + column."""
    ours, _ = pair
    inputs = padded("left")
    B, T = inputs["input_ids"].shape
    S = T + 5  # cache slots past the prompt
    keys = torch.arange(S, dtype=torch.float32).expand(B, 3, 2, S)  # (B, H, queries, S)
    grid = probe.image_grid(ours, keys, inputs["input_ids"])
    side = 4
    pad = (1 - inputs["attention_mask"]).sum(1)  # (B,)
    want = pad[:, None, None] + torch.arange(side)[:, None] * side + torch.arange(side)  # (B, side, side)
    assert grid.shape == (B, 3, 2, side, side)
    assert torch.equal(grid, want[:, None, None].float().expand_as(grid))


def test_attention_inputs_are_what_the_forward_uses(pair):
    ours, _ = pair
    inputs = padded("left")
    positions, masks = ours.attention_inputs(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    _, cache = probe.run_with_cache(ours, ["hook_embed", LAYER.format(0) + "hook_resid_post"], **inputs)
    c = ours.config.text
    x = cache["hook_embed"]
    cos, sin = rope(positions, c.head_dim, c.rope_theta, x.dtype)
    layer = ours.language_model.model.layers[0]
    with torch.no_grad():
        out = layer(x, cos=cos, sin=sin, mask=masks["sliding" if layer.sliding else "full"])
    assert torch.equal(out, cache[LAYER.format(0) + "hook_resid_post"])
    # with a cache: read, not changed; the next step's position and mask row
    kv = ours.new_cache(2, 40)
    with torch.no_grad():
        ours(**inputs, cache=kv)
    one = torch.ones(2, 1, dtype=torch.long)
    length, seen = kv.length, kv.seen.clone()
    positions, masks = ours.attention_inputs(one, one, one, cache=kv)
    assert kv.length == length and torch.equal(kv.seen, seen)
    assert torch.equal(positions[:, 0], seen + 1)
    assert masks["full"].shape == (2, 1, 1, 40)
    assert torch.equal(masks["full"][:, 0, 0, :length], inputs["attention_mask"].bool())
    assert masks["full"][:, 0, 0, length].all() and not masks["full"][:, 0, 0, length + 1:].any()


def test_attention_inputs_docstring_picture():
    """The worked example in PaliGemma.attention_inputs' docstring."""
    from paligemma.model import attention_masks
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    types = torch.tensor([[0, 0, 0, 0, 0, 1, 1]])
    real = mask.bool()
    got = attention_masks(0, 7, real, (types == 0) & real, None)["full"][0, 0].int()
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0]] + [[0, 1, 1, 1, 1, 0, 0]] * 4 + [[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])
    assert torch.equal(got, want)
    assert mask.cumsum(-1).clamp(min=1).tolist() == [[1, 1, 2, 3, 4, 5, 6]]


def test_inputs_embeds(pair):
    ours, _ = pair
    inputs = padded("left")
    with torch.no_grad():
        x = ours.embed(inputs["input_ids"], inputs["pixel_values"])
        got = ours(inputs_embeds=x, attention_mask=inputs["attention_mask"], token_type_ids=inputs["token_type_ids"])
        assert torch.equal(got, ours(**inputs))
    with pytest.raises(ValueError, match="inputs_embeds"):
        ours(inputs["input_ids"], inputs_embeds=x)


def test_hooks_survive_packing(pg2_dir):
    model = PaliGemma.from_pretrained(pg2_dir)
    inputs = padded("left")
    names = probe.hook_names(model)
    with torch.no_grad():  # packed layers are inference-only
        _, before = probe.run_with_cache(model, ["*hook_pattern", "language_model.lm_head"], **inputs)
        pack(model)
        assert probe.hook_names(model) == names
        _, after = probe.run_with_cache(model, ["*hook_pattern", "language_model.lm_head"], **inputs)
    assert before.keys() == after.keys()
    for n in before:
        assert_close(after[n], before[n], rtol=1e-5, atol=1e-5)


def test_unknown_name_is_an_error(pg1_dir):
    model = PaliGemma.from_pretrained(pg1_dir)
    with pytest.raises(KeyError, match="hook_patern"):
        probe.run_with_cache(model, ["*.hook_patern"], **padded("left"))


def test_attn_out_is_what_the_attention_adds(pair):
    """hook_attn_out == transformers' attention block output as it enters the residual (PG1: self_attn's
    output; PG2: after post_attention_layernorm), and resid_mid = resid_pre + attn_out exactly."""
    ours, hf = pair
    inputs = padded("left")
    real = inputs["attention_mask"].bool()
    _, cache = probe.run_with_cache(ours, ["hook_embed", "*.hook_attn_out", "*.hook_resid_mid", "*.hook_resid_post"],
                                    **inputs)
    seen, handles = {}, []
    for l, layer in enumerate(hf.model.language_model.layers):
        module = layer.post_attention_layernorm if ours.config.text.sandwich_norms else layer.self_attn
        handles.append(module.register_forward_hook(
            lambda m, args, out, l=l: seen.__setitem__(l, (out[0] if isinstance(out, tuple) else out).detach())))
    try:
        hf_forward(hf, inputs)
    finally:
        for h in handles:
            h.remove()
    for l in range(ours.config.text.num_hidden_layers):
        got = cache[LAYER.format(l) + "hook_attn_out"]
        assert_close(got[real], seen[l][real], rtol=1e-5, atol=1e-5)
        before = cache["hook_embed"] if l == 0 else cache[LAYER.format(l - 1) + "hook_resid_post"]
        assert torch.equal(cache[LAYER.format(l) + "hook_resid_mid"], before + got)


# --- issue #28: hooks the fast path must honour (global hooks, pre-hooks, a replaced forward) ---

def test_global_hooks_see_every_hook_point(pair):
    """torch's global forward hooks and pre-hooks (register_module_forward_hook: what tracing and
    profiling tools install) reach every hook point, with the values run_with_cache records, patterns
    included; a global hook that returns a tensor replaces the value, as probe.hooks does."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from paligemma.hookpoint import HookPoint
    ours, _ = pair
    inputs = padded("left")
    names = {m: n for n, m in ours.named_modules() if isinstance(m, HookPoint)}
    _, cache = probe.run_with_cache(ours, **inputs)
    seen, before = {}, {}
    handles = [register_module_forward_hook(lambda m, args, out: seen.__setitem__(names[m], out) if m in names else None),
               register_module_forward_pre_hook(lambda m, args: before.__setitem__(names[m], args[0]) if m in names else None)]
    try:
        with torch.no_grad():
            ours(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(before) == set(names.values())
    for n in names.values():
        assert torch.equal(seen[n], cache[n]) and torch.equal(before[n], cache[n]), n
    z = ours.get_submodule(LAYER.format(1) + "self_attn.hook_z")
    handle = register_module_forward_hook(lambda m, args, out: torch.zeros_like(out) if m is z else None)
    try:
        with torch.no_grad():
            got = ours(**inputs)
    finally:
        handle.remove()
    with torch.no_grad(), probe.hooks(ours, {LAYER.format(1) + "self_attn.hook_z": lambda x, n: torch.zeros_like(x)}):
        want = ours(**inputs)
    assert torch.equal(got, want)
    with torch.no_grad():
        assert not torch.allclose(ours(**inputs), want, atol=1e-3)


def test_a_replaced_forward_or_a_pre_hook_on_a_hook_point_is_used(pair):
    """hook_point.forward = f (monkey-patching, as some tools do) and a forward pre-hook that returns
    a new input both change the output, exactly as the same edit through probe.hooks; a replaced
    pattern's forward makes the attention spell out its probabilities (the fused kernel cannot)."""
    ours, _ = pair
    inputs = padded("left")
    name = LAYER.format(1) + "self_attn."
    z, pattern = ours.get_submodule(name + "hook_z"), ours.get_submodule(name + "hook_pattern")
    with torch.no_grad():
        plain = ours(**inputs)
        with probe.hooks(ours, {name + "hook_z": lambda x, n: torch.zeros_like(x)}):
            zeroed = ours(**inputs)
        for module in (z, pattern):
            module.forward = torch.zeros_like
            try:
                assert torch.equal(ours(**inputs), zeroed)
            finally:
                del module.forward
        handle = z.register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
        try:
            assert torch.equal(ours(**inputs), zeroed)
        finally:
            handle.remove()
        assert torch.equal(ours(**inputs), plain)
    assert not torch.allclose(plain, zeroed, atol=1e-3)


def test_a_global_pre_hook_alone_sees_every_hook_point(pair):
    """register_module_forward_pre_hook with no forward hook beside it (a profiler that only timestamps
    module starts): it too must make every hook point run nn.Module's call, with run_with_cache's values."""
    from torch.nn.modules.module import register_module_forward_pre_hook
    from paligemma.hookpoint import HookPoint
    ours, _ = pair
    inputs = padded("left")
    names = {m: n for n, m in ours.named_modules() if isinstance(m, HookPoint)}
    _, cache = probe.run_with_cache(ours, **inputs)
    before = {}
    handle = register_module_forward_pre_hook(lambda m, args: before.__setitem__(names[m], args[0]) if m in names else None)
    try:
        with torch.no_grad():
            ours(**inputs)
    finally:
        handle.remove()
    assert set(before) == set(names.values())
    assert all(torch.equal(before[n], cache[n]) for n in names.values())
