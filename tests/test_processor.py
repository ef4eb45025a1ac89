"""Processor: layout, labels and pixels equal transformers' PaliGemmaProcessor; bad input is named."""

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma.processor import Processor
from tests.helpers import IMAGE_TOKEN, hf_processor


@pytest.fixture(scope="module")
def procs(pg1_tok_dir):
    return Processor.from_pretrained(pg1_tok_dir), hf_processor(pg1_tok_dir)


def images(n, size=(23, 17)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


def test_matches_transformers_with_suffixes(procs):
    ours, hf = procs
    ims = images(3)
    prompts = ["caption en", "describe the river", "caption en"]
    suffixes = ["two planes near the airport", "a bridge", "many green trees and some houses near a lake ."]
    got = ours(ims, prompts, suffixes)
    ref = hf(images=ims, text=prompts, suffix=suffixes, return_tensors="pt", padding="longest")
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(got[key], ref[key]), key
    torch.testing.assert_close(got["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


def test_empty_suffix_is_eos_alone_as_in_transformers(procs):
    """A detection image with none of the asked objects trains on its <eos> alone (the model learns to
    answer nothing): the same ids, types and labels as transformers' processor given suffix ""."""
    ours, hf = procs
    ims, prompts, suffixes = images(2), ["detect plane", "detect plane ; ship"], ["", "a bridge"]
    got = ours(ims, prompts, suffixes)
    ref = hf(images=ims, text=prompts, suffix=suffixes, return_tensors="pt", padding="longest")
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(got[key], ref[key]), key
    assert [t for t in got["labels"][0].tolist() if t != -100] == [ours.tokenizer.eos_id]


def test_matches_transformers_prompt_only(procs):
    ours, hf = procs
    ims = images(2)
    got = ours(ims, ["caption en", "a much longer question about the scene"])
    ref = hf(images=ims, text=["caption en", "a much longer question about the scene"], return_tensors="pt",
             padding="longest")
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["token_type_ids"], ref["token_type_ids"])
    assert "labels" not in got


def test_layout_and_label_mask(procs):
    """Hand-checked: N image tokens, <bos>, prompt, \\n, then suffix + <eos> are the only labels."""
    ours, _ = procs
    t = ours.tokenizer
    out = ours(images(1), ["caption en"], ["a lake"])
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    prompt, suffix = t.encode("caption en\n"), t.encode("a lake")
    assert ids == [IMAGE_TOKEN] * 16 + [t.bos_id] + prompt + suffix + [t.eos_id]
    assert prompt[-1] == t.newline_id
    assert labels == [-100] * (17 + len(prompt)) + suffix + [t.eos_id]
    assert out["token_type_ids"][0].tolist() == [0] * (17 + len(prompt)) + [1] * (len(suffix) + 1)


def test_image_modes(procs, tmp_path):
    ours, hf = procs
    rgb = images(1)[0]
    grey, rgba = rgb.convert("L"), rgb.convert("RGBA")
    rgba.putalpha(128)
    a16 = (np.asarray(grey, dtype=np.uint16) * 257).astype(np.uint16)
    grey16 = Image.fromarray(a16)
    assert grey16.mode.startswith("I")
    for im in (grey, rgba):
        torch.testing.assert_close(ours.pixel_values([im]), hf.image_processor(im, return_tensors="pt")["pixel_values"],
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pixel_values([grey16]), ours.pixel_values([grey]), rtol=0, atol=1e-6)
    path = tmp_path / "x.png"
    rgb.save(path)
    assert torch.equal(ours.pixel_values([path]), ours.pixel_values([rgb]))
    assert ours.pixel_values([rgb]).min() >= -1 and ours.pixel_values([rgb]).max() <= 1


def test_truncation_warns_with_count(procs):
    ours, _ = procs
    long = "many green trees and some houses near a lake " * 3
    n_prefix = len(ours.prefix_ids("caption en"))
    n_suffix = len(ours.tokenizer.encode(long)) + 1
    with pytest.warns(UserWarning, match=f"truncated by {n_suffix - 5} of {n_suffix} tokens"):
        out = ours(images(1), ["caption en"], [long], max_length=n_prefix + 5)
    assert out["input_ids"].shape[1] == n_prefix + 5
    with pytest.raises(ValueError, match="prompt 0: .* do not fit max_length=10"):
        ours(images(1), ["caption en"], [long], max_length=10)


def test_bad_input(procs, tmp_path):
    ours, _ = procs
    with pytest.raises(FileNotFoundError, match="nope.jpg: image file not found"):
        ours([tmp_path / "nope.jpg"], ["caption en"])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg: not a readable image"):
        ours([tmp_path / "bad.jpg"], ["caption en"])
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        ours(images(2), ["caption en", "  "])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        ours(images(2), ["a", "b", "c"])


def test_tokenizer_config_disagreement_is_an_error(pg1_tok_dir):
    from paligemma.tokenizer import Tokenizer
    with pytest.raises(ValueError, match="<image> has id 299 but the model config says image_token_index=5"):
        Processor(Tokenizer(pg1_tok_dir / "tokenizer.model"), 16, 16, image_token_index=5)


# --- issue #27: every kind of decoding error is a ValueError naming the file ---

@pytest.mark.parametrize("kind, why", [("truncated", "OSError"), ("broken chunk", "SyntaxError: broken PNG file"),
                                       ("bomb", "decompression bomb")])
def test_every_decoding_error_names_the_file(procs, tmp_path, kind, why):
    from paligemma.processor import read_image
    from tests.helpers import bad_images
    ours, _ = procs
    path = bad_images(tmp_path)[kind]
    with pytest.raises(ValueError, match=rf"^{path}: .*{why}"):
        read_image(path)
    with pytest.raises(ValueError, match=rf"^{path}: .*{why}"):
        ours([path], ["caption en"])


# --- a bad preprocessor_config.json is named with its field, not a JSONDecodeError or AttributeError ---

@pytest.mark.parametrize("text, why", [
    ("{not json", "not valid JSON"),
    ("[224]", "expected a JSON object, got list"),
    ('{"size": 224}', "field 'size' is 224; expected an object such as"),
    ('{"size": {"height": "224"}}', "field 'size.height' is '224'; expected a positive integer"),
])
def test_a_bad_preprocessor_config_is_named_with_its_field(pg1_tok_dir, tmp_path, text, why):
    import re
    import shutil
    from paligemma.config import ConfigError
    folder = tmp_path / "model"
    shutil.copytree(pg1_tok_dir, folder)
    (folder / "preprocessor_config.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(folder / 'preprocessor_config.json'))}: {re.escape(why)}"):
        Processor.from_pretrained(folder)
    (folder / "preprocessor_config.json").write_text('{"size": {"height": 32, "width": 32}}')
    assert Processor.from_pretrained(folder).image_size == 32


def test_a_prompt_too_long_for_max_length_names_its_image(procs, tmp_path):
    ours, _ = procs
    images(1)[0].save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=rf"prompt 0 \(image {tmp_path / 'a.png'}\): .* do not fit max_length=10"):
        ours([tmp_path / "a.png"], ["caption en"], ["a lake"], max_length=10)
