"""paligemma/probe/knockout.py's layer check at its edges (test_probe.py checks the knockout itself
against transformers): the last decoder layer is a layer, one past it and negative indices are not."""
import pytest
import torch

from paligemma import PaliGemma
from paligemma import probe
from tests.helpers import batch

N_IMG = 16


def test_layers_are_checked_at_both_ends(pg2_dir):
    model = PaliGemma.from_pretrained(pg2_dir)
    n = model.config.text.num_hidden_layers  # 3
    inputs = batch(N_IMG, prompt_lens=(3,), suffix_len=2, seed=5)
    with torch.no_grad():
        plain = model(**inputs)
        with probe.knockout(model, {"suffix": ["image"]}, layers=[n - 1]):
            assert not torch.equal(model(**inputs), plain)  # the last layer is knocked out
    for bad in (n, -1):
        with pytest.raises(ValueError, match=rf"layers \[{bad}\] are not decoder layers: the decoder has {n} layers "
                                             rf"\(0-{n - 1}\)"), probe.knockout(model, {"suffix": "image"}, layers=[bad]):
            pass


@pytest.mark.parametrize("family", ["pg1", "pg2"])  # PG1's prefill runs SDPA, PG2's the spelled-out kernel
def test_positions_over_padding_leave_padding_rows_their_own_key(family, request):
    """Explicit positions are slots of the padded input, so they may cover padding. Padding is in no
    group: slots 0-9 blocked from slots 0-9 in a batch whose first row has 5 padding slots must block
    that row's real slots 5-9 from each other only. Were the padding slots' own edges (each padding
    query's only key) blocked, their softmax would be empty, NaN, and NaN times a zero weight still
    poisons the real rows. By value: the first row equals itself run alone without its padding,
    with the same edges written as unpadded slots 0-4."""
    model = PaliGemma.from_pretrained(request.getfixturevalue(f"{family}_dir"))
    inputs = batch(N_IMG, prompt_lens=(3, 8), suffix_len=3, seed=5)
    pad = int((inputs["attention_mask"][0] == 0).sum())
    assert pad == 5
    alone = {k: v[:1, pad:] if k != "pixel_values" else v[:1] for k, v in inputs.items()}
    with torch.no_grad():
        with probe.knockout(model, {range(10): range(10)}):
            got = model(**inputs)
        with probe.knockout(model, {range(5): range(5)}):
            want = model(**alone)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:1, pad:], want, rtol=1e-5, atol=1e-5)
