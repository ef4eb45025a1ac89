"""paligemma/inference.py's promises, against the one-batch path they are built from: caption() and
caption_files() give each image the caption it gets alone (the last short batch included), a sampled
caption depends on its image's index, not on the batching, a bad file of any kind leaves the rest
captioned, and load_for_inference applies the adapter it is given."""
import numpy as np
import pytest
import torch
from PIL import Image

import lora
from paligemma import PaliGemma
from paligemma.inference import batches, caption, caption_batch, caption_files, load_for_inference

GREEDY = dict(max_new_tokens=4)
SAMPLED = dict(max_new_tokens=8, do_sample=True, temperature=2.0)


@pytest.fixture(scope="module")
def loaded(pg1_tok_dir):
    return load_for_inference(str(pg1_tok_dir))


def images(folder, n):
    paths = []
    for i in range(n):
        paths.append(folder / f"im{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_batches_cover_every_item_once_in_order():
    assert list(batches(list("abcde"), 2)) == [(0, ["a", "b"]), (2, ["c", "d"]), (4, ["e"])]
    assert list(batches(list("ab"), 5)) == [(0, ["a", "b"])]


def test_caption_in_batches_equals_each_image_alone(loaded, tmp_path):
    model, processor = loaded
    paths = images(tmp_path, 5)
    alone = [caption_batch(model, processor, [p], "caption en", **GREEDY)[0] for p in paths]
    assert list(caption(model, processor, paths, batch_size=2, **GREEDY)) == alone  # 2 + 2 + 1


def test_sampled_caption_depends_on_the_image_index_not_the_batching(loaded, tmp_path):
    """The batch starting at image i samples with seed + i: with batches of one, image i's caption is
    caption_batch's with seed 7 + i, and a run that starts one image later (seed 8) gives the same
    captions to the same images. The seeds differ in what they sample (checked), so a seed reused
    for every batch would show."""
    model, processor = loaded
    paths = images(tmp_path, 3)
    by_hand = [caption_batch(model, processor, [p], "caption en", seed=7 + i, **SAMPLED)[0] for i, p in enumerate(paths)]
    assert caption_batch(model, processor, [paths[1]], "caption en", seed=7, **SAMPLED)[0] != by_hand[1]
    assert list(caption(model, processor, paths, batch_size=1, seed=7, **SAMPLED)) == by_hand
    assert list(caption(model, processor, paths[1:], batch_size=1, seed=8, **SAMPLED)) == by_hand[1:]


def test_caption_files_names_each_bad_file_and_captions_the_rest(loaded, tmp_path):
    """A file that is no image (a ValueError from the decoder) and a missing one (an OSError), between
    good ones, batch size 2: every good image gets its own caption, every bad one its error, in order."""
    model, processor = loaded
    good = images(tmp_path, 3)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths = [good[0], tmp_path / "bad.jpg", good[1], tmp_path / "missing.png", good[2]]
    out = list(caption_files(model, processor, paths, batch_size=2, **GREEDY))
    alone = [caption_batch(model, processor, [p], "caption en", **GREEDY)[0] for p in good]
    assert [p for p, _, _ in out] == paths
    assert [t for _, t, e in out if e is None] == alone
    errors = {p: e for p, _, e in out if e is not None}
    assert list(errors) == [tmp_path / "bad.jpg", tmp_path / "missing.png"]
    assert isinstance(errors[tmp_path / "bad.jpg"], ValueError) and isinstance(errors[tmp_path / "missing.png"], OSError)


def test_load_for_inference_applies_the_adapter(pg1_tok_dir, loaded, tmp_path):
    """An adapter with non-zero B (so it changes the logits): the model loaded with it computes what the
    model it was saved from computes, and not what the base computes."""
    base, processor = loaded
    model = PaliGemma.from_pretrained(str(pg1_tok_dir))  # plain layers, for inject
    lora.inject(model, "decoder", r=2, alpha=4)
    torch.manual_seed(0)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    lora.save(model, tmp_path / "adapter")
    with_adapter, _ = load_for_inference(str(pg1_tok_dir), adapter=str(tmp_path / "adapter"))
    inputs = processor(images(tmp_path, 1), "caption en")
    with torch.no_grad():
        want, got, plain = (m(**inputs) for m in (model, with_adapter, base))
    assert (want - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
