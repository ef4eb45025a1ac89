"""python -m paligemma.probe end to end (probe.json against transformers' generate, the page in headless
Chromium), image_ablation, knockout and patch sweeps against transformers or plain loops."""
import contextlib
import html
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from paligemma import PaliGemma, Processor, probe
from paligemma.cli import run
from paligemma.probe.__main__ import main
from paligemma.probe.report import VIEW
from tests.helpers import IMAGE_TOKEN, batch, load_hf

N_IMG = 16
LAYER = "language_model.model.layers.{}."


def blue_noise(size=64):
    """Only the blue channel varies (so attention does): any red or green over it is the overlay."""
    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[..., 2] = np.random.default_rng(1).integers(60, 255, (size, size))
    return Image.fromarray(a)


def bad_images(root) -> list:
    """Files PIL cannot decode: truncated, a chunk with a broken checksum, a decompression bomb (a header
    claiming 40000 x 40000 pixels), missing."""
    good = io.BytesIO()
    blue_noise().save(good, format="PNG")
    data = good.getvalue()
    (root / "truncated.png").write_bytes(data[:len(data) // 2])
    broken = bytearray(data)
    i = broken.index(b"IHDR")
    broken[i + 4 + 13] ^= 0xFF  # the header chunk's CRC
    (root / "broken.png").write_bytes(bytes(broken))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return [root / "truncated.png", root / "broken.png", root / "bomb.png", root / "missing.png"]


@pytest.fixture(scope="module")
def probed(pg1_tok_dir, tmp_path_factory):
    """The command on two good images with the same name and four bad ones between them."""
    root = tmp_path_factory.mktemp("probe")
    blue = root / "blue.png"
    blue_noise().save(blue)
    (root / "other").mkdir()
    noise = root / "other" / "blue.png"  # same name, another folder: its own report folder
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(noise)
    bad = bad_images(root)
    out = root / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["--model", str(pg1_tok_dir), str(blue), *map(str, bad), str(noise), "--max-new-tokens", "5",
                     "--out", str(out)])
    return out, [blue, noise], bad, code, stderr.getvalue()


def test_probe_writes_reports(probed, pg1_tok_dir):
    out, images, _, _, _ = probed
    index = (out / "index.html").read_text()
    assert 'href="blue/report.html"' in index and 'href="blue-2/report.html"' in index
    assert index.count('<img src="data:image/png;base64,') == 2  # thumbnails
    model, processor = PaliGemma.from_pretrained(pg1_tok_dir), Processor.from_pretrained(pg1_tok_dir)
    hf = load_hf(pg1_tok_dir)
    L = model.config.text.num_hidden_layers
    for folder, image in zip(["blue", "blue-2"], images):
        summary = json.loads((out / folder / "probe.json").read_text())
        assert html.escape(summary["text"]) in index  # each caption beside its thumbnail
        inputs = processor([image], "caption en")
        T = inputs["input_ids"].shape[1]
        tokens = model.generate(**inputs, max_new_tokens=5)[0].tolist()
        assert summary["tokens"] == tokens and summary["text"] == processor.decode(tokens)
        ref = hf.generate(**inputs, max_new_tokens=5, do_sample=False, output_attentions=True,
                          return_dict_in_generate=True)
        assert ref.sequences[0, T:].tolist() == tokens
        # attention shares: transformers' attentions summed over the key groups read from the ids
        labels = id_groups(inputs, generated=len(tokens))[0]  # (T + n,)
        want = torch.tensor([[[float(ref.attentions[i][l][0, :, -1][:, labels[:T + i] == g].sum(-1).mean())
                               for g in range(4)] for l in range(L)] for i in range(len(tokens))])
        got = torch.tensor(summary["attention_shares"])
        assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert_close(got.sum(-1), torch.ones(len(tokens), L), rtol=0, atol=1e-5)
        assert (got[1:, :, 3] > 0).all() and (got[0, :, 3] == 0).all()  # the caption so far: none at token 0
        assert_close(torch.tensor(summary["image_attention"]), want[..., 0], rtol=1e-5, atol=1e-5)
        assert len(summary["top5"]) == len(tokens) and len(summary["logit_lens"][0]) == L
        assert summary["top5"][0][0][1] >= summary["top5"][0][4][1]
        # the knocked-out caption: transformers' generate with caption -> image masked in every layer
        with hf_blocked(hf, by_group(id_groups(inputs, generated=5), [(3, 0)]), range(L)):
            blind = hf.generate(**inputs, max_new_tokens=5, do_sample=False)[0, T:].tolist()
        assert summary["knockout"][0] == dict(first_layer=0, text=processor.decode(blind))
        page = (out / folder / "report.html").read_text()
        assert page.startswith("<!doctype html>") and "src=\"http" not in page  # self-contained


def test_probe_finishes_the_readable_images(probed):
    """Unreadable files are named one line each and skipped; the good ones after them are reported; exit 1."""
    out, _, bad, code, stderr = probed
    assert code == 1
    lines = stderr.strip().splitlines()
    for path in bad:
        assert sum(str(path) in line for line in lines) == 2  # its own line, and the summary's list
    assert "decompression bomb" in stderr and "4 of 6 images could not be read" in lines[-1]
    assert all(line.startswith("paligemma.probe: ") for line in lines)
    assert (out / "blue-2" / "report.html").exists() and not (out / "bomb").exists()


def test_probe_command_errors(probed, pg1_tok_dir, tmp_path, capsys):
    out, images, _, _, _ = probed
    before = (out / "index.html").read_text()
    with pytest.raises(SystemExit) as e:  # an earlier run is not replaced without a word, checked before loading
        run(main, "paligemma.probe", ["--model", str(tmp_path / "absent"), str(images[0]), "--out", str(out)])
    assert "index.html exists" in str(e.value) and "--overwrite" in str(e.value)
    assert (out / "index.html").read_text() == before
    for n in ("0", "-3"):
        with pytest.raises(SystemExit):
            main(["--model", str(pg1_tok_dir), str(images[0]), "--out", str(tmp_path / "o"), "--max-new-tokens", n])
        assert f"--max-new-tokens: expected an integer >= 1, got '{n}'" in capsys.readouterr().err
    again = tmp_path / "again"
    assert main(["--model", str(pg1_tok_dir), str(images[0]), "--out", str(again), "--max-new-tokens", "2"]) == 0
    assert main(["--model", str(pg1_tok_dir), str(images[1]), "--out", str(again), "--max-new-tokens", "2",
                 "--overwrite"]) == 0
    assert "blue.png" in (again / "index.html").read_text()
    # the command ends through cli.run: one line, exit 1
    done = subprocess.run([sys.executable, "-m", "paligemma.probe", "--model", str(tmp_path / "absent"), str(images[0]),
                           "--out", str(tmp_path / "p")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("paligemma.probe: ") and "absent" in done.stderr


def test_image_ablation_against_transformers(pg1_dir):
    model, hf = PaliGemma.from_pretrained(pg1_dir), load_hf(pg1_dir)
    inputs = batch(N_IMG, prompt_lens=(3, 6), seed=7)
    caption = torch.tensor([[17, 40, 1, 0], [33, 12, 90, 5]])  # row 0 ends at <eos>, then padding
    rel = probe.image_ablation(model, caption=caption, **inputs)
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
    with pytest.warns(DeprecationWarning, match="image_ablation"):  # the old name, kept for a while
        old = probe.image_reliance(model, caption=caption, **inputs)
    assert all(torch.equal(old[k], rel[k]) for k in rel)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian: chromium) not installed")
def test_report_renders_in_chromium(probed, pg1_tok_dir, tmp_path):
    """Screenshots of the page over the blue image (red channel 0): as it opens (token 0, layers and heads
    averaged) and at one layer and head, the overlay's red follows the recorded attention patch by patch,
    clear at the least attended patch, and nothing is drawn outside the image."""
    out, images, _, _, _ = probed
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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian: chromium) not installed")
def test_report_shows_attention_shares_in_chromium(probed):
    """The page as Chromium built it (its DOM after the scripts ran): one stacked bar per generated token
    and layer whose four parts show the recorded shares, add up to 1 and fill the bar; token labels under
    the image-reliance bars; the knocked-out captions."""
    out, _, _, _, _ = probed
    summary = json.loads((out / "blue" / "probe.json").read_text())
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (out / "blue" / "report.html").as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    panel = re.search(r'<svg id="shares"[^>]*>(.*?)</svg>', dom, re.S).group(1)  # the element, not the script
    bars = {}
    for rect in re.findall(r'<rect class="share"([^>]*)>', panel):
        a = dict(re.findall(r'([\w-]+)="([^"]*)"', rect))
        bars.setdefault((int(a["data-token"]), int(a["data-layer"])), []).append(
            (int(a["data-group"]), float(a["data-share"]), float(a["width"])))
    n, L = len(summary["tokens"]), summary["layers"]
    assert sorted(bars) == [(t, l) for t in range(n) for l in range(L)]
    width = re.search(r"CW = (\d+)", dom)
    for (t, l), parts in bars.items():
        assert [g for g, _, _ in parts] == [0, 1, 2, 3]
        assert [v for _, v, _ in parts] == pytest.approx(summary["attention_shares"][t][l], abs=1e-12)
        assert sum(v for _, v, _ in parts) == pytest.approx(1, abs=1e-5)
        assert sum(w for _, _, w in parts) == pytest.approx(int(width.group(1)) - 2, abs=1e-3)
    shown = re.search(r'<svg id="rel"[^>]*>(.*?)</svg>', dom, re.S).group(1)
    labels = [html.unescape(x) for x in re.findall(r'<text class="lab"[^>]*>([^<]*)</text>', shown)]
    real = summary["reliance"]["real"]
    assert labels == [p for p, r in zip(summary["pieces"], real) if r]
    knock = re.search(r'<p id="knock">(.*?)</p>', dom, re.S).group(1)
    assert html.escape(summary["knockout"][0]["text"], quote=False) in knock


# ---- knockout: against transformers' eager attention with the edges removed from its 4-D mask ----

GROUP = dict(image=0, bos=1, prompt=2, suffix=3)


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def pair(request):
    folder = request.getfixturevalue(f"{request.param}_dir")
    return PaliGemma.from_pretrained(folder), load_hf(folder)


def id_groups(inputs, generated=0):
    """(B, T + generated) group labels read from the ids (the reference's own): 0 image, 1 <bos>, 2 prompt,
    3 suffix and generated tokens, -1 padding."""
    ids, types = inputs["input_ids"], inputs["token_type_ids"]
    labels = torch.full(ids.shape, 2)
    labels[ids == IMAGE_TOKEN] = 0
    labels[ids == 2] = 1
    labels[types == 1] = 3
    labels[inputs["attention_mask"] == 0] = -1
    return torch.cat([labels, torch.full((ids.shape[0], generated), 3)], 1)


@contextlib.contextmanager
def hf_blocked(hf, blocked, layers):
    """transformers' eager attention, with blocked(query positions (Tq,), key positions (S,)) -> (B, Tq, S)
    set to the mask's minimum in its 4-D additive mask in decoder layers `layers`. Keys of a call are the
    last S of the tokens embedded so far (its sliding-window cache keeps only the window)."""
    import transformers.models.gemma.modeling_gemma as gemma
    import transformers.models.gemma2.modeling_gemma2 as gemma2
    seen = [0]
    handle = hf.model.language_model.embed_tokens.register_forward_hook(
        lambda m, args, out: seen.__setitem__(0, seen[0] + args[0].shape[1]))
    originals = {mod: mod.eager_attention_forward for mod in (gemma, gemma2)}

    def masked(original):
        def eager(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx in layers:
                Tq, S, total = query.shape[2], key.shape[2], seen[0]
                edges = blocked(torch.arange(total - Tq, total), torch.arange(total - S, total))
                attention_mask = attention_mask.masked_fill(edges[:, None], torch.finfo(attention_mask.dtype).min)
            return original(module, query, key, value, attention_mask, **kwargs)
        return eager

    try:
        for mod, original in originals.items():
            mod.eager_attention_forward = masked(original)
        yield
    finally:
        handle.remove()
        for mod, original in originals.items():
            mod.eager_attention_forward = original


def by_group(labels, pairs):
    """[(query group, key group)] -> blocked(q, k) for hf_blocked."""
    def blocked(q, k):
        out = torch.zeros(labels.shape[0], len(q), len(k), dtype=torch.bool)
        for qg, kg in pairs:
            out |= (labels[:, q] == qg)[:, :, None] & (labels[:, k] == kg)[:, None, :]
        return out
    return blocked


def hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs, position_ids=inputs["attention_mask"].cumsum(-1).clamp(min=1)).logits


KNOCKOUTS = [  # (block, layers, the same edges as (query group, key group) pairs)
    ({"suffix": ["image"]}, [1], [(3, 0)]),
    ({"suffix": ["image", "bos"], "prompt": "image"}, None, [(3, 0), (3, 1), (2, 0)]),
    ({"prompt": ["prompt"], "image": "bos"}, [0], [(2, 2), (0, 1)]),
]


@pytest.mark.parametrize("block,layers,pairs", KNOCKOUTS)
def test_knockout_matches_hand_masked_transformers(pair, block, layers, pairs):
    """Left-padded rows of 3 and 8 prompt tokens and a 3-token suffix; PG1's prefill runs SDPA, PG2's the
    spelled-out soft-capped kernel with sliding windows of 8 on layers 0 and 2."""
    ours, hf = pair
    inputs = batch(N_IMG, prompt_lens=(3, 8), suffix_len=3, seed=5)
    real = inputs["attention_mask"].bool()
    with torch.no_grad(), probe.knockout(ours, block, layers=layers):
        got = ours(**inputs)
    everywhere = range(ours.config.text.num_hidden_layers) if layers is None else layers
    with hf_blocked(hf, by_group(id_groups(inputs), pairs), everywhere):
        want = hf_logits(hf, inputs)
    assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[real], hf_logits(hf, inputs)[real], atol=1e-3)  # it did block something


def test_knockout_by_positions(pair):
    """Explicit positions: the last two suffix tokens may not see the first 10 image patches of either row."""
    ours, hf = pair
    inputs = batch(N_IMG, prompt_lens=(3, 8), suffix_len=3, seed=5)
    T, pad = inputs["input_ids"].shape[1], (1 - inputs["attention_mask"]).sum(1)
    keys = sorted({int(p) + j for p in pad for j in range(10)})
    with torch.no_grad(), probe.knockout(ours, {(T - 2, T - 1): keys}):
        got = ours(**inputs)

    def blocked(q, k):
        return (torch.isin(q, torch.tensor([T - 2, T - 1]))[:, None] & torch.isin(k, torch.tensor(keys))).expand(2, -1, -1)

    with hf_blocked(hf, blocked, range(ours.config.text.num_hidden_layers)):
        want = hf_logits(hf, inputs)
    real = inputs["attention_mask"].bool()
    assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_knockout_generation_matches_step_by_step_masking(pair):
    """Greedy decoding with caption -> image and prompt -> <bos> blocked in layers 0-1: the same tokens and
    step logits as transformers' generate with the edges masked at every step (new tokens are suffix);
    the recorded patterns hold exactly 0 on the blocked edges."""
    ours, hf = pair
    inputs = batch(N_IMG, prompt_lens=(3, 8), seed=6)
    T, n = inputs["input_ids"].shape[1], 8
    with probe.knockout(ours, {"suffix": ["image"], "prompt": ["bos"]}, layers=[0, 1]):
        rec = probe.generate(ours, **inputs, max_new_tokens=n, names=["*.self_attn.hook_pattern"])
    labels = id_groups(inputs, generated=n)
    with hf_blocked(hf, by_group(labels, [(3, 0), (2, 1)]), [0, 1]):
        ref = hf.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(rec.tokens, ref.sequences[:, T:])
    assert_close(rec.logits, torch.stack(ref.logits, 1), rtol=1e-5, atol=1e-5)
    plain = probe.generate(ours, **inputs, max_new_tokens=n, names=["*.self_attn.hook_pattern"])
    assert not torch.allclose(rec.logits[:, 1:], plain.logits[:, 1:], atol=1e-3)
    image = labels[:, :T + n] == 0
    for i in range(1, n):  # decoding steps: the query is a caption token
        for l in (0, 1):
            on_image = [(r.step(i)[LAYER.format(l) + "self_attn.hook_pattern"][:, :, 0, :T + n] * image[:, None]).sum(-1)
                        for r in (rec, plain)]  # (B, H) each
            assert (on_image[0] == 0).all()
            assert l == 0 or (on_image[1] > 0).all()  # layer 1 attends to all keys (PG2: layer 0 slides)


def test_knockout_of_nothing_is_bit_identical_and_restores(pair):
    ours, _ = pair
    inputs = batch(N_IMG, prompt_lens=(3, 8), suffix_len=3, seed=5)
    with torch.no_grad():
        plain = ours(**inputs)
        tokens = ours.generate(**inputs, max_new_tokens=4)
        with probe.knockout(ours, {"prompt": ["suffix"], "image": ["suffix"]}):  # the prefix never sees the suffix
            assert torch.equal(ours(**inputs), plain)
            assert torch.equal(ours.generate(**inputs, max_new_tokens=4), tokens)
        with pytest.raises(RuntimeError, match="inside"), probe.knockout(ours, {"suffix": "image"}):
            raise RuntimeError("inside")
        assert "attention_inputs" not in ours.__dict__
        assert not any(m._forward_pre_hooks for m in ours.modules())
        assert torch.equal(ours(**inputs), plain)


def test_knockout_errors(pg2_dir):
    model = PaliGemma.from_pretrained(pg2_dir)
    inputs = batch(N_IMG, prompt_lens=(3, 8), suffix_len=3, seed=5)
    everything = ["image", "bos", "prompt", "suffix"]  # row 0: 5 padding, 16 image tokens, <bos> at slot 21
    with pytest.raises(ValueError, match=r"query slot 21 \(row 0, group 'bos'\) nothing to attend to in layers \[1\]"):
        with torch.no_grad(), probe.knockout(model, {"bos": everything}, layers=[1]):
            model(**inputs)
    # sliding layer 0 (window 8): the first suffix token sees only prompt tokens and itself
    with pytest.raises(ValueError, match=r"group 'suffix'\) nothing to attend to in layers \[0\]"):
        with torch.no_grad(), probe.knockout(model, {"suffix": ["prompt", "suffix"]}, layers=[0, 1]):
            model(**inputs)
    for block, layers, message in [({"caption": "image"}, None, "neither a group name"),
                                   ({"suffix": "image"}, [3], r"layers \[3\] are not decoder layers"),
                                   ({"suffix": []}, None, "non-empty")]:
        with pytest.raises(ValueError, match=message), probe.knockout(model, block, layers=layers):
            pass


# ---- patch sweeps: against a plain loop of single-site patches ----

def clean_and_corrupted(model):
    """One row: image, <bos>, 6 prompt tokens, 2 suffix tokens; the corrupted input has another image.
    target: the clean run's top token against the token the corrupted run favours most over it."""
    clean = batch(N_IMG, prompt_lens=(6,), suffix_len=2, seed=1)
    corrupted = dict(clean, pixel_values=batch(N_IMG, prompt_lens=(6,), suffix_len=2, seed=2)["pixel_values"])
    with torch.no_grad():
        a, b = model(**clean)[0, -1], model(**corrupted)[0, -1]
    return clean, corrupted, (int(a.argmax()), int((b - a).argmax()))


@pytest.mark.parametrize("positions", ["groups", "each"])
def test_patch_sweep_equals_a_loop_of_single_patches(pair, positions):
    """Every cell equals the corrupted forward with that one site, layer and position set replaced by the
    clean value (probe.hooks), normalised by the plain clean and corrupted forwards: bit for bit. (Both
    read the last position's logits one row at a time; see patching._last_logits.) Batches of 7 rows
    split every layer's runs unevenly."""
    model, _ = pair
    clean, corrupted, (good, bad) = clean_and_corrupted(model)
    sites = ("resid_post", "attn_out", "mlp_out", "resid_mid") if positions == "groups" else ("attn_out", "resid_post")
    sweep = probe.patch_sweep(model, clean, corrupted, (good, bad), sites=sites, positions=positions, batch_size=7)
    columns = list(probe.sweep_columns(model, clean, positions).values())
    L = model.config.text.num_hidden_layers
    assert sweep.shape == (len(sites), L, len(columns))
    assert len(columns) == (4 if positions == "groups" else clean["input_ids"].shape[1])

    def score(inputs):
        with torch.no_grad():
            logits = model.language_model.logits(model.hidden_states(**inputs)[0, -1])
        return logits[good] - logits[bad]

    _, cache = probe.run_with_cache(model, **clean)
    top, bottom = score(clean), score(corrupted)
    want = torch.empty_like(sweep)
    for i, site in enumerate(sites):
        for l in range(L):
            for c, where in enumerate(columns):
                def patch(x, name, where=where):
                    x = x.clone()
                    x[:, where] = cache[name][:, where]
                    return x

                with probe.hooks(model, {LAYER.format(l) + "hook_" + site: patch}):
                    want[i, l, c] = (score(corrupted) - bottom) / (top - bottom)
    assert torch.equal(sweep, want)
    assert sweep.std() > 0.05  # a sweep with something in it


def test_patch_sweep_ends(pair):
    """Restoring resid_post at every position restores the clean output at every layer: exactly 1; the last
    layer's resid_post at the last position alone, too. PG2's last layer slides (window 8): the last
    position cannot see the image there, so patching the image's input to it changes nothing: exactly 0."""
    model, _ = pair
    clean, corrupted, target = clean_and_corrupted(model)
    T, L = clean["input_ids"].shape[1], model.config.text.num_hidden_layers
    sweep = probe.patch_sweep(model, clean, corrupted, target, sites=("resid_post",),
                              positions={"all": range(T), "last": [-1], "image": range(N_IMG)})
    assert torch.equal(sweep[0, :, 0], torch.ones(L))
    assert sweep[0, -1, 1] == 1
    if model.language_model.model.layers[-1].sliding:
        assert sweep[0, -2, 2] == 0
        assert sweep[0, 0, 2] != 0  # through the full layer in between, the image matters


def test_patch_sweep_errors(pg1_dir):
    model = PaliGemma.from_pretrained(pg1_dir)
    clean, corrupted, target = clean_and_corrupted(model)
    two = batch(N_IMG, prompt_lens=(6, 6), suffix_len=2, seed=1)
    longer = batch(N_IMG, prompt_lens=(7,), suffix_len=2, seed=2)
    for args, kwargs, message in [((clean, longer, target), {}, "same fields and shapes"),
                                  ((two, two, target), {}, "batch 1"),
                                  ((clean, corrupted, target), dict(sites=("resid_pre",)), "unknown sites"),
                                  ((clean, corrupted, target), dict(positions="every"), "positions must be"),
                                  ((clean, corrupted, (target[0], target[0])), {}, "no difference to restore"),
                                  ((clean, corrupted, "red"), {}, "target must be")]:
        with pytest.raises(ValueError, match=message):
            probe.patch_sweep(model, *args, **kwargs)


def test_plot_sweep(pg1_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="plot_sweep needs the plot extra (matplotlib)")
    sweep = torch.linspace(-0.2, 1, 3 * 2 * 4).view(3, 2, 4)
    fig = probe.plot_sweep(sweep, columns=["image", "bos", "prompt", "suffix"], title="t")
    assert len(fig.axes) == 4  # three heatmaps and the colour bar
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["image", "bos", "prompt", "suffix"]
    fig.savefig(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


# ---- detect answers (#20 item 6): boxes on the image, where the model looked when it wrote each <loc> ----

FORCED = ("<loc0128><loc0256><loc0640><loc0768> plane ; <loc0000><loc0512><loc0384><loc1023> ship ; "
          "<loc0256><loc0128> ship")  # <loc> values on multiples of 128: box edges fall between patch centres


@pytest.fixture(scope="module")
def probed_boxes(task_tok_dir, tmp_path_factory):
    """The command on an 80 x 48 blue-noise image whose answer is forced to FORCED: two boxes and a
    malformed piece (two <loc> tokens)."""
    import paligemma.probe.__main__ as command
    root = tmp_path_factory.mktemp("probeboxes")
    a = np.zeros((48, 80, 3), dtype=np.uint8)
    a[..., 2] = np.random.default_rng(1).integers(60, 255, (48, 80))
    Image.fromarray(a).save(root / "scene.png")
    load, stack = command.load_for_inference, contextlib.ExitStack()

    def forced(*args, **kwargs):  # a random model writes no boxes: its answer is forced, its attention its own
        model, processor = load(*args, **kwargs)
        stack.enter_context(probe.forced_answer(model, processor.tokenizer.encode(FORCED) + [processor.tokenizer.eos_id]))
        return model, processor
    mp = pytest.MonkeyPatch()
    mp.setattr(command, "load_for_inference", forced)
    with stack:
        try:
            assert main(["--model", str(task_tok_dir), str(root / "scene.png"), "--prompt", "detect plane ; ship",
                         "--max-new-tokens", "30", "--out", str(root / "out")]) == 0
        finally:
            mp.undo()
    return root / "out" / "scene", root / "scene.png"


def test_report_boxes_are_parse_detections(probed_boxes):
    from paligemma.tasks import parse_detections
    from paligemma.tasks.boxes import label_colour
    folder, _ = probed_boxes
    summary = json.loads((folder / "probe.json").read_text())
    assert summary["text"] == FORCED and (summary["width"], summary["height"]) == (80, 48)
    want = parse_detections(FORCED, 80, 48)
    assert [(d["label"], tuple(d["box"])) for d in summary["detections"]] == [(d.label, d.box) for d in want]
    assert summary["detections_dropped"] == want.dropped == 1
    assert summary["detections"][0]["colour"] == "#%02x%02x%02x" % label_colour("plane")
    # each <loc> token: its object, its coordinate (y first), its box; the malformed piece's two have none
    got = [(l["piece"], l["object"], l["coordinate"], l["detection"]) for l in summary["loc_tokens"]]
    coords = ["y_min", "x_min", "y_max", "x_max"]
    assert got == ([(p, 0, c, 0) for p, c in zip(["<loc0128>", "<loc0256>", "<loc0640>", "<loc0768>"], coords)]
                   + [(p, 1, c, 1) for p, c in zip(["<loc0000>", "<loc0512>", "<loc0384>", "<loc1023>"], coords)]
                   + [("<loc0256>", 2, "y_min", None), ("<loc0128>", 2, "x_min", None)])
    assert all(summary["pieces"][l["token"]] == l["piece"] for l in summary["loc_tokens"])


def test_loc_attention_equals_transformers(probed_boxes, task_tok_dir):
    """The map shown for each <loc> token is the attention of the query that chose it (the position before
    it) over the 8 x 8 image patches, averaged over heads and layers: transformers' eager attentions on
    the prompt followed by the answer, one forward."""
    folder, image = probed_boxes
    summary = json.loads((folder / "probe.json").read_text())
    processor = Processor.from_pretrained(task_tok_dir)
    inputs = processor([image], "detect plane ; ship")
    T, answer = inputs["input_ids"].shape[1], torch.tensor([summary["tokens"][:-1]])
    full = dict(input_ids=torch.cat([inputs["input_ids"], answer], 1), pixel_values=inputs["pixel_values"],
                attention_mask=torch.ones(1, T + answer.shape[1], dtype=torch.long),
                token_type_ids=torch.cat([inputs["token_type_ids"], torch.ones_like(answer)], 1))
    with torch.no_grad():
        ref = load_hf(task_tok_dir)(**full, output_attentions=True).attentions  # L x (1, H, T + n - 1, S)
    for loc in summary["loc_tokens"]:
        q = T - 1 + loc["token"]
        want = torch.stack([a[0, :, q, :64].mean(0) for a in ref]).mean(0).view(8, 8)  # 64 image tokens first
        assert_close(torch.tensor(loc["attention"]), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(summary["loc_tokens"][0]["attention"], summary["loc_tokens"][1]["attention"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian: chromium) not installed")
def test_report_draws_boxes_and_loc_maps_in_chromium(probed_boxes):
    """The DOM Chromium built: one outline per parsed box at its pixels scaled to the view, a small map per
    <loc> token under its box (the malformed piece's apart), <loc> tokens marked in the token row. The
    screenshot at the first <loc> token: the plane's outline and the dashed y_min line in its colour, and
    the large map's red following that token's recorded attention patch by patch."""
    folder, _ = probed_boxes
    summary = json.loads((folder / "probe.json").read_text())
    page = (folder / "report.html").as_uri()
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    scale = (VIEW["size"] / 80, VIEW["size"] / 48)
    panel = re.search(r'<svg id="boxes"[^>]*>(.*?)</svg>', dom, re.S).group(1)  # the element, not the script
    boxes = [dict(re.findall(r'([\w-]+)="([^"]*)"', r)) for r in re.findall(r'<rect class="box"([^>]*)>', panel)]
    assert len(boxes) == 2
    for b, d in zip(boxes, summary["detections"]):
        x0, y0, x1, y1 = d["box"]
        assert [float(b[k]) for k in ("x", "y", "width", "height")] == pytest.approx(
            [x0 * scale[0], y0 * scale[1], (x1 - x0) * scale[0], (y1 - y0) * scale[1]])
        assert b["stroke"] == d["colour"]
    assert [int(t) for t in re.findall(r'<span class="loccell[^"]*" data-token="(\d+)"', dom)] == \
        [l["token"] for l in summary["loc_tokens"]]
    assert "malformed (dropped)" in dom
    marked = [int(i) for i in re.findall(r'<span class="tok loc[^"]*" data-i="(\d+)"', dom)]
    assert marked == [l["token"] for l in summary["loc_tokens"]]

    shot = folder.parent / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=1", "--window-size=1200,900", f"--screenshot={shot}", page + "#token=0"],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    plane = np.array([int(summary["detections"][0]["colour"][i:i + 2], 16) for i in (1, 3, 5)])
    left, top = VIEW["left"], VIEW["top"]
    x0 = round(256 / 1023 * VIEW["size"])  # the plane's x_min on the page: 112 px
    assert np.abs(pixels[top + 200, left + x0] - plane).max() <= 3
    y_line = pixels[top + round(128 / 1023 * VIEW["size"]), left:left + 100]  # y_min = 128: left of the box, dashes only
    dashed = (np.abs(y_line - plane).max(-1) <= 3).mean()
    assert 0.4 < dashed < 0.8  # dashes 6 px on, 4 off: 0.6 measured
    cell = VIEW["size"] / 8
    centres = pixels[[int(top + (r + 0.5) * cell) for r in range(8)]][:, [int(left + (c + 0.5) * cell) for c in range(8)]]
    red = centres[..., 0].reshape(-1)  # alpha 190 * v over the image's red 0: linear in the attention
    want = np.array(summary["loc_tokens"][0]["attention"]).reshape(-1)
    assert red[want.argmax()] > 150 and red[want.argmin()] < 30
    # the page averages the layers' and heads' uint8 maps: correlation 0.999 measured (-0.37 .. 0.14 with
    # the other <loc> tokens' maps)
    assert np.corrcoef(red, want)[0, 1] > 0.95


def test_locations_of_a_segment_answer(task_tok_dir):
    """A segment answer's 16 <seg> tokens are no coordinates; each <loc> token's map is its row of the
    heat maps averaged over layers and heads (random maps here); a lone <loc> after ';' belongs to no box."""
    from paligemma.probe.locations import locations
    tok = Processor.from_pretrained(task_tok_dir).tokenizer
    ids = tok.encode("<loc0100><loc0200><loc0300><loc0400>" + "<seg005>" * 16 + " roof ; <loc0100>") + [tok.eos_id]
    heat = np.random.default_rng(0).random((len(ids), 3, 4, 8, 8))
    out = locations(tok, ids, heat, 100, 50)
    assert [(d["label"], d["box"]) for d in out["detections"]] == [
        ("roof", [200 / 1023 * 100, 100 / 1023 * 50, 400 / 1023 * 100, 300 / 1023 * 50])]
    assert out["detections_dropped"] == 1
    got = [(l["token"], l["value"], l["object"], l["coordinate"], l["detection"]) for l in out["loc_tokens"]]
    last = len(ids) - 2  # the lone <loc0100> before <eos>
    assert got == [(0, 100, 0, "y_min", 0), (1, 200, 0, "x_min", 0), (2, 300, 0, "y_max", 0), (3, 400, 0, "x_max", 0),
                   (last, 100, 1, "y_min", None)]
    for l in out["loc_tokens"]:
        assert np.allclose(l["attention"], heat[l["token"]].mean(axis=(0, 1)), rtol=0, atol=1e-12)


def test_forced_answer_writes_the_ids_and_restores(pg1_tok_dir):
    model, processor = PaliGemma.from_pretrained(pg1_tok_dir), Processor.from_pretrained(pg1_tok_dir)
    inputs = processor([blue_noise(16)], "caption en")
    own = model.generate(**inputs, max_new_tokens=4)[0].tolist()
    ids = [17, 40, 33, 90]
    assert own != ids
    with probe.forced_answer(model, ids):
        assert model.generate(**inputs, max_new_tokens=4)[0].tolist() == ids
        assert model.generate(**inputs, max_new_tokens=4)[0].tolist() == own  # only the first len(ids) head calls
    with pytest.raises(RuntimeError), probe.forced_answer(model, ids):
        raise RuntimeError("stop")
    assert model.generate(**inputs, max_new_tokens=4)[0].tolist() == own


# ---- segment answers (#21): the masks drawn under the boxes with --vae ----

SEG_FULL, SEG_TOP = "<seg001>" * 16, "".join(f"<seg00{int(i < 8)}>" for i in range(16))  # blocky_vae: whole box, top half
FORCED_SEG = (f"<loc0000><loc0000><loc1023><loc0512>{SEG_FULL} roof ; <loc0512><loc0512><loc1023><loc1023>{SEG_TOP} "
              "tree ; <loc0100><loc0100><loc0200><loc0200> pole")  # the third: a box without <seg> codes


def test_report_draws_segment_masks_with_vae(task_tok_dir, tmp_path, monkeypatch):
    """An 80 x 48 image, its answer forced to FORCED_SEG, the hand-built blocky VQ-VAE. By hand: the roof's
    box x 0..int(512 / 1023 * 80) = 40, y 0..48, filled: 40 x 48 = 1920 px; the tree's x 40..80, y
    int(512 / 1023 * 48) = 24 .. 48, its top half 24..36: 40 x 12 = 480 px; the pole has no mask. The page's
    overlay (448 x 448, the image stretched to the square view, nearest neighbour) is the roof's colour left
    of x = 40 / 80 * 448 = 224, the tree's in x 224.., y 24 / 48 * 448 = 224 .. 36 / 48 * 448 = 336, clear
    elsewhere; with alpha 0.45 (115 of 255) inside, opaque (255) within 2 px of each mask's border."""
    import base64
    import paligemma.probe.__main__ as command
    from paligemma.tasks.boxes import label_colour
    from tests.tasks.vae_files import blocky_vae
    Image.fromarray(np.full((48, 80, 3), 90, np.uint8)).save(tmp_path / "house.png")
    load = command.load_for_inference
    with contextlib.ExitStack() as stack:
        def forced(*args, **kwargs):
            model, processor = load(*args, **kwargs)
            ids = processor.tokenizer.encode(FORCED_SEG) + [processor.tokenizer.eos_id]
            stack.enter_context(probe.forced_answer(model, ids))
            return model, processor
        monkeypatch.setattr(command, "load_for_inference", forced)
        vae = blocky_vae(tmp_path / "blocky.npz")
        assert main(["--model", str(task_tok_dir), str(tmp_path / "house.png"), "--prompt", "segment roof ; tree",
                     "--max-new-tokens", "90", "--out", str(tmp_path / "out"), "--vae", str(vae)]) == 0
    folder = tmp_path / "out" / "house"
    summary = json.loads((folder / "probe.json").read_text())
    assert summary["text"] == FORCED_SEG
    assert [d["label"] for d in summary["detections"]] == ["roof", "tree", "pole"]
    assert summary["segments"] == [dict(detection=0, pixels=1920), dict(detection=1, pixels=480)]
    page = (folder / "report.html").read_text()
    data = json.loads(re.search(r"const D = (\{.*?\});\n", page, re.S).group(1).replace("<\\/", "</"))
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["mask_overlay"])))).astype(int)  # (448, 448, 4)
    assert overlay.shape == (VIEW["size"], VIEW["size"], 4)
    roof, tree = ([*label_colour(k), 115] for k in ("roof", "tree"))
    want = np.zeros_like(overlay)
    want[:, :224] = roof
    want[224:336, 224:] = tree
    want[:, :224, 3][[*range(2), *range(446, 448)], :] = 255  # the roof's outline: top, bottom,
    want[:, [0, 1, 222, 223], 3] = 255  # left and right
    want[224:336, 224:, 3][[0, 1, 110, 111], :] = 255  # the tree's: y 224, 225, 334, 335
    want[224:336, [224, 225, 446, 447], 3] = 255  # x 224, 225, 446, 447
    np.testing.assert_array_equal(overlay, want)
    assert '<img id="masks"' in page and "D.mask_overlay" in page
    # --vae with a caption prompt is an argument error; a missing file is named before the model loads
    with pytest.raises(SystemExit):
        main(["--model", str(task_tok_dir), str(tmp_path / "house.png"), "--out", str(tmp_path / "x"), "--vae", str(vae)])
    with pytest.raises(FileNotFoundError, match="missing.npz: no such file"):
        main(["--model", str(tmp_path / "no-model"), str(tmp_path / "house.png"), "--prompt", "segment roof",
              "--out", str(tmp_path / "y"), "--vae", str(tmp_path / "missing.npz")])
