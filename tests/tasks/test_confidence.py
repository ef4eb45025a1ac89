"""Each <loc> of a decoded answer gets the probability the model gave it: one piece's own, or the product
of the pieces that spell it."""
import math
import random

import pytest

from paligemma.tasks.confidence import loc_probabilities
from paligemma.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = ["plane ship tank building on a field"] * 50
    return Tokenizer(train_tokenizer(texts, d / "plain", 300)), Tokenizer(train_tokenizer(texts, d / "tasks", 300,
                                                                                          task_tokens=True))


def test_single_pieces_are_looked_up(tokenizers):
    _, tok = tokenizers
    ids = tok.encode("<loc0010><loc0020><loc0500><loc0600> plane ; <loc0001><loc0002><loc0003><loc0004> ship")
    probs = [0.5 + i / 100 for i in range(len(ids))]
    locs = [p for i, p in zip(ids, probs) if tok.sp.id_to_piece(i).startswith("<loc")]
    assert len(locs) == 8
    # after <eos> nothing counts; <pad> and <bos> are not part of the text
    got = loc_probabilities(tok, [tok.bos_id] + ids + [tok.eos_id, 5, 6], [0.1] + probs + [0.9, 0.3, 0.3])
    assert got == locs


def test_a_spelled_out_loc_gets_the_product_of_its_pieces(tokenizers):
    """A <loc> written with small pieces (the tokenizer without task tokens; or "<l" + "oc0002>" from one
    that has them, beside a single-piece one) scores the product of exactly the pieces that make it."""
    plain, tok = tokenizers
    rng = random.Random(0)
    ids = plain.encode("<loc0012> plane")
    probs = [rng.uniform(0.2, 1) for _ in ids]
    n = next(k for k in range(1, len(ids) + 1) if plain.sp.decode(ids[:k]) == "<loc0012>")
    assert n > 1 and loc_probabilities(plain, ids, probs) == [pytest.approx(math.prod(probs[:n]))]
    one, spelled, label = tok.encode("<loc0001>"), tok.encode("<l") + tok.encode("oc0002>"), tok.encode(" x")
    ids = one + spelled + label
    assert tok.sp.decode(ids) == "<loc0001><loc0002> x" and len(one) == 1 and len(spelled) > 1
    probs = [rng.uniform(0.2, 1) for _ in ids]
    assert loc_probabilities(tok, ids, probs) == [probs[0], pytest.approx(math.prod(probs[1:1 + len(spelled)]))]
