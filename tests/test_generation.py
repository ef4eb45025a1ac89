"""Generation with the KV cache against transformers' generate, token for token."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from paligemma import PaliGemma
from tests.helpers import batch, load_hf, save_hf, tiny_hf_config

N_IMG = 16


GREEDY = dict(prompt_lens=(3, 7, 5), seed=1)
BEAMS = dict(prompt_lens=(3, 7), seed=4)


def eos_prone(folder, inputs):
    """Random tiny models never pick <eos>. The head is tied and <eos> is never an input, so giving
    <eos> the embedding of a token the model does pick for `inputs` (x 1.01) makes <eos> win where
    that token would have been chosen: in some rows, at some step."""
    token = PaliGemma.from_pretrained(folder).generate(**batch(N_IMG, **inputs), max_new_tokens=20)[1, 3]
    state = load_file(folder / "model.safetensors")
    emb = state["language_model.model.embed_tokens.weight"]
    emb[1] = emb[token] * 1.01
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def make_pair(family, tmp_path_factory, inputs):
    folder = eos_prone(save_hf(tiny_hf_config(family), tmp_path_factory.mktemp(family), seed=3), inputs)
    return PaliGemma.from_pretrained(folder), load_hf(folder)


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory, GREEDY)


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def beam_pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory, BEAMS)


def until_eos(row, eos=1):
    row = row.tolist()
    return row[:row.index(eos) + 1] if eos in row else row


def test_greedy_matches_transformers(pair):
    ours, hf = pair
    inputs = batch(N_IMG, **GREEDY)
    T = inputs["input_ids"].shape[1]
    got = ours.generate(**inputs, max_new_tokens=20)
    ref = hf.generate(**inputs, max_new_tokens=20, do_sample=False)[:, T:]
    assert (ref == 1).any() and not (ref == 1).any(1).all()  # some rows stop, some run to the end
    assert got.shape == ref.shape
    assert torch.equal(got, ref)  # both pad with 0 after <eos>


def test_batched_equals_one_by_one(pair):
    ours, _ = pair
    inputs = batch(N_IMG, prompt_lens=(3, 9, 5), seed=2)
    got = ours.generate(**inputs, max_new_tokens=12)
    for i in range(3):
        keep = inputs["attention_mask"][i].bool()
        alone = ours.generate(inputs["input_ids"][i:i + 1, keep], inputs["pixel_values"][i:i + 1],
                              token_type_ids=inputs["token_type_ids"][i:i + 1, keep], max_new_tokens=12)
        assert until_eos(got[i]) == until_eos(alone[0])


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_matches_transformers(beam_pair, num_beams):
    ours, hf = beam_pair
    inputs = batch(N_IMG, **BEAMS)
    T = inputs["input_ids"].shape[1]
    got = ours.generate(**inputs, max_new_tokens=10, num_beams=num_beams)
    ref = hf.generate(**inputs, max_new_tokens=10, num_beams=num_beams, do_sample=False)[:, T:]
    assert (ref == 1).any()  # a hypothesis finishes at <eos>
    for g, r in zip(got, ref):  # transformers pads finished beams with <eos> where pad_id is 0
        assert until_eos(g) == until_eos(r)


def test_sampling_is_seeded_and_respects_top_k(pair):
    ours, _ = pair
    inputs = batch(N_IMG, prompt_lens=(3, 7), seed=5)
    a = ours.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, seed=0)
    b = ours.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, seed=0)
    c = ours.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = ours.generate(**inputs, max_new_tokens=8)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=1, seed=3), greedy)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3), greedy)


def test_sampling_filters_match_transformers():
    """top-k / top-p / temperature on fixed logits keep exactly the tokens transformers' warpers keep."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    from paligemma.generation import _sample
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    ref = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())))
    allowed = torch.isfinite(ref)
    draws = torch.stack([_sample(logits, 0.7, 10, 0.8, torch.Generator().manual_seed(s)) for s in range(300)], 1)
    assert allowed.gather(1, draws).all()
    seen = torch.zeros_like(allowed).scatter(1, draws, True)
    assert torch.equal(seen, allowed)  # and every allowed token does get drawn


def test_caption_command(pg1_tok_dir, tmp_path, capsys):
    """The command prints one caption per image, equal to processor + generate + decode by hand."""
    import numpy as np
    from PIL import Image
    from paligemma.caption import main, one_line
    from paligemma.processor import Processor
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(paths[-1])
    main(["--model", str(pg1_tok_dir), "--max-new-tokens", "5", "--batch-size", "2", *map(str, paths)])
    lines = capsys.readouterr().out.strip().split("\n")
    model, proc = PaliGemma.from_pretrained(pg1_tok_dir), Processor.from_pretrained(pg1_tok_dir)
    expected = proc.batch_decode(model.generate(**proc(paths, "caption en"), max_new_tokens=5))
    assert lines == [f"{p}\t{one_line(e)}" for p, e in zip(paths, expected)]


def test_top_p_boundary_matches_transformers():
    """A token whose cumulative probability (ascending) lands exactly on 1 - top_p is dropped, as in
    transformers (`<=`): four equal logits have exact cumulative probabilities 0.25, 0.5, 0.75, 1, so
    top_p = 0.5 keeps two tokens, not three."""
    from transformers.generation.logits_process import TopPLogitsWarper
    from paligemma.generation import _sample
    logits = torch.zeros(1, 4)
    allowed = torch.isfinite(TopPLogitsWarper(0.5)(None, logits.clone()))
    assert int(allowed.sum()) == 2
    draws = torch.stack([_sample(logits, 1.0, None, 0.5, torch.Generator().manual_seed(s)) for s in range(200)], 1)
    assert torch.equal(torch.zeros_like(allowed).scatter(1, draws, True), allowed)


def probabilities_by_hand(model, inputs, tokens, eos=1):
    """Each new token's probability from one uncached forward over prompt + the new tokens: softmax of the
    logits at the position before it, 0 after the row's <eos>."""
    n = tokens.shape[1]
    ids = torch.cat([inputs["input_ids"], tokens], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1)
    types = torch.cat([inputs["token_type_ids"], torch.ones_like(tokens)], 1)
    logits = model(ids, inputs["pixel_values"], mask, types)[:, -n - 1:-1].float()  # (B, n, V)
    probs = logits.softmax(-1).gather(2, tokens[..., None])[..., 0]
    after_eos = (tokens == eos).cumsum(1) - (tokens == eos).long() > 0
    return probs.masked_fill(after_eos, 0.0)


def check_scores(ours, inputs, stops=True, **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    tokens, probs = ours.generate(**inputs, return_scores=True, **kwargs)
    assert torch.equal(tokens, ours.generate(**inputs, **kwargs))
    assert probs.shape == tokens.shape and probs.dtype == torch.float32
    assert (tokens == 1).any() or not stops  # a row stops: its zeros after <eos> are checked too
    torch.testing.assert_close(probs, probabilities_by_hand(ours, inputs, tokens), atol=1e-5, rtol=1e-4)
    assert (probs[tokens != 0] > 0).all()


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_scores_are_the_models_token_probabilities(pair, mode):
    """return_scores: the probability of each generated token equals a hand computation from the model's
    logits (temperature 1, whatever the sampling temperature), and the tokens are those of return_scores=False."""
    if mode == "greedy":
        check_scores(pair[0], batch(N_IMG, **GREEDY), max_new_tokens=20)
    else:
        check_scores(pair[0], batch(N_IMG, **GREEDY), stops=False, do_sample=True, temperature=1.7, top_k=20, seed=4)


def test_beam_scores_are_the_hypothesis_token_probabilities(beam_pair):
    """Beam search: each token of the returned hypothesis has its probability given that hypothesis' own
    earlier tokens (the beams were reordered and pooled with their probabilities)."""
    check_scores(beam_pair[0], batch(N_IMG, **BEAMS), num_beams=3)


def test_right_padding_is_refused_and_zero_new_tokens_is_empty(pg1_dir):
    """A right-padded row's last position is a pad: the first new token would be read from it. Refused by
    row; and max_new_tokens=0 gives (B, 0) for greedy and beam search alike."""
    model = PaliGemma.from_pretrained(pg1_dir).eval()
    inputs = batch(16, prompt_lens=(3, 7), seed=1)
    right = {k: v.clone() for k, v in inputs.items()}
    for k in ("input_ids", "attention_mask"):  # row 0 (4 pads on the left) moved to the right
        right[k][0] = torch.roll(inputs[k][0], -4)
    with pytest.raises(ValueError, match=r"rows \[0\] end in padding"):
        model.generate(**right, max_new_tokens=3)
    for beams in (1, 2):
        out = model.generate(**inputs, max_new_tokens=0, num_beams=beams)
        assert out.shape == (2, 0)
        tokens, probs = model.generate(**inputs, max_new_tokens=0, num_beams=beams, return_scores=True)
        assert tokens.shape == probs.shape == (2, 0)
