"""int8, int4 and NF4 layers against hand-written references (dequantize-then-F.linear, fbgemm's
activation rounding); routing by row count; loading; QLoRA."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.testing import assert_close

import lora
from tests.helpers import batch, load_hf
from paligemma import PaliGemma
from paligemma.gemma import TiedHead
from paligemma import int4
from paligemma import quantize as Q

N_IMG = 16
HEADS = {"int8": Q.Int8Head, "int4": Q.Int4Head, "nf4": Q.Int4Head}  # inference's head copy per mode
N_LINEAR = 2 * 6 + 3 * 7 + 1  # pg2: vision q,k,v,out,fc1,fc2 x 2 layers; decoder 7 x 3; projector

# QLoRA (Dettmers et al., 2023), Appendix E: the NF4 data type's 16 values, as published
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


class Calls(TorchFunctionMode):
    """Records the names of the torch functions called."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def linear(in_f=96, out_f=40, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def test_nf4_levels_are_qlora_table():
    assert_close(Q.NF4, torch.tensor(QLORA_NF4), rtol=0, atol=2e-7)
    assert Q.NF4[7] == 0 and Q.NF4[0] == -1 and Q.NF4[15] == 1


def int8_by_hand(w: torch.Tensor):
    """Per-row absmax int8: scale = max |w[o]| / 127 stored in w's dtype, q rounded against it."""
    scale = (w.float().abs().amax(1) / 127).to(w.dtype)
    return (w.float() / scale.float()[:, None]).round().clamp(-127, 127), scale


def fbgemm_by_hand(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fbgemm's dynamic int8 linear (torch's x86 engine) written out. x (rows, in) float32 is quantized
    per tensor, all rows together, to uint8 (0..127 without VNNI): the range [min(x, 0), max(x, 0)]
    over the levels, s_x rounded to float32; the zero point -min / s_x rounded (torch's
    ChooseQuantizationParams picks the one from the minimum whenever min <= 0 < max); codes
    round(x * (1 / s_x) + zero) clamped, the multiply-add fused (one rounding to float32: FMA; rounding
    the product first differs on ~10 % of bf16 inputs, whose coarse values land on ties). Products summed
    in integers, times s_x * scale[o] in float32."""
    levels = 127 if Q.reduce_range() else 255
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / levels  # float64, as torch computes it
    zero = int(min(max(round(-lo / s), 0), levels))
    sx = torch.tensor(s, dtype=torch.float32)
    xq = torch.round((x.double() * (1 / sx).double() + zero).float()).clamp(0, levels)  # exact in float64, then FMA's rounding
    acc = (xq.long() - zero) @ q.long().t()  # exact: integers
    return acc.float() * (sx * scale.float())


@pytest.mark.parametrize("fbgemm", [True, False])  # False: a torch without fbgemm's ops (or another engine)
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 40])  # the routes: fbgemm at any rows; else <= 16 int8pack
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_equals_hand_reference(dtype, rows, fbgemm, monkeypatch):
    if not fbgemm:
        monkeypatch.setattr(Q, "fbgemm_ready", lambda: False)
    dense = linear(dtype=dtype)
    w = dense.weight.detach()
    q, scale = int8_by_hand(w)
    layer = Q.quantized_linear(dense, "int8")
    assert torch.equal(layer.qweight, q.to(torch.int8)) and torch.equal(layer.scales, scale)
    ref_w = (q.to(dtype) * scale[:, None])
    assert torch.equal(layer.dequantize(), ref_w) and torch.equal(layer.weight, ref_w)
    x = torch.randn(rows, 96).to(dtype) * 3
    dense_ref = F.linear(x, ref_w, dense.bias)
    # training path (the kernels have no backward): dequantize, then F.linear: exact
    assert torch.equal(layer(x.clone().requires_grad_()), dense_ref)
    with torch.no_grad():
        y = layer(x.view(rows, 1, 96)).view(rows, 40)  # any leading shape: the rows are what counts
    if fbgemm:  # activations rounded to 8 bits per tensor (all rows together); the same float32 math
        assert torch.equal(y, fbgemm_by_hand(x.float(), q, scale).to(dtype) + dense.bias)
        assert not torch.equal(y, dense_ref)  # (the activations' rounding shows: not the dense path)
        assert layer.qweight is None  # fbgemm's copy is the only one now
    elif rows <= 16:  # torch._weight_int8pack_mm: weight-only, another summation order
        assert_close(y, dense_ref, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))
        with Calls() as calls, torch.no_grad():
            layer(x)
        assert "_weight_int8pack_mm" in calls.names, calls.names
    else:  # dequantize + F.linear
        assert torch.equal(y, dense_ref)
    assert_close(ref_w.float(), w.float(), rtol=0, atol=float(w.abs().max()) / 127 / 2 + 1e-2 * (dtype == torch.bfloat16))
    assert torch.equal(layer.dequantize(), ref_w)  # also once packed


def test_int8_fbgemm_copy_is_unpacked_wherever_a_tensor_is_wanted(tmp_path):
    """fbgemm's packed weights are no tensor: state_dict(), load_state_dict(), .to() and casts, copies
    and dequantize() must see the int8 weights as if the layer had never been packed."""
    layer = Q.quantized_linear(linear(), "int8")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 96)
    with torch.no_grad():
        y = layer(x)  # packs
    assert layer.qweight is None and layer._fbgemm is not None
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert layer.qweight is None  # saving did not unpack for good
    torch.save(copy.deepcopy(layer), tmp_path / "layer.pt")
    other = torch.load(tmp_path / "layer.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(other(x), y)
    fresh = Q.quantized_linear(linear(seed=1), "int8")
    with torch.no_grad():
        fresh(x)  # packed, then loaded into: the loaded weights are what it computes with
    fresh.load_state_dict(before)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    layer.to(torch.float64)  # a cast: the buffer is back and moved, scales cast
    assert layer.qweight.dtype == torch.int8 and torch.equal(layer.qweight, before["qweight"])
    assert layer.scales.dtype == torch.float64 and layer._fbgemm is None
    layer.to("meta")
    assert layer.qweight.device.type == "meta"


@pytest.mark.skipif(not Q.fbgemm_ready(), reason="fbgemm's ops are not in this torch")
def test_int8_op_for_compiled_steps_reaches_each_layers_own_packed_weights():
    """quantize.fbgemm_int8 (what a compiled step calls) finds a layer by its number in PACKED: the
    layer's own product, also for a copy of a packed layer (which must not use the original's weights)
    and after an unpack and a new pack."""
    layer = Q.quantized_linear(linear(), "int8")
    x = torch.randn(1, 96)
    with torch.no_grad():
        y = layer(x)  # packs: numbered
        assert torch.equal(Q.fbgemm_int8(x, layer._number, 40, Q.REDUCE_RANGE) + layer.bias, y)
        twin = copy.deepcopy(layer)
        twin.bias.zero_()
        twin.pack()  # a copy carries the original's number: it gets its own
        assert twin._number != layer._number and Q.PACKED[twin._number] is twin
        assert torch.equal(Q.fbgemm_int8(x, twin._number, 40, Q.REDUCE_RANGE), twin(x))
        assert Q.PACKED[layer._number] is layer
        old = layer._number
        layer.unpack()
        assert old not in Q.PACKED and layer._number is None
        layer.pack()
        assert torch.equal(Q.fbgemm_int8(x, layer._number, 40, Q.REDUCE_RANGE) + layer.bias, y)


def unpack_nf4_by_hand(layer, absmax) -> torch.Tensor:
    codes = []
    for byte in layer.qweight.tolist():
        codes += [byte >> 4, byte & 15]
    values = torch.tensor([QLORA_NF4[c] for c in codes]).view(-1, 64) * absmax[:, None]
    return values.view(-1)[:layer.in_features * layer.out_features].view(layer.out_features, layer.in_features)


@pytest.mark.parametrize("chunk", [None, 128])  # 128: dequantized in several chunks, the last one short
@pytest.mark.parametrize("shape", [(96, 40), (36, 10)])  # 36 x 10 = 360 weights: the last block is padded
def test_nf4_equals_hand_reference(shape, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(Q, "NF4_CHUNK", chunk)
    dense = linear(*shape)
    w = dense.weight.detach()
    layer = Q.quantized_linear(dense, "nf4")
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == -(-w.numel() // 64) * 32
    blocks = F.pad(w.reshape(-1), (0, -w.numel() % 64)).view(-1, 64)
    absmax = blocks.abs().amax(1)
    assert torch.equal(layer.absmax, absmax)
    # every code is the nearest published level to weight / absmax of its block
    nearest = ((blocks / absmax[:, None])[..., None] - torch.tensor(QLORA_NF4)).abs().argmin(-1).view(-1)
    expected = unpack_nf4_by_hand(layer, absmax)
    assert torch.equal(nearest[:w.numel()].view(w.shape), ((expected / absmax.repeat_interleave(64)[:w.numel()]
                                                             .view(w.shape))[..., None] - torch.tensor(QLORA_NF4))
                       .abs().argmin(-1))
    assert_close(layer.dequantize(torch.float32), expected, rtol=0, atol=1e-6)  # table printed to 1e-7
    x = torch.randn(4, shape[0])
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(torch.float32), dense.bias))  # exact
    assert_close(layer(x), F.linear(x, expected, dense.bias), rtol=1e-5, atol=1e-5)
    # 4 bits: the error per weight is at most half the widest gap between levels, times the absmax
    assert float((layer.dequantize() - w).abs().max()) <= 0.5 * float((Q.NF4[1:] - Q.NF4[:-1]).max()) * float(absmax.max())


def int4_by_hand(w: torch.Tensor, group: int):
    """gpt-fast's group-wise affine 4 bits, written out: per group of `group` input features of a row,
    scale = (max - min) / 15 and zero = min + 8 scale, both rounded to w's dtype; q = round((w - (zero -
    8 scale)) / scale) in 0..15; the weight computed with is (q - 8) scale + zero. -> (q, scale, zero, W)."""
    out_f, in_f = w.shape
    g = w.float().view(out_f, in_f // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(w.dtype).float()
    zero = (lo + 8 * scale).to(w.dtype).float()
    q = ((g - (zero - 8 * scale)[..., None]) / scale[..., None]).round().clamp(0, 15)
    return q.view(out_f, in_f), scale, zero, ((q - 8) * scale[..., None] + zero[..., None]).view(out_f, in_f)


@pytest.mark.parametrize("shape", [(128, 256), (1152, 80), (2048, 4304)])  # out 80: a last packed block of 16 rows
def test_int4_unpack_reads_torchs_packing(shape):
    """The codes are kept in the order torch's CPU kernel reads; `unpack` must be the exact inverse of
    torch's own packer (a torch upgrade that changes the layout fails here)."""
    in_f, out_f = shape
    q = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    assert packed.shape == (out_f, in_f // 2) and packed.dtype == torch.uint8
    assert torch.equal(int4.unpack(packed), q.to(torch.uint8))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_equals_hand_reference(dtype, group):
    dense = linear(256, 80, dtype=dtype)  # 80 outputs: a last packed block of 16 rows
    w = dense.weight.detach()
    q, scale, zero, ref_w = int4_by_hand(w, group)
    layer = Q.quantized_linear(dense, "int4", group=group)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == w.numel() // 2  # two codes a byte
    assert torch.equal(int4.unpack(layer.qweight).float(), q)
    assert torch.equal(layer.scales_and_zeros[..., 0].t().float(), scale)
    assert torch.equal(layer.scales_and_zeros[..., 1].t().float(), zero)
    assert torch.equal(layer.dequantize(torch.float32), ref_w)
    x = torch.randn(3, 5, 256).to(dtype)
    ref = F.linear(x.float(), ref_w, dense.bias.float())
    # training path: dequantize (rounded to the compute dtype), then F.linear
    assert torch.equal(layer(x.clone().requires_grad_()), F.linear(x, ref_w.to(dtype), dense.bias))
    # inference path on CPU: torch._weight_int4pack_mm_for_cpu, float32 accumulation, output in `dtype`; a
    # float32 layer's rows go through it in bfloat16 (its only fast path), scales and zeros rounded to bf16
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype
    assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    if dtype == torch.float32:
        by_bf16 = torch._weight_int4pack_mm_for_cpu(x.bfloat16().view(15, 256), layer.qweight, group,
                                                    layer.scales_and_zeros.bfloat16()).float().view(3, 5, 80)
        assert torch.equal(y, by_bf16 + dense.bias)
    if dtype == torch.float32:  # 4 bits with a zero: each weight within half a step of its group's own grid
        assert float(((ref_w - w).abs().view(80, -1, group) / scale[..., None]).max()) <= 0.5 + 1e-4


@pytest.mark.parametrize("rows", [1, 16, 17, 268])
def test_int4_runs_torchs_kernel_at_every_row_count(rows):
    """Decode and prefill rows both go to torch's int4 kernel on CPU (dequantizing was measured slower
    even at 268 rows); gradients dequantize."""
    dense = linear(256, 80, dtype=torch.bfloat16)
    layer = Q.quantized_linear(dense, "int4")
    ref_w = int4_by_hand(dense.weight.detach(), 64)[3].bfloat16()
    x = torch.randn(rows, 256).bfloat16()
    with Calls() as calls, torch.no_grad():
        y = layer(x)
    assert "_weight_int4pack_mm_for_cpu" in calls.names, calls.names
    with Calls() as calls:
        assert torch.equal(layer(x.requires_grad_()), F.linear(x, ref_w, dense.bias))  # training: dequantized
    assert "_weight_int4pack_mm_for_cpu" not in calls.names
    assert_close(y.float(), F.linear(x.float(), ref_w.float(), dense.bias.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(48, 12), (100, 36)])  # padded: outputs to 16, inputs to whole groups
def test_int4_pads_what_torchs_kernel_cannot_take(shape):
    in_f, out_f = shape
    dense = linear(in_f, out_f)
    layer = Q.quantized_linear(dense, "int4", group=32)
    assert layer.qweight.shape == (out_f + -out_f % 16, (in_f + -in_f % 32) // 2)
    padded = F.pad(dense.weight.detach(), (0, -in_f % 32))
    ref_w = int4_by_hand(padded, 32)[3][:, :in_f]
    assert torch.equal(layer.dequantize(), ref_w)
    x = torch.randn(2, 3, in_f)
    with torch.no_grad():  # the kernel's path, in bfloat16 for this float32 layer: bf16's tolerance
        assert_close(layer(x), F.linear(x, ref_w, dense.bias), rtol=1e-2, atol=1e-2)


def test_int4_refuses_a_group_size_torch_has_no_kernel_for():
    with pytest.raises(ValueError, match="group size 48"):
        Q.quantized_linear(linear(96, 16), "int4", group=48)


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_backward_recomputes_the_dense_weight(mode):
    """Gradients to the input equal F.linear's with the dequantized weight, and autograd saves no
    weight-sized tensor (QLoRA's memory saving would be gone if it kept the dense copies)."""
    dense = linear(256, 512, bias=False)
    layer = Q.quantized_linear(dense, mode)
    x = torch.randn(3, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    (y * torch.arange(512.0)).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (F.linear(x2, layer.dequantize(torch.float32)) * torch.arange(512.0)).sum().backward()
    assert torch.equal(y, F.linear(x, layer.dequantize(torch.float32)))
    assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert max(saved, default=0) < 256 * 512


def test_nf4_double_quantization():
    dense = linear(512, 64)  # 512 blocks: two second-level blocks of 256
    single, double = Q.quantized_linear(dense, "nf4"), Q.quantized_linear(dense, "nf4", double_quant=True)
    assert torch.equal(single.qweight, double.qweight)
    assert double.absmax_q.dtype == torch.int8 and double.absmax_scale.numel() == 2
    err = (double.block_absmax() - single.absmax).abs().max()
    assert err <= double.absmax_scale.max() / 2 + 1e-7  # int8 rounding of the absmaxes, nothing more
    x = torch.randn(3, 512)
    assert torch.equal(double(x), F.linear(x, double.dequantize(torch.float32), dense.bias))


# per weight, int8 errs by ~0.5 % (relative norm) and NF4 by ~9 %; a random 5-layer model passes that on
# to its logits several times over (the quality test on a trained model is in test_quantize_quality.py).
# Measured: int8 0.031 (fbgemm's 8-bit activations included; weight-only 0.020), int4 0.36, nf4 0.38.
@pytest.mark.parametrize("mode,tol", [("int8", 0.06), ("int4", 0.5), ("nf4", 0.5)])
def test_quantized_model_stays_close(pg2_dir, mode, tol):
    dense = PaliGemma.from_pretrained(pg2_dir)
    model = Q.quantize(PaliGemma.from_pretrained(pg2_dir), mode)
    kinds = {type(m) for m in model.modules()}
    assert sum(isinstance(m, Q.LAYERS[mode]) for m in model.modules()) == N_LINEAR and nn.Linear not in kinds
    inputs = batch(N_IMG, prompt_lens=(5, 3), suffix_len=2)
    with torch.no_grad():
        a, b = dense(**inputs), model(**inputs)
    rel = float((a - b).norm() / a.norm())
    assert rel < tol, rel


def test_skip_and_int8_head(pg1_dir):
    model = PaliGemma.from_pretrained(pg1_dir, dtype=torch.bfloat16)
    Q.quantize(model, "int8", skip=r"vision_tower\..*", head=True)
    assert isinstance(model.vision_tower.vision_model.encoder.layers[0].mlp.fc1, nn.Linear)
    assert isinstance(model.language_model.model.layers[0].mlp.up_proj, Q.Int8Linear)
    assert isinstance(model.language_model.lm_head, Q.Int8Head)
    assert not any("head" in k for k in model.state_dict())  # the head copy is not part of the model's state
    h = torch.randn(2, 48, dtype=torch.bfloat16)
    table = model.language_model.model.embed_tokens.weight
    with torch.no_grad():
        assert_close(model.language_model.logits(h).float(), F.linear(h, table).float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("rows", [1, 8, 17])  # <= 16: fbgemm on the int8 copy; more: TiedHead on the table
def test_int8_head_is_soft_capped_on_every_path(pg2_dir, rows):
    """PaliGemma 2 caps its logits (tanh(l / c) c; c = 0.7 in the tiny config): the int8 head's decode
    path (fbgemm, no gradients) must cap too, as the prefill path (TiedHead's) does."""
    model = Q.quantize(PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16), "int8", head=True)
    head, table = model.language_model.lm_head, model.language_model.model.embed_tokens.weight
    cap = head.softcap
    assert cap == 0.7  # tests/helpers.py's final_logit_softcapping
    q, scale = head.qweight.clone(), head.scales.clone()
    h = torch.randn(rows, 1, 48, dtype=torch.bfloat16) * 20  # logits well past the cap
    with torch.no_grad():
        out = model.language_model.logits(h)
    if rows <= 16:
        raw = fbgemm_by_hand(h.view(rows, 48).float(), q.float(), scale).to(torch.bfloat16).view(rows, 1, -1)
        assert head.qweight is None  # it did run through fbgemm
    else:
        raw = F.linear(h, table)
    assert raw.float().abs().max() > 3 * cap  # the cap changes these logits...
    assert torch.equal(out, torch.tanh(raw / cap) * cap)  # ...and every path applies it
    assert out.abs().max() <= cap


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_to_moves_every_tensor_an_add_on_made(pg2_dir, mode):
    """model.to(device) must take the quantized layers' and the int8 head's tensors along: buffers, not
    plain attributes (which .to() never sees); the head's copy is no key of state_dict()."""
    model = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16, quantize=mode, inference=True)
    keys = set(model.state_dict())
    assert isinstance(model.language_model.lm_head, HEADS[mode]) and not any("lm_head" in k for k in keys)
    model.to("meta")
    for name, m in model.named_modules():
        tensors = {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)} | dict(m.named_buffers(recurse=False))
        assert all(t.device.type == "meta" for t in tensors.values()), (name, [k for k, t in tensors.items() if t.device.type != "meta"])
    assert any(b.device.type == "meta" for b in model.language_model.lm_head.buffers())
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_on_load_equals_load_then_quantize(pg2_dir, mode, dtype):
    a = PaliGemma.from_pretrained(pg2_dir, dtype=dtype, quantize=mode)
    b = Q.quantize(PaliGemma.from_pretrained(pg2_dir, dtype=dtype), mode)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(t.device.type == "meta" for t in sa.values())
    inputs = batch(N_IMG, prompt_lens=(5,))
    gen = dict(max_new_tokens=4, eos_id=-1)
    assert torch.equal(a.generate(**inputs, **gen), b.generate(**inputs, **gen))


def test_refusals(pg1_dir):
    model = PaliGemma.from_pretrained(pg1_dir)
    with pytest.raises(ValueError, match="mode 'int3'"):
        Q.quantize(model, "int3")
    with pytest.raises(ValueError, match="torch.float64"):
        Q.quantize(model.double(), "int8")
    with pytest.raises(ValueError, match="mode 'fp8'"):
        PaliGemma.from_pretrained(pg1_dir, quantize="fp8")
    q = Q.quantize(PaliGemma.from_pretrained(pg1_dir), "nf4")
    lora.inject(q, "decoder", r=2)
    with pytest.raises(RuntimeError, match="cannot merge into a quantized base"):
        lora.merge(q)


class Float64Watch(TorchFunctionMode):
    """Records every torch function that returns a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
            self.seen.append(getattr(func, "__name__", str(func)))
        return out


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_no_float64_after_import(mode):
    """MPS has no float64: quantizing, dequantizing and running a layer (forward and backward, double
    quantization too) must make none, so that nothing float64 is ever moved to the layer's device
    (NF4's table is built in float64 once, on the CPU, at import)."""
    dense = linear(256, 64)
    with Float64Watch() as watch:
        layer = Q.quantized_linear(dense, mode, double_quant=True)
        layer(torch.randn(3, 256, requires_grad=True)).sum().backward()
        layer(torch.randn(3, 256)), layer.dequantize(torch.bfloat16)
    assert watch.seen == []


# --- QLoRA ------------------------------------------------------------------------------------------

def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_qlora_trains_only_the_adapter(pg2_dir, mode):
    model = PaliGemma.from_pretrained(pg2_dir, quantize=mode)
    inputs = batch(N_IMG, prompt_lens=(4, 6), suffix_len=3)
    with torch.no_grad():
        before = model(**inputs)
    names = lora.inject(model, "all", r=4, alpha=8)
    assert len(names) == N_LINEAR
    with torch.no_grad():
        assert torch.equal(model(**inputs), before)  # B = 0: a fresh adapter changes nothing
    randomize_lora(model)
    model.set_gradient_checkpointing(True)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = inputs["input_ids"].masked_fill(inputs["token_type_ids"] == 0, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(labels=labels, **inputs).backward()
    for name, layer in lora.lora_layers(model).items():
        assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_A.weight.grad.abs().sum() > 0, name
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {k for k in state if ".lora_" in k}


def test_qlora_adapter_loads_on_the_unquantized_base(pg2_dir, tmp_path):
    """An adapter trained on an NF4 base is an ordinary PEFT adapter: ours and PEFT on the dense
    transformers model give the same logits; on the quantized base it gives what it trained with."""
    from peft import PeftModel
    qmodel = PaliGemma.from_pretrained(pg2_dir, quantize="nf4")
    lora.inject(qmodel, "all", r=4, alpha=8)
    randomize_lora(qmodel)
    lora.save(qmodel, tmp_path / "adapter", base_model_name_or_path=str(pg2_dir))
    dense = PaliGemma.from_pretrained(pg2_dir)
    lora.load(dense, tmp_path / "adapter")
    hf = PeftModel.from_pretrained(load_hf(pg2_dir), tmp_path / "adapter").eval()
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=3)
    with torch.no_grad():
        ours = dense(**inputs)
        assert_close(ours, hf(**inputs).logits, rtol=1e-5, atol=1e-5)
        again = PaliGemma.from_pretrained(pg2_dir, quantize="nf4")
        lora.load(again, tmp_path / "adapter")
        assert torch.equal(again(**inputs), qmodel(**inputs))


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_export_merged_dequantizes(pg2_dir, tmp_path, mode):
    model = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16, quantize=mode)
    lora.inject(model, "decoder", r=4, alpha=8)  # vision layers stay quantized without LoRA
    randomize_lora(model)
    lora.export_merged(model, tmp_path / "merged")
    header = json.loads((tmp_path / "merged" / "model.safetensors").read_bytes()[8:][:int.from_bytes(
        (tmp_path / "merged" / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    merged = PaliGemma.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    name = "language_model.model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    expected = (layer.base.dequantize(torch.float32) + layer.delta()).to(torch.bfloat16)
    assert torch.equal(merged.get_submodule(name).weight, expected)
    fc1 = "vision_tower.vision_model.encoder.layers.0.mlp.fc1"
    assert torch.equal(merged.get_submodule(fc1).weight, model.get_submodule(fc1).dequantize())
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=3)
    with torch.no_grad():
        assert_close(merged(**inputs).float(), model(**inputs).float(), rtol=0.05, atol=0.05)


def test_train_refuses_full_finetuning_of_a_quantized_model(tiny_run, tmp_path, capsys):
    import train
    model, data = tiny_run
    with pytest.raises(SystemExit):  # argparse's error: usage, the message, exit 2, before anything loads
        train.main(["--model", model, "--data", data, "--out", str(tmp_path), "--quantize", "nf4", "--finetune", "full"])
    assert "full fine-tuning would update the int8 / 4-bit weights" in capsys.readouterr().err


def test_train_qlora_adapter_loads_on_the_dense_model(tiny_run, tmp_path):
    import train
    model, data = tiny_run
    trained = train.main(["--model", model, "--data", data, "--out", str(tmp_path), "--batch-size", "8", "--steps", "3",
                          "--eval-every", "3", "--eval-samples", "2", "--quantize", "nf4", "--lora", "decoder",
                          "--checkpointing"])
    assert all(isinstance(l.base, Q.NF4Linear) for l in lora.lora_layers(trained).values())
    dense = PaliGemma.from_pretrained(model)
    names = lora.load(dense, tmp_path / "adapter")
    assert names and all(isinstance(m.base, nn.Linear) for m in lora.lora_layers(dense).values())
    for name in names:  # the trained update itself is what was saved
        assert torch.equal(lora.lora_layers(dense)[name].lora_B.weight, lora.lora_layers(trained)[name].lora_B.weight)


def test_evaluate_compares_the_quantized_model(tiny_run, tmp_path):
    import evaluate
    model, data = tiny_run
    results = evaluate.main(["--model", model, "--data", data, "--out", str(tmp_path), "--split", "test",
                             "--max-samples", "4", "--max-new-tokens", "6", "--compare", "int8", "--meteor", "nltk"])
    assert [n.split(": ")[0] for n in results] == ["A", "B"] and list(results)[1].endswith("(int8)")
    rows = [json.loads(l) for l in open(tmp_path / "predictions.jsonl")]
    assert len(rows) == 8


def int4_head_by_hand(h: torch.Tensor, table: torch.Tensor, cap) -> torch.Tensor:
    """int4.py's groups of 64 over the table, dequantized by hand, then F.linear in float32 and the cap."""
    layer = int4.Int4Linear(table.shape[1], table.shape[0], False, dtype=table.dtype)
    for k, v in int4.quantize_weight(table).items():
        setattr(layer, k, v)
    logits = F.linear(h.float(), layer.dequantize(torch.float32))
    return logits if cap is None else torch.tanh(logits / cap) * cap


@pytest.mark.parametrize("family", ["pg1", "pg2"])
def test_int4_head_decodes_from_its_int4_copy(request, family):
    """int4 (and nf4) inference: the head's decode rows through torch's int4 kernel on a copy of the table,
    equal to dequantize-then-F.linear (and the soft-cap, PaliGemma 2) to rounding; more rows: the table."""
    model = PaliGemma.from_pretrained(request.getfixturevalue(f"{family}_dir"), dtype=torch.bfloat16,
                                      quantize="int4", inference=True)
    head, table = model.language_model.lm_head, model.language_model.model.embed_tokens.weight
    assert isinstance(head, Q.Int4Head) and not any("lm_head" in k for k in model.state_dict())
    h = (torch.randn(3, 5, 48, dtype=torch.bfloat16) * 4)[:, -1]  # strided, as a prefill's last positions are
    with torch.no_grad():
        got = model.language_model.logits(h)
        want = int4_head_by_hand(h, table, head.softcap)
        assert_close(got.float(), want, rtol=0.02, atol=0.02 * float(want.abs().max()))
        exact = TiedHead(head.softcap)(h, table).float()
        assert (got.float() - exact).abs().max() > 0  # it is the int4 copy, not the table
        many = torch.randn(17, 48, dtype=torch.bfloat16)
        assert torch.equal(model.language_model.logits(many), TiedHead(head.softcap)(many, table))


@pytest.mark.parametrize("mode", ["int4", "nf4"])
def test_weight_only_inference_rows_do_not_depend_on_their_batch(pg2_dir, mode):
    """int4 and nf4 are weight-only: a row's tokens must not change with the rows decoded beside it (an
    int8 head rounded all of a batch's activations with one scale, so they did: 2 rows of these 18)."""
    model = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16, quantize=mode, inference=True)
    for seed in range(6):
        inputs = batch(N_IMG, prompt_lens=(3, 9, 6), seed=seed)
        together = model.generate(**inputs, max_new_tokens=8, eos_id=-1)
        for i in range(len(together)):
            keep = inputs["attention_mask"][i].bool()  # the row alone, without padding
            alone = {k: v[i:i + 1] if k == "pixel_values" else v[i:i + 1, keep] for k, v in inputs.items()}
            assert torch.equal(model.generate(**alone, max_new_tokens=8, eos_id=-1)[0], together[i]), (seed, i)


@pytest.mark.parametrize("kind", ["int8", "int4", "packed"])
@pytest.mark.parametrize("assign", [False, True])
def test_a_head_copy_follows_a_new_table(pg2_dir, kind, assign):
    """A head with its own copy of the embedding table (int8, int4, oneDNN-packed) decodes from the table
    a load_state_dict() put in (copied in, or assigned), not from the one it was made from."""
    from paligemma import packing
    model = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16, quantize=None if kind == "packed" else kind,
                                      inference=True)
    if kind == "packed":
        packing.pack(model)
    h = torch.randn(2, 48, dtype=torch.bfloat16) * 4
    lm = model.language_model
    with torch.no_grad():
        before = lm.logits(h)
        state = model.state_dict()
        table = state["language_model.model.embed_tokens.weight"]
        state["language_model.model.embed_tokens.weight"] = table.flip(0).clone()  # the vocabulary's rows reversed
        model.load_state_dict(state, assign=assign)
        after = lm.logits(h)
    assert torch.equal(after, before.flip(-1))  # the same bits: a copy of the reversed rows, in reverse order


def test_quantize_refuses_packed_layers_and_save_pretrained_refuses_quantized_ones(pg1_dir, tmp_path):
    """Two silent dead ends made loud: quantize() on a model packed for inference (it would replace nothing),
    and save_pretrained() of a quantized model (a folder no loader reads); the old folder stays."""
    from paligemma import packing
    from paligemma.weights import save_pretrained
    packed = packing.pack(PaliGemma.from_pretrained(pg1_dir, dtype=torch.float32, inference=True))  # packs on any CPU
    with pytest.raises(ValueError, match="packed for CPU inference"):
        Q.quantize(packed, "int8")
    model = PaliGemma.from_pretrained(pg1_dir, dtype=torch.bfloat16, quantize="int4")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("kept")
    with pytest.raises(ValueError, match=r"qweight.*quantized weights.*quantize="):
        save_pretrained(model, tmp_path / "out")
    assert (tmp_path / "out" / "old.txt").read_text() == "kept"


def test_a_model_loaded_under_inference_mode_decodes(pg1_dir):
    """Tensors made under torch.inference_mode keep no version counter: the head copies' check must not ask."""
    with torch.inference_mode():
        model = PaliGemma.from_pretrained(pg1_dir, dtype=torch.bfloat16, quantize="int4", inference=True)
        out = model.generate(**batch(N_IMG, prompt_lens=(3, 5)), max_new_tokens=4, eos_id=-1)
    plain = PaliGemma.from_pretrained(pg1_dir, dtype=torch.bfloat16, quantize="int4", inference=True)
    assert torch.equal(out, plain.generate(**batch(N_IMG, prompt_lens=(3, 5)), max_new_tokens=4, eos_id=-1))
