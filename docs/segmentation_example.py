"""The README's segmentation picture: a tiny mask VQ-VAE trained here, since random weights draw noise.

PaliGemma's own decoder is big_vision's vae-oid.npz (gs://big_vision/paligemma/vae-oid.npz), which this
project does not ship. To show a real mask on the page, this script trains a small VQ-VAE of the same
architecture and key layout (fewer channels: MaskDecoder reads the sizes from the file) on synthetic
box-cropped shapes for a few minutes, saves it as an .npz, then writes each object of a synthetic scene as the
answer PaliGemma would give (`segment_tokens`), parses that text back (`parse_segmentations`) and draws it.

    python docs/segmentation_example.py [OUT.png]      # minutes on 2 CPU cores
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from paligemma.tasks import MaskDecoder, MaskEncoder, draw_segmentations, parse_segmentations, segment_tokens

K, D = 128, 16  # codebook as PaliGemma's (128 codes), narrower codes
DOWN, C, UP = (8, 16, 32, 32), 32, (32, 16, 8, 4)


def shape(kind: str, w: int, h: int, g: np.random.Generator) -> Image.Image:
    """A w x h mask ('L', 0 / 255) of one object that touches its box on all four sides, as a cropped mask does."""
    m = Image.new("L", (w, h))
    d = ImageDraw.Draw(m)
    if kind == "ellipse":
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif kind == "triangle":
        apex = g.uniform(0, w - 1)
        d.polygon([(apex, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    elif kind == "ring":
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
        d.ellipse([w * 0.3, h * 0.3, w * 0.7, h * 0.7], fill=0)
    else:  # an L: two bars
        t = g.uniform(0.25, 0.5)
        d.rectangle([0, 0, w * t, h - 1], fill=255)
        d.rectangle([0, h * (1 - t), w - 1, h - 1], fill=255)
    return m


KINDS = ("ellipse", "triangle", "ring", "L")


def batch(n: int, g: np.random.Generator) -> torch.Tensor:
    """(n, 64, 64) in [0, 1]: shapes drawn at a random size, resized to 64 x 64 as segment_tokens resizes crops."""
    out = []
    for _ in range(n):
        w, h = g.integers(12, 160, size=2)
        m = np.asarray(shape(KINDS[g.integers(len(KINDS))], int(w), int(h), g), np.float32) / 255
        out.append(F.interpolate(torch.from_numpy(m)[None, None], size=(64, 64), mode="bilinear", antialias=True)[0, 0])
    return torch.stack(out)


def train(path: Path, steps: int = 600, seed: int = 0):
    """VQ-VAE training (van den Oord et al. 2017): straight-through codes, codebook and commitment losses;
    the codebook starts at encoder outputs, and codes unused for 50 steps restart at a random one."""
    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    k = {f"encoder.{i}": (4, 4) for i in (0, 2, 4, 6)} | {f"encoder.{i}.net.{j}": (s, s) for i in (8, 9)
                                                       for j, s in ((0, 3), (2, 3), (4, 1))} | {"encoder.10": (1, 1)}
    enc, dec = MaskEncoder(K, D, DOWN, k), MaskDecoder(K, D, C, UP)
    dec._vq_vae = enc._vq_vae  # one codebook, as in the file
    params = list(enc.encoder.parameters()) + list(dec.decoder.parameters()) + [enc._vq_vae._embedding]
    opt = torch.optim.Adam(params, lr=3e-3)
    last_used = torch.zeros(K)
    for step in range(steps):
        x = batch(32, g)
        z = enc.encoder(2 * x[:, None] - 1).permute(0, 2, 3, 1).reshape(-1, D)  # (B * 16, D)
        emb = enc._vq_vae._embedding
        if step == 0:
            with torch.no_grad():
                emb.copy_(z[torch.randperm(len(z))[:K]])
        codes = ((z ** 2).sum(1, keepdim=True) + (emb ** 2).sum(1) - 2 * z @ emb.T).argmin(1)
        q = emb[codes]
        st = z + (q - z).detach()  # straight through: the decoder sees q, the encoder gets its gradient
        out = dec.decoder(st.view(-1, 4, 4, D).permute(0, 3, 1, 2))[:, 0]
        loss = F.mse_loss(out, 2 * x - 1) + F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        last_used[codes.unique()] = step
        with torch.no_grad():
            dead = (step - last_used > 50).nonzero()[:, 0]
            if len(dead):
                emb[dead] = z[torch.randint(len(z), (len(dead),))].detach()
                last_used[dead] = step
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}, {len(codes.unique())} codes in use", flush=True)
    state = {**enc.state_dict(), **dec.state_dict()}
    np.savez(path, **{name: t.detach().numpy() for name, t in state.items()})


def scene(seed: int = 1):
    """A 320 x 240 picture of four objects and their image-sized masks and boxes."""
    g = np.random.default_rng(seed)
    image = Image.new("RGB", (320, 240), (40, 60, 70))
    objects = []
    for kind, (x, y, w, h), colour in [("ellipse", (20, 30, 110, 80), (200, 170, 60)),
                                       ("triangle", (170, 20, 120, 100), (180, 180, 190)),
                                       ("ring", (40, 140, 90, 85), (90, 160, 90)),
                                       ("L", (190, 140, 100, 80), (170, 90, 70))]:
        m = shape(kind, w, h, g)
        image.paste(Image.new("RGB", (w, h), colour), (x, y), m)
        full = np.zeros((240, 320), bool)
        full[y:y + h, x:x + w] = np.asarray(m) > 127
        objects.append((kind, full, (x, y, x + w, y + h)))
    return image, objects


def main(out: str = "docs/segmentation-example.png"):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-vae.npz"
        start = time.perf_counter()
        train(path)
        print(f"trained in {time.perf_counter() - start:.0f} s")
        encoder, decoder = MaskEncoder.from_npz(path), MaskDecoder.from_npz(path)
        image, objects = scene()
        text = " ; ".join(f"{segment_tokens(m, box, encoder)} {kind}" for kind, m, box in objects)
        print(text)
        parsed = parse_segmentations(text, image.width, image.height, decoder)
        for (kind, m, _), s in zip(objects, parsed):
            print(f"{kind}: mask IoU after the round trip {(m & s.mask).sum() / (m | s.mask).sum():.3f}")
        draw_segmentations(image, parsed).save(out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
