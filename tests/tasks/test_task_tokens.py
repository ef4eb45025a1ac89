"""The tiny tokenizer can carry PaliGemma's 1024 <loc> and 128 <seg> tokens as single pieces, without
changing what it learns for the rest of the text."""
import random

import pytest

from paligemma.captioning.synthetic import scene
from paligemma.tokenizer import LOC_TOKENS, SEG_TOKENS, Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    rng = random.Random(0)
    texts = [c for _ in range(200) for c in scene(rng)[1]] + ["caption en"]
    d = tmp_path_factory.mktemp("tok")
    return Tokenizer(train_tokenizer(texts, d / "plain", 300)), Tokenizer(train_tokenizer(texts, d / "tasks", 300, task_tokens=True))


def test_every_loc_and_seg_token_is_one_piece(tokenizers):
    _, tok = tokenizers
    for t in LOC_TOKENS + SEG_TOKENS:
        (i,) = tok.encode(t)
        assert tok.sp.id_to_piece(i) == t
    text = "<loc0012><loc0345><loc0678><loc1023> plane ; <seg000><seg127> tank"
    ids = tok.encode(text)
    assert [tok.sp.id_to_piece(i) for i in ids[:4]] == ["<loc0012>", "<loc0345>", "<loc0678>", "<loc1023>"]
    assert tok.decode(ids + [tok.eos_id]) == text


def test_the_other_pieces_are_unchanged(tokenizers):
    plain, tok = tokenizers
    pieces = lambda t: [t.sp.id_to_piece(i) for i in range(t.sp.get_piece_size())]
    extra = set(LOC_TOKENS + SEG_TOKENS)
    assert [p for p in pieces(tok) if p not in extra] == pieces(plain)
    assert len(tok) == len(plain) + len(extra) and tok.image_id == len(tok) - 1
    assert not extra & set(pieces(plain))  # the caption demo's default tokenizer has none of them
    assert len(plain.encode("<loc0012>")) > 1
