"""Quality thresholds on a small trained model: int8 and NF4 against the unquantized model's own
greedy captions of held-out images.

The model is the demo's tiny PaliGemma (synthetic.tiny_config at 16 px: 4 image tokens), trained
from scratch in float32 for 400 steps (~20 s on one thread) on scenes in the demo's palette cut
down to two facts it learns that fast: the background and the colour of one large square ("a lake
with a red square"). The demo's own scenes (count, kind and place of small objects) take minutes
to learn, and a model that has not learned a fact sits on near-ties there that any rounding flips:
on the demo model, loading bf16 weights as float32 alone changes 24 % of the captions
(benchmarks/NOTES.md). Quantization is judged where the model is sure.

Measured with this recipe, seeds 0-4 (64 held-out images, 448 caption tokens; the test runs seed 0):
- unquantized: 58-98 % of captions exactly right (seed 0: 80 %), 12-16 of the 16 possible captions,
  mean top-1 probability along its captions 0.940-0.999;
- int8 weight-only (torch._weight_int8pack_mm / dequantize: where fbgemm is not there): 100 % equal
  tokens (teacher-forced argmax), 100 % identical captions, mean KL 2e-8 - 4e-6;
- nf4: 99.8-100 % equal tokens, 98.4-100 % identical captions, mean KL 1.5e-5 - 6.6e-4
  (seed 0: int8 100 %, 100 %, 6e-8; nf4 99.8 %, 98.4 %, 2.1e-5). Trained for 500 steps, or at a
  learning rate of 5e-3 (seeds 0, 1, 4): nf4 >= 99.5 %, >= 96.9 %, KL <= 1.9e-3; int8 unchanged.
With fbgemm's int8 (activations rounded to 8 bits per tensor; here 64 images decode together, so one
scale covers 64 rows; the prefill's one covers all 64 prompts), seeds 0, 1, 2 (seeds 3, 4 not run):
- int8: 100 / 100 / 99.8 % tokens, 100 / 100 / 98.4 % identical (seed 2: one caption of 64 changes),
  KL 3.8e-5 / 4.1e-5 / 1.9e-4 (weight-only, same seeds: 100 %, 100 %, KL 2e-7 - 7e-7). Seed 2 decoded
  one image at a time (one scale per row, as captioning one image does): 98.4 % too, weight-only 100 %;
- int4 (groups of 64): 100 / 99.8 / 100 % tokens, 100 / 98.4 / 100 % identical, KL 1.5e-5 / 1.6e-4 /
  1.6e-4 (groups of 32: KL 3e-5 - 6e-5; 128: 5e-5 - 3.4e-4).
Broken on purpose (monkeypatched, same seeds), for the thresholds to have something to catch:
- int8 scales x2: 44-79 % tokens, 0-5 % identical, KL 1.3-4.9; x1.25: 88-96 %, 22-73 %, 0.16-0.29;
- nf4 with the nibbles of a byte swapped, or the table reversed: 0-4 % tokens, KL 7.9-12;
  codes dequantized with a uniform 16-level table instead of NF4's: 85-94 %, 14-64 %, 0.21-0.44;
- int4 with the nibbles of a byte swapped: 0-14 % tokens, 0 % identical, KL 5.0-5.4 (fails all three);
  each group with the scale of the group before it: 98.0-99.8 % tokens, 87.5-98.4 % identical, KL
  0.0024 / 0.019 / 0.034 on the branch's runs, and KL 3.4e-5 on a fresh clone's (seed 0, 2 threads):
  neighbouring groups have near-equal ranges, so no quality threshold can be sure to catch that slip,
  and the test no longer uses it; every other group at twice its scale (the test's "wrong group
  scale"): 87.3 % tokens, 51.6 % identical, KL 0.85 (fresh clone, seed 0), caught by all three;
  scales x1.25: 93-97 %, 52-80 %, KL 0.08-0.33.
"""
import copy
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from paligemma import PaliGemma
from paligemma import int4
from paligemma import quantize as Q
from paligemma.captioning.synthetic import BACKGROUNDS, COLOURS, PLACES, tiny_config
from paligemma.captioning.training import lr_at
from paligemma.processor import Processor
from paligemma.tokenizer import Tokenizer, train_tokenizer

PROMPT = "caption en"
N_TRAIN, N_TEST = 256, 64
STEPS, BATCH, LR = 400, 32, 3e-3
# quantized worst / broken best (docstring): tokens int8 99.8 %, nf4 99.5 %, int4 99.8 % / 96 % (int8 scales
# x1.25; caught by the other two); identical 98.4 %, 96.9 %, 98.4 % / 73 %; KL int8 1.9e-4 (fbgemm),
# nf4 1.9e-3, int4 1.6e-4 / int8 broken 0.16, int4 broken (twice a group's scale, seed 0) 0.85
MIN_TOKENS = {"int8": 0.97, "nf4": 0.97, "int4": 0.95}  # int4: the bar
MIN_IDENTICAL = {"int8": 0.9, "nf4": 0.9, "int4": 0.9}
MAX_KL = {"int8": 2e-3, "nf4": 1e-2, "int4": 2e-3}  # >= 10x over the worst quantized, >= 9x under the broken


def square_scene(rng: random.Random, size: int = 64):
    """A noisy background with one square of a colour in one quadrant, and its caption."""
    b, c, p = rng.choice(list(BACKGROUNDS)), rng.choice(list(COLOURS)), rng.choice(list(PLACES))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 10, (size, size, 3))
    img = Image.fromarray(np.clip(np.array(BACKGROUNDS[b]) + noise, 0, 255).astype(np.uint8))
    half = size // 2
    s = rng.randint(half // 2, half - 4)
    x, y = PLACES[p][0] * half + rng.randint(0, half - s), PLACES[p][1] * half + rng.randint(0, half - s)
    ImageDraw.Draw(img).rectangle([x, y, x + s - 1, y + s - 1], fill=COLOURS[c])
    return img, f"a {b} with a {c} square"


def train_model(folder, seed: int = 0):
    """-> (trained model in eval mode, processor, held-out images, their captions)."""
    rng = random.Random(seed)
    scenes = [square_scene(rng) for _ in range(N_TRAIN + N_TEST)]
    images, captions = [im for im, _ in scenes], [c for _, c in scenes]
    tok = Tokenizer(train_tokenizer(captions + [PROMPT], folder / "tokenizer", vocab_size=400))
    config = tiny_config(len(tok), tok.image_id, image_size=16)
    processor = Processor(tok, 16, config.num_image_tokens, tok.image_id)
    torch.manual_seed(seed)
    model = PaliGemma(config).init_weights()
    data = processor(images[:N_TRAIN], PROMPT, captions[:N_TRAIN])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.0)  # train.py's
    g = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        rows = torch.randperm(N_TRAIN, generator=g)[:BATCH]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, LR, warmup=20, total=STEPS)
        loss = model.loss(**{k: v[rows] for k, v in data.items()})
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval(), processor, images[N_TRAIN:], captions[N_TRAIN:]


class Reference:
    """The unquantized model's greedy captions of the held-out images, as tokens, and its log-probs
    teacher-forced along them: what every other model is compared with."""

    def __init__(self, model, processor, images):
        self.inputs = processor(images, PROMPT)
        self.eos = processor.tokenizer.eos_id
        self.tokens = self.generate(model)  # (B, L), pad after <eos>
        self.valid = (self.tokens == self.eos).cumsum(1) - (self.tokens == self.eos).long() == 0  # up to <eos>
        self.logprobs = self.teacher_forced(model)  # (K, V), K = valid caption tokens

    def generate(self, model) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(**self.inputs, max_new_tokens=12)

    def captions(self, tokens) -> list[list[int]]:
        return [row[:row.index(self.eos) + 1] if self.eos in row else row for row in tokens.tolist()]

    def teacher_forced(self, model) -> torch.Tensor:
        """log-probs of the next token at each reference caption token, (K, V)."""
        x, P = self.inputs, self.inputs["input_ids"].shape[1]
        forced = dict(input_ids=torch.cat([x["input_ids"], self.tokens], 1), pixel_values=x["pixel_values"],
                      attention_mask=torch.cat([x["attention_mask"], self.valid.long()], 1),
                      token_type_ids=torch.cat([x["token_type_ids"], torch.ones_like(self.tokens)], 1))
        with torch.no_grad():
            logits = model(**forced)[:, P - 1:-1]  # (B, L, V): position P - 1 + t predicts caption token t
        return logits[self.valid].float().log_softmax(-1)

    def compare(self, model) -> dict:
        """Share of caption tokens where `model`'s argmax is the reference's, share of identical greedy
        captions, mean KL(reference || model) per token."""
        logprobs = self.teacher_forced(model)
        ref = self.captions(self.tokens)
        return dict(tokens=(logprobs.argmax(-1) == self.logprobs.argmax(-1)).float().mean().item(),
                    identical=sum(a == b for a, b in zip(self.captions(self.generate(model)), ref)) / len(ref),
                    kl=(self.logprobs.exp() * (self.logprobs - logprobs)).sum(-1).mean().item())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, processor, images, truth = train_model(tmp_path_factory.mktemp("quality"))
    ref = Reference(model, processor, images)
    # the premise: a model that reads the image and is sure of what it read (else this tests nothing)
    said = [processor.decode(row) for row in ref.tokens]
    right = sum(a == b for a, b in zip(said, truth)) / len(truth)
    assert right >= 0.4 and len(set(said)) >= 8, (right, sorted(set(said)))  # measured >= 56 %, >= 11
    assert ref.logprobs.max(-1).values.exp().mean() >= 0.85  # measured >= 0.935
    # and the alignment of the teacher-forced positions: the model's argmax there is its own caption
    assert torch.equal(ref.logprobs.argmax(-1), ref.tokens[ref.valid])
    return model, ref


def passes(r: dict, mode: str) -> bool:
    return r["tokens"] >= MIN_TOKENS[mode] and r["identical"] >= MIN_IDENTICAL[mode] and r["kl"] <= MAX_KL[mode]


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_quantized_captions_stay_those_of_the_unquantized_model(trained, mode):
    model, ref = trained
    r = ref.compare(Q.quantize(copy.deepcopy(model), mode))
    assert passes(r, mode), r


def test_weight_only_int8_keeps_every_caption(trained, monkeypatch):
    """The issue's bar, "int8: 100 % identical captions", holds for int8 weights alone (seeds 0-4: 100 %)
    but not for fbgemm's 8-bit activations on every seed (seed 2: 98.4 %): asserted where it holds."""
    model, ref = trained
    monkeypatch.setattr(Q, "fbgemm_ready", lambda: False)
    r = ref.compare(Q.quantize(copy.deepcopy(model), "int8"))
    assert r["identical"] == 1.0 and r["tokens"] == 1.0, r


def wrong_group_scale(w, group=int4.GROUP):
    """int4 whose every other group dequantizes with twice its scale (a group's scale computed over the
    wrong range). (A neighbouring group's scale instead, an off-by-one in the group index, moved the
    logits by a KL of 3e-5 on a fresh clone: this model's neighbouring groups have near-equal ranges,
    so that slip is harmless here and cannot be caught by any quality threshold.)"""
    parts = int4.quantize_weight(w, group)
    parts["scales_and_zeros"] = parts["scales_and_zeros"].clone()
    parts["scales_and_zeros"][::2, ..., 0] *= 2
    return parts


def swapped_nibbles(w, group=int4.GROUP):
    """int4 with the two codes of every byte swapped (rows i and i + 32 of each block, in torch's layout)."""
    parts = int4.quantize_weight(w, group)
    parts["qweight"] = (parts["qweight"] << 4) | (parts["qweight"] >> 4)
    return parts


@pytest.mark.parametrize("broken", [wrong_group_scale, swapped_nibbles])
def test_thresholds_catch_a_broken_int4(trained, broken, monkeypatch):
    model, ref = trained
    monkeypatch.setattr(Q.Int4Linear, "quantize_weight", staticmethod(broken))
    r = ref.compare(Q.quantize(copy.deepcopy(model), "int4"))
    # measured (seed 0, fresh clone, 2 threads): twice the scale 87.3 % tokens, 51.6 % identical, KL 0.85;
    # swapped nibbles 14.3 %, 0 %, KL 4.9: each caught by all three thresholds
    assert r["tokens"] < MIN_TOKENS["int4"] and r["identical"] < MIN_IDENTICAL["int4"] and r["kl"] > MAX_KL["int4"], r


def test_int8_is_closer_than_nf4(trained, monkeypatch):
    """8 bits per weight with a scale per row err ~18x less than 4 bits per weight with one per 64
    (the errors bound in test_quantize.py): the logits must show it (measured: KL 70-850x smaller).
    Weights alone: with fbgemm's 8-bit activations int8's KL is level with nf4's (0.9-2.4x either way)."""
    model, ref = trained
    monkeypatch.setattr(Q, "fbgemm_ready", lambda: False)
    kl = {mode: ref.compare(Q.quantize(copy.deepcopy(model), mode))["kl"] for mode in ("int8", "nf4")}
    assert kl["int8"] < kl["nf4"], kl


def identical_in_eights(ref: Reference, model) -> float:
    """Share of identical greedy captions decoding 8 images at a time: at <= 16 rows the head decodes from
    its own quantized copy of the table (quantize.FUSED_ROWS), which 64 rows at once never reach."""
    x, got = ref.inputs, []
    with torch.no_grad():
        for i in range(0, len(x["input_ids"]), 8):
            got += ref.captions(model.generate(**{k: v[i:i + 8] for k, v in x.items()}, max_new_tokens=12))
    want = ref.captions(ref.tokens)
    return sum(a == b for a, b in zip(got, want)) / len(want)


@pytest.mark.parametrize("broken", [False, True])
def test_int4_head_keeps_the_captions(trained, broken, monkeypatch):
    """int4 inference's head (its int4 copy of the table; measured: 100 % identical captions, as without
    it), and the same head with the two codes of every byte swapped, which the threshold must catch."""
    model, ref = trained
    if broken:
        original = int4.quantize_weight

        def swapped(w, group=int4.GROUP):
            parts = original(w, group)
            return parts | {"qweight": (parts["qweight"] << 4) | (parts["qweight"] >> 4)}
        monkeypatch.setattr(int4, "quantize_weight", swapped)
    q = Q.quantize(copy.deepcopy(model), "int4", head=True)
    assert isinstance(q.language_model.lm_head, Q.Int4Head)
    identical = identical_in_eights(ref, q)
    assert (identical < MIN_IDENTICAL["int4"]) if broken else (identical >= MIN_IDENTICAL["int4"]), identical
