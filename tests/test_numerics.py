"""bf16 numerics: the steps that must compute in float32 (RMSNorm, the attention softmax, the RoPE
tables, SigLIP's LayerNorm) checked on bf16 inputs against the float32 computation cast back once,
written out by hand here; and positions supplied by a caller followed by cached decoding."""
import pytest
import torch

from paligemma.attention import attention
from paligemma.gemma import GemmaRMSNorm, apply_rope, rope

BF16 = torch.bfloat16


def test_rmsnorm_bf16_is_float32_cast_once():
    """x / rms(x) * (1 + w) in float32, one rounding to bf16 at the end (transformers' order)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 17, 2048, generator=g) * 4 + 0.5).to(BF16)
    norm = GemmaRMSNorm(2048, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(2048, generator=g) * 0.7)
    norm = norm.to(BF16)
    xf, wf = x.float(), norm.weight.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + wf)).to(BF16)
    out = norm(x)
    assert out.dtype == BF16 and torch.equal(out, expected)


def test_rope_tables_in_float32_then_cast():
    """Angles position x inverse frequency in float32 (in bf16 a position like 1000 keeps 8 bits, so
    the angle is off by radians); cos and sin rounded to the compute dtype once."""
    head_dim, theta = 64, 10_000.0
    positions = torch.tensor([[1, 2, 3, 255, 256, 257, 1000, 1023], [1, 1, 1, 2, 3, 4, 5, 6]])
    cos, sin = rope(positions, head_dim, theta, BF16)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), -1)[:, None]  # (B, 1, T, hd): rotate-half layout
    assert cos.shape == (2, 1, 8, head_dim) and cos.dtype == sin.dtype == BF16
    assert torch.equal(cos, angles.cos().to(BF16)) and torch.equal(sin, angles.sin().to(BF16))


def test_apply_rope_rotates_pairs_half_a_head_apart():
    """Feature i pairs with feature i + hd/2 (rotate-half, not interleaved); bf16 arithmetic in
    transformers' order, and the rotation itself checked in float64."""
    g = torch.Generator().manual_seed(1)
    hd = 16
    x = torch.randn(2, 3, 5, hd, generator=g).to(BF16)  # (B, H, T, hd)
    positions = torch.arange(1, 6).repeat(2, 1) * 37
    cos, sin = rope(positions, hd, 10_000.0, BF16)
    out = apply_rope(x, cos, sin)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    assert torch.equal(out, x * cos + torch.cat((-x2, x1), -1) * sin)
    c, s = cos.double()[..., :hd // 2], sin.double()[..., :hd // 2]
    a, b = x1.double(), x2.double()
    exact = torch.cat((a * c - b * s, b * c + a * s), -1)
    torch.testing.assert_close(out.double(), exact, atol=0.03, rtol=0.02)  # bf16: 8 bits of mantissa


def grid(g, shape, values):
    """bf16 tensor of small dyadic numbers: every q.k and p.v dot product is exact in any order, so
    only the softmax's precision can make the result differ from the reference."""
    return torch.tensor(values)[torch.randint(0, len(values), shape, generator=g)].to(BF16)


@pytest.mark.parametrize("T,softcap", [(1, None), (1, 5.0), (4, 5.0), (4, 1.5)])
def test_attention_softmax_in_float32_on_bf16(T, softcap):
    """The explicit kernel (one-token decode; soft-capped prefill): scores and soft-cap in the input
    dtype as transformers does, softmax in float32, probabilities rounded to bf16 once before @ v."""
    g = torch.Generator().manual_seed(T)
    B, H, K, S, hd = 2, 4, 2, 13, 8
    q = grid(g, (B, H, T, hd), [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0])
    k = grid(g, (B, K, S, hd), [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0])
    v = grid(g, (B, K, S, hd), [-1.0, -0.5, 0.0, 0.25, 0.5, 1.0])
    mask = torch.rand(B, 1, T, S, generator=g) > 0.3
    mask[..., 0] = True
    out = attention(q, k, v, mask, 0.125, softcap)
    kr, vr = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)  # query head h uses kv head h // G
    scores = (q @ kr.transpose(-1, -2)) * 0.125  # exact (dyadic)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(BF16).min)
    expected = torch.softmax(scores.float(), -1).to(BF16) @ vr
    assert out.dtype == BF16 and torch.equal(out, expected)


def test_siglip_layernorm_bf16_is_float32_cast_once(pg1_dir):
    """The vision tower's LayerNorms on bf16 weights and inputs normalise in float32: torch's fused
    kernel orders the float32 multiply-adds differently from the written-out formula, which moves
    a handful of values in their last bits (2 in 100k measured); a bf16 computation moves ~40%."""
    from paligemma import PaliGemma
    model = PaliGemma.from_pretrained(pg1_dir, dtype=BF16)
    g = torch.Generator().manual_seed(2)
    for ln in (model.vision_tower.vision_model.encoder.layers[0].layer_norm1,
               model.vision_tower.vision_model.post_layernorm):
        assert ln.weight.dtype == BF16
        x = (torch.randn(64, 40, ln.weight.shape[0], generator=g) * 3 + 1).to(BF16)
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        expected = ((xf - mean) * torch.rsqrt(var + ln.eps) * ln.weight.float() + ln.bias.float()).to(BF16)
        out = ln(x)
        differ = out != expected
        assert differ.float().mean() < 1e-3
        # and only in their last bits (values near 0 lose relative precision to the cancellation x - mean)
        assert (out.float() - expected.float()).abs().max() <= 2 ** -8 * expected.float().abs().max()


# --- positions supplied by a caller, then cached decoding -------------------------------------------

@pytest.mark.parametrize("family", ["pg1", "pg2"])
def test_caller_positions_then_cached_decoding_equal_one_pass(request, family):
    """The prompt is prefilled with transformers' 1-based position_ids given by the caller; the suffix
    is then decoded one token at a time with the model's own positions from the cache. Logits equal one
    uncached forward pass over the whole sequence (left padding: rows of different lengths; Gemma 2's
    sliding window of 8 is crossed)."""
    from paligemma import PaliGemma
    from tests.helpers import batch
    model = PaliGemma.from_pretrained(request.getfixturevalue(f"{family}_dir")).eval()
    n_suffix = 5
    full = batch(16, prompt_lens=(3, 6, 9), suffix_len=n_suffix, seed=3)
    T = full["input_ids"].shape[1]
    P = T - n_suffix
    with torch.no_grad():
        reference = model(**full)  # (B, T, V)
        prefix = {k: (v[:, :P] if k != "pixel_values" else v) for k, v in full.items()}
        m = prefix["attention_mask"]
        # what transformers' generate() passes: cumsum - 1, pads at 0, then PaliGemma's + 1
        hf_positions = (m.cumsum(-1) - 1).masked_fill(m == 0, 0) + 1
        cache = model.new_cache(3, T)
        logits = [model(**prefix, position_ids=hf_positions, cache=cache)]
        for t in range(P, T):
            step = dict(input_ids=full["input_ids"][:, t:t + 1], attention_mask=torch.ones(3, 1, dtype=torch.long),
                        token_type_ids=torch.ones(3, 1, dtype=torch.long))
            logits.append(model(**step, cache=cache))
    logits = torch.cat(logits, 1)
    real = full["attention_mask"].bool()
    # measured: 1.2e-7 (PG1), 1.6e-7 (PG2); one position off moves them by 1.3e-4 and 5e-3
    torch.testing.assert_close(logits[real], reference[real], atol=1e-6, rtol=0)
    # the check sees a decode position off by one: prefill one position further on, decode as before
    with torch.no_grad():
        cache = model.new_cache(3, T)
        model(**prefix, position_ids=hf_positions + 1, cache=cache)
        step = dict(input_ids=full["input_ids"][:, P:P + 1], attention_mask=torch.ones(3, 1, dtype=torch.long),
                    token_type_ids=torch.ones(3, 1, dtype=torch.long))
        off = model(**step, cache=cache)[:, 0]
    assert (off - reference[:, P]).abs().max() > 1e-5
