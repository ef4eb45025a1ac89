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
