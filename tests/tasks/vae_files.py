"""Mask VQ-VAE files in vae-oid.npz's key layout for the tests: random weights (to compare with big_vision)
and a hand-built decoder whose masks are known in advance (to check where masks land)."""
import numpy as np


def random_vae(path, seed=0, K=128, D=64, C=128, up=(128, 64, 32, 16), enc=(32, 64, 128, 128), enc_kernels=(4, 3, 3, 3),
               decoder=True, encoder=True):
    """Random weights under big_vision's key names (PyTorch layouts: conv (out, in, kh, kw), transposed conv
    (in, out, kh, kw)), scaled so activations stay near 1 through the layers. big_vision's Flax Decoder
    writes its channel counts (128; 128, 64, 32, 16) into the code, so comparisons with it use those.
    enc_kernels: the four stride-2 encoder kernels; a 3 x 3 one pads 0 before and 1 after under 'SAME'."""
    g = np.random.default_rng(seed)
    a = {"_vq_vae._embedding": g.normal(size=(K, D)).astype(np.float32)}

    def conv(name, o, i, k, transposed=False):
        shape = (i, o, k, k) if transposed else (o, i, k, k)
        a[name + ".weight"] = (g.normal(size=shape) * np.sqrt(2 / (i * k * k))).astype(np.float32)
        a[name + ".bias"] = (g.normal(size=o) * 0.1).astype(np.float32)

    def resblock(name, c):
        conv(name + ".0", c, c, 3), conv(name + ".2", c, c, 3), conv(name + ".4", c, c, 1)

    if decoder:
        conv("decoder.0", C, D, 1)
        resblock("decoder.2.net", C), resblock("decoder.3.net", C)
        c = (C, *up)
        for n, i in enumerate((4, 6, 8, 10)):
            conv(f"decoder.{i}", c[n + 1], c[n], 4, transposed=True)
        conv("decoder.12", 1, c[4], 1)
    if encoder:
        e = (1, *enc)
        for n in range(4):
            conv(f"encoder.{2 * n}", e[n + 1], e[n], enc_kernels[n])
        resblock("encoder.8.net", e[4]), resblock("encoder.9.net", e[4])
        conv("encoder.10", D, e[4], 1)
    np.savez(path, **a)
    return path


def blocky_vae(path, encoder=False):
    """A decoder built by hand: code 1 -> +1, code 0 -> -1 over its own 16 x 16 block of the 64 x 64 mask.

    Codebook K = 2, D = 1, one channel everywhere; residual blocks zero (identity); every transposed
    convolution is exact nearest-neighbour 2x upsampling: with kernel 4, stride 2, padding 1, output 2j
    takes input j through tap 1 and output 2j + 1 takes input j through tap 2, so taps [0, 1, 1, 0]
    (outer product in 2D) copy each input pixel to a 2 x 2 block, edges included. The last 1 x 1 conv
    maps 0 / 1 to -1 / +1.

    encoder=True adds the matching encoder: each 16 x 16 block of the 64 x 64 crop -> code 1 when more than
    half of it is set, else 0 (so a filled box encodes to all ones). Four 2 x 2 stride-2 convolutions of
    taps 1/4 average the block (the first adds 1: [-1, 1] inputs become [0, 2], which the ReLUs keep);
    residual blocks zero; the last 1 x 1 conv halves it: the fraction set, in [0, 1]; the nearest of the
    codes 0.0 and 1.0 is 1 above one half (a tie takes code 0, argmin's first)."""
    a = {"_vq_vae._embedding": np.array([[0.0], [1.0]], np.float32), "decoder.0.weight": np.ones((1, 1, 1, 1), np.float32),
         "decoder.0.bias": np.zeros(1, np.float32)}
    for r in (2, 3):
        for j, k in ((0, 3), (2, 3), (4, 1)):
            a[f"decoder.{r}.net.{j}.weight"] = np.zeros((1, 1, k, k), np.float32)
            a[f"decoder.{r}.net.{j}.bias"] = np.zeros(1, np.float32)
    taps = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
    for i in (4, 6, 8, 10):
        a[f"decoder.{i}.weight"] = np.outer(taps, taps)[None, None]
        a[f"decoder.{i}.bias"] = np.zeros(1, np.float32)
    a["decoder.12.weight"] = np.full((1, 1, 1, 1), 2.0, np.float32)
    a["decoder.12.bias"] = np.full(1, -1.0, np.float32)
    if encoder:
        for i in (0, 2, 4, 6):
            a[f"encoder.{i}.weight"] = np.full((1, 1, 2, 2), 0.25, np.float32)
            a[f"encoder.{i}.bias"] = np.full(1, 1.0 if i == 0 else 0.0, np.float32)
        for r in (8, 9):
            for j, k in ((0, 3), (2, 3), (4, 1)):
                a[f"encoder.{r}.net.{j}.weight"] = np.zeros((1, 1, k, k), np.float32)
                a[f"encoder.{r}.net.{j}.bias"] = np.zeros(1, np.float32)
        a["encoder.10.weight"] = np.full((1, 1, 1, 1), 0.5, np.float32)
        a["encoder.10.bias"] = np.zeros(1, np.float32)
    np.savez(path, **a)
    return path
