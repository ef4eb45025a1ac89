"""paligemma/int4.py's chunking: big weights are quantized ROWS rows at a time (memory), and each chunk's
codes, scales and zeros must land on its own rows. The shapes of a real model (out 16384 > ROWS 4096)
are too slow for a test, so ROWS is lowered to 64 on a 200-row weight: 4 chunks, the last of 8 rows
(padded to 16, as torch's kernel wants), against the same weight quantized in one chunk and against
gpt-fast's formula written out."""
import torch

from paligemma import int4


def test_int4_chunked_quantization_equals_one_chunk_and_the_formula(monkeypatch):
    w = torch.randn(200, 128, generator=torch.Generator().manual_seed(0))
    whole = int4.quantize_weight(w, 64)
    monkeypatch.setattr(int4, "ROWS", 64)
    chunked = int4.quantize_weight(w, 64)
    assert torch.equal(chunked["qweight"], whole["qweight"])
    assert torch.equal(chunked["scales_and_zeros"], whole["scales_and_zeros"])
    # by hand, per group of 64 inputs of each row: scale = (max - min) / 15, zero = min + 8 scale
    g = w.view(200, 2, 64)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    zero = lo + 8 * scale
    assert torch.equal(chunked["scales_and_zeros"][:, :200, 0], scale.t())
    assert torch.equal(chunked["scales_and_zeros"][:, :200, 1], zero.t())
    codes = int4.unpack(chunked["qweight"])[:200].float().view(200, 2, 64)
    assert torch.equal(codes, ((g - (zero - 8 * scale)[..., None]) / scale[..., None]).round().clamp(0, 15))
