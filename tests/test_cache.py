"""The KV cache's bookkeeping: where tokens go, what it counts, its one capacity check; the decode step
every generation loop runs; and gradient checkpointing that keeps the cache."""
import pytest
import torch

from paligemma import PaliGemma
from paligemma.cache import KVCache
from paligemma.generation import decode_step
from tests.helpers import batch


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def model(request):
    return PaliGemma.from_pretrained(request.getfixturevalue(f"{request.param}_dir")).eval()


def test_append_records_flags_and_counts_real_tokens():
    cache = KVCache(batch=2, max_len=6, n_layers=1, n_kv_heads=1, head_dim=2, dtype=torch.float32)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    types = torch.tensor([[0, 0, 1], [0, 0, 0]])
    slots, positions = cache.append(mask, (types == 0) & mask.bool())
    assert slots.tolist() == [0, 1, 2] and cache.length == 3
    assert positions.tolist() == [[1, 1, 2], [1, 2, 3]]  # padding does not shift positions
    assert cache.seen.tolist() == [2, 3]
    slots, positions = cache.append(torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.bool),
                                    slots=torch.tensor([4]))  # a compiled step's slot: the host count is not read
    assert slots.tolist() == [4] and cache.length == 3 and positions.tolist() == [[3], [4]]
    assert cache.valid.tolist() == [[False, True, True, False, True, False], [True, True, True, False, True, False]]
    assert cache.prefix.tolist() == [[False, True, False, False, False, False], [True, True, True, False, False, False]]


def test_one_capacity_check_names_the_sizes(model):
    inputs = batch(16, prompt_lens=(5,))
    T = inputs["input_ids"].shape[1]
    cache = model.new_cache(1, T + 1)
    with torch.no_grad():
        model(**inputs, cache=cache)
        one = torch.ones(1, 1, dtype=torch.long)
        model(one, attention_mask=one, token_type_ids=one, cache=cache)
        for call in (lambda: model(one, attention_mask=one, token_type_ids=one, cache=cache),
                     lambda: model.attention_inputs(one, one, one, cache=cache)):
            with pytest.raises(ValueError, match=f"KV cache holds {T + 1} tokens; {T + 1} used, 1 more requested"):
                call()
    assert cache.length == T + 1 and cache.seen.tolist() == [T + 1]  # the refused call changed nothing


def test_decode_step_is_the_cached_forward(model):
    """generate's step (slot as a tensor) and the model's own cached forward give the same bits."""
    inputs = batch(16, prompt_lens=(3, 6), seed=2)
    B, T = inputs["input_ids"].shape
    a, b = model.new_cache(B, T + 4), model.new_cache(B, T + 4)
    one = torch.ones(B, 1, dtype=torch.long)
    with torch.no_grad():
        model(**inputs, cache=a)
        model(**inputs, cache=b)
        token = torch.tensor([5, 9])
        for _ in range(4):
            want = model(token[:, None], attention_mask=one, token_type_ids=one, cache=a)[:, -1]
            got = decode_step(model, b, token, b.reserve(1))
            assert torch.equal(got, want)
            token = want.argmax(-1)
    assert a.length == b.length and torch.equal(a.seen, b.seen) and torch.equal(a.k, b.k)


def test_checkpointing_keeps_the_cache(model):
    """In training mode with gradient checkpointing, cached decoding still equals one full forward (the
    checkpointed layers used to be called without the cache, so the steps saw no keys)."""
    inputs = batch(16, prompt_lens=(3, 6), suffix_len=4, seed=3)
    B, T = inputs["input_ids"].shape
    P = T - 4
    model.set_gradient_checkpointing(True)
    model.train()
    try:
        full = model(**inputs)
        cache = model.new_cache(B, T)
        outs = [model(inputs["input_ids"][:, :P], inputs["pixel_values"], inputs["attention_mask"][:, :P],
                      inputs["token_type_ids"][:, :P], cache=cache)]
        for t in range(P, T):
            outs.append(model(inputs["input_ids"][:, t:t + 1], attention_mask=inputs["attention_mask"][:, t:t + 1],
                              token_type_ids=inputs["token_type_ids"][:, t:t + 1], cache=cache))
    finally:
        model.set_gradient_checkpointing(False)
        model.eval()
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(torch.cat(outs, 1)[real], full[real], rtol=1e-5, atol=1e-5)
