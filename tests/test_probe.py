"""python -m paligemma.probe end to end (probe.json against transformers' generate, the page in headless
Chromium), and image_reliance against transformers."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from paligemma import PaliGemma, Processor, probe
from paligemma.probe.__main__ import main
from paligemma.probe.report import VIEW
from tests.helpers import batch, load_hf

N_IMG = 16

def blue_noise(size=64):
    """Only the blue channel varies (so attention does): any red or green over it is the overlay."""
    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[..., 2] = np.random.default_rng(1).integers(60, 255, (size, size))
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def probed(pg1_tok_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    blue = root / "blue.png"
    blue_noise().save(blue)
    (root / "other").mkdir()
    noise = root / "other" / "blue.png"  # same name, another folder: its own report folder
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(noise)
    out = root / "out"
    main(["--model", str(pg1_tok_dir), str(blue), str(noise), "--max-new-tokens", "5", "--out", str(out)])
    return out, [blue, noise]


def test_probe_writes_reports(probed, pg1_tok_dir):
    out, images = probed
    index = (out / "index.html").read_text()
    assert 'href="blue/report.html"' in index and 'href="blue-2/report.html"' in index
    model, processor = PaliGemma.from_pretrained(pg1_tok_dir), Processor.from_pretrained(pg1_tok_dir)
    hf = load_hf(pg1_tok_dir)
    L = model.config.text.num_hidden_layers
    for folder, image in zip(["blue", "blue-2"], images):
        summary = json.loads((out / folder / "probe.json").read_text())
        inputs = processor([image], "caption en")
        T = inputs["input_ids"].shape[1]
        tokens = model.generate(**inputs, max_new_tokens=5)[0].tolist()
        assert summary["tokens"] == tokens and summary["text"] == processor.decode(tokens)
        ref = hf.generate(**inputs, max_new_tokens=5, do_sample=False, output_attentions=True,
                          return_dict_in_generate=True)
        assert ref.sequences[0, T:].tolist() == tokens
        is_image = inputs["input_ids"][0] == model.config.image_token_index
        want = [[float(ref.attentions[i][l][0, :, -1, :T][:, is_image].sum(-1).mean()) for l in range(L)]
                for i in range(len(tokens))]
        assert_close(torch.tensor(summary["image_attention"]), torch.tensor(want), rtol=1e-5, atol=1e-5)
        assert len(summary["top5"]) == len(tokens) and len(summary["logit_lens"][0]) == L
        assert summary["top5"][0][0][1] >= summary["top5"][0][4][1]
        html = (out / folder / "report.html").read_text()
        assert html.startswith("<!doctype html>") and "src=\"http" not in html  # self-contained


def test_image_reliance_against_transformers(pg1_dir):
    model, hf = PaliGemma.from_pretrained(pg1_dir), load_hf(pg1_dir)
    inputs = batch(N_IMG, prompt_lens=(3, 6), seed=7)
    caption = torch.tensor([[17, 40, 1, 0], [33, 12, 90, 5]])  # row 0 ends at <eos>, then padding
    rel = probe.image_reliance(model, caption=caption, **inputs)
    assert rel["real"].tolist() == [[True, True, True, False], [True, True, True, True]]
    T = inputs["input_ids"].shape[1]
    full = dict(input_ids=torch.cat([inputs["input_ids"], caption], 1), pixel_values=inputs["pixel_values"],
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(caption)], 1),
                token_type_ids=torch.cat([inputs["token_type_ids"], torch.ones_like(caption)], 1))
    positions = full["attention_mask"].cumsum(-1).clamp(min=1)

    def hf_log_probs():
        with torch.no_grad():
            logits = hf(**full, position_ids=positions).logits[:, T - 1:-1]
        return logits.log_softmax(-1).gather(-1, caption[..., None])[..., 0]

    assert_close(rel["with_image"], hf_log_probs(), rtol=1e-5, atol=1e-5)
    handle = hf.model.multi_modal_projector.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        assert_close(rel["without_image"], hf_log_probs(), rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
    assert not torch.allclose(rel["with_image"], rel["without_image"], atol=1e-3)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian: chromium) not installed")
def test_report_renders_in_chromium(probed, pg1_tok_dir, tmp_path):
    """Screenshots of the page over the blue image (red channel 0): as it opens (token 0, layers and heads
    averaged) and at one layer and head, the overlay's red follows the recorded attention patch by patch,
    clear at the least attended patch, and nothing is drawn outside the image."""
    out, images = probed
    model, processor = PaliGemma.from_pretrained(pg1_tok_dir), Processor.from_pretrained(pg1_tok_dir)
    inputs = processor([images[0]], "caption en")
    rec = probe.generate(model, **inputs, max_new_tokens=1, names=["*.self_attn.hook_pattern"])
    step = rec.step(0)
    heat = torch.stack([probe.image_grid(model, step[f"language_model.model.layers.{l}.self_attn.hook_pattern"][:, :, 0],
                                         rec.input_ids)[0] for l in range(model.config.text.num_hidden_layers)])
    side, cell = heat.shape[-1], VIEW["size"] / heat.shape[-1]  # heat (L, H, side, side)

    def screenshot(view: str):
        shot = tmp_path / "shot.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--force-device-scale-factor=1", "--window-size=1200,900", f"--screenshot={shot}",
                        (out / "blue" / "report.html").as_uri() + view], check=True, capture_output=True, timeout=120)
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        rows = [int(VIEW["top"] + (r + 0.5) * cell) for r in range(side)]
        cols = [int(VIEW["left"] + (c + 0.5) * cell) for c in range(side)]
        return pixels, pixels[rows][:, cols]  # whole page, patch centres (side, side, 3)

    pixels, centres = screenshot("")
    first = heat.mean((0, 1))
    hi, lo = np.unravel_index(int(first.argmax()), first.shape), np.unravel_index(int(first.argmin()), first.shape)
    assert centres[hi][0] > 150 and centres[lo][0] < 30  # red where it looks most; the image (red 0) where least
    assert tuple(pixels[VIEW["top"] + VIEW["size"] + 20, VIEW["left"] + 10]) == (255, 255, 255)  # not below it
    layer, head = 1, 2
    _, centres = screenshot(f"#token=0&layer={layer}&head={head}")
    grid = heat[layer, head]
    order = grid.flatten().argsort()
    redness = torch.tensor(centres[..., 0].reshape(-1)[order.numpy()])  # red channel, by recorded attention
    assert redness[-1] > 150 and redness[0] < 30
    assert (redness.diff() >= -2).all()  # more attention, more red (up to the colour rounding)
