"""PaliGemma's mask tokenizer: the small VQ-VAE whose sixteen codes are the `<seg000>`..`<seg127>` tokens.

`segment <thing>` answers with four `<loc>` tokens (the box) and sixteen `<seg>` tokens. The decoder turns
the sixteen codes into a 64 x 64 mask of the box's contents; the encoder (used to make training answers)
turns a 64 x 64 crop of a mask into the codes. Both are big_vision's (the architecture of UViM,
arXiv:2301.02229); the weights are `vae-oid.npz`, trained on Open Images, which big_vision publishes at
`gs://big_vision/paligemma/vae-oid.npz` (`_KNOWN_MODELS` in its segmentation evaluator and preprocessing).

Axes: B batch, K codebook entries (128), D code width, C channels, H W spatial (NCHW here, NHWC in big_vision).

The file is a PyTorch state dict saved by numpy, so the modules below carry exactly its key names and
loading is `load_state_dict` of the file's arrays. The keys big_vision reads (evaluator `_get_params`,
preprocessing `encode_to_codebook_indices`), every one a `.weight` and `.bias` except the codebook:

    _vq_vae._embedding           (K, D)        the codebook, shared by both halves
    encoder.0 .2 .4 .6           Conv2d        four stride-2 convolutions, 64 -> 32 -> 16 -> 8 -> 4, ReLU after each
    encoder.8.net, encoder.9.net ResBlock      conv, ReLU, conv, ReLU, conv, plus the input
    encoder.10                   Conv2d        to D channels: sixteen D-vectors, each snapped to its nearest code
    decoder.0                    Conv2d 1x1    D -> C, then ReLU
    decoder.2.net, decoder.3.net ResBlock
    decoder.4 .6 .8 .10          ConvTranspose2d 4x4 stride 2, 4 -> 8 -> 16 -> 32 -> 64, ReLU after each
    decoder.12                   Conv2d 1x1    to one channel: the mask, trained to give -1 (out) .. +1 (in)

(The odd indices are the ReLUs of the PyTorch `nn.Sequential` the file was saved from.) Channel counts and
the codebook's size are read from the file; the kernels' padding is big_vision's: the decoder's is written
out in its Flax code (so its kernel sizes are checked), the encoder's is TensorFlow's 'SAME' for any kernel.
"""
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..safetensors_io import CheckpointError

SOURCE = "gs://big_vision/paligemma/vae-oid.npz"
VAE_HELP = f"the VQ-VAE that turns <seg> codes into masks, big_vision's {SOURCE}"  # what --vae is, for messages
CODES = 16  # per mask: a 4 x 4 grid
GRID = 4
MASK = 64   # decoded masks are MASK x MASK, the encoder takes MASK x MASK crops


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's padding='SAME' (big_vision's encoder runs `tf.nn.conv2d`): the output has
    ceil(in / stride) pixels and, when the padding is odd, the extra row and column go at the bottom and
    right, which no symmetric `padding=` can express (a 3 x 3 stride-2 kernel pads 0 before, 1 after)."""

    def forward(self, x):  # (B, C, H, W)
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max(k - (s if size % s == 0 else size % s), 0)
            pads += [total // 2, total - total // 2]  # F.pad wants (left, right, top, bottom)
        return super().forward(F.pad(x, pads))


class ResBlock(nn.Module):
    """x + conv(relu(conv(relu(conv(x))))): `net.0`, `net.2`, `net.4` in the file, padded 'SAME' (for the
    decoder's 3x3, 3x3, 1x1 kernels that is Flax's padding=1, 1, 0 written in big_vision's ResBlock)."""

    def __init__(self, channels: int, kernels: tuple[tuple[int, int], ...] = ((3, 3), (3, 3), (1, 1))):
        super().__init__()
        self.net = nn.Sequential(
            SameConv2d(channels, channels, kernels[0]), nn.ReLU(),
            SameConv2d(channels, channels, kernels[1]), nn.ReLU(),
            SameConv2d(channels, channels, kernels[2]))

    def forward(self, x):  # (B, C, H, W)
        return x + self.net(x)


class _Codebook(nn.Module):
    """Holds `_vq_vae._embedding` under the file's name (a bare Parameter, as the file stores it)."""

    def __init__(self, entries: int, width: int):
        super().__init__()
        self._embedding = nn.Parameter(torch.zeros(entries, width))  # (K, D)


class MaskDecoder(nn.Module):
    """Sixteen codes -> a 64 x 64 mask, as big_vision's `get_reconstruct_masks` computes it.

    `MaskDecoder.from_npz("vae-oid.npz")(codes)`: codes (B, 16) integers in [0, K) -> (B, 64, 64) float32,
    positive inside the object. Like big_vision's, the output is not clipped: the network was trained to
    give values in [-1, 1], and all that is used of it is the sign (threshold 0)."""

    def __init__(self, entries: int, width: int, channels: int, up: tuple[int, int, int, int]):
        super().__init__()
        self._vq_vae = _Codebook(entries, width)
        c = (channels, *up)  # channels before and after each transposed convolution
        # big_vision's Flax Decoder: Conv 1x1 pad 0; ResBlocks 3x3 pad 1 / 1x1 pad 0; ConvTranspose 4x4
        # stride 2 with Flax padding 2 on the dilated input, which is PyTorch's padding 4 - 1 - 2 = 1
        self.decoder = nn.Sequential(
            nn.Conv2d(width, channels, 1), nn.ReLU(),
            ResBlock(channels), ResBlock(channels),
            *[m for i in range(4) for m in (nn.ConvTranspose2d(c[i], c[i + 1], 4, stride=2, padding=1), nn.ReLU())],
            nn.Conv2d(c[4], 1, 1))

    @property
    def entries(self) -> int:
        return self._vq_vae._embedding.shape[0]

    def forward(self, codes: torch.Tensor) -> torch.Tensor:  # (B, 16) long -> (B, 64, 64)
        check_codes(codes, self.entries)
        x = self._vq_vae._embedding[codes.to(self._vq_vae._embedding.device)]  # (B, 16, D)
        x = x.unflatten(1, (GRID, GRID)).permute(0, 3, 1, 2)  # (B, D, 4, 4): code i at row i // 4, column i % 4
        return self.decoder(x)[:, 0]  # (B, 1, 64, 64) -> (B, 64, 64)

    @classmethod
    def from_npz(cls, path: str | Path) -> "MaskDecoder":
        arrays = read_npz(path, "decoder")
        emb, first = arrays["_vq_vae._embedding"], arrays["decoder.0.weight"]
        up = tuple(int(arrays[f"decoder.{i}.weight"].shape[1]) for i in (4, 6, 8, 10))  # (in, out, kh, kw)
        net = cls(emb.shape[0], emb.shape[1], first.shape[0], up)
        return _load(net, arrays, path)


class MaskEncoder(nn.Module):
    """A 64 x 64 mask in [0, 1] -> its sixteen codes, as big_vision's `encode_to_codebook_indices`.

    Used to write training answers (`paligemma.tasks.segment_tokens`); PaliGemma itself never runs it."""

    def __init__(self, entries: int, width: int, down: tuple[int, int, int, int],
                 kernels: dict[str, tuple[int, int]]):  # kernels: "encoder.N" -> (kh, kw), as in the file
        super().__init__()
        self._vq_vae = _Codebook(entries, width)
        c, k = (1, *down), kernels
        res = [ResBlock(c[4], tuple(k[f"encoder.{i}.net.{j}"] for j in (0, 2, 4))) for i in (8, 9)]
        self.encoder = nn.Sequential(
            *[m for i in range(4) for m in (SameConv2d(c[i], c[i + 1], k[f"encoder.{2 * i}"], stride=2), nn.ReLU())],
            *res, SameConv2d(c[4], width, k["encoder.10"]))

    def forward(self, masks: torch.Tensor) -> torch.Tensor:  # (B, 64, 64) in [0, 1] -> (B, 16) long
        if masks.ndim != 3 or masks.shape[1:] != (MASK, MASK):
            raise ValueError(f"MaskEncoder: expected masks of shape (B, {MASK}, {MASK}), got {tuple(masks.shape)}")
        x = self.encoder(2.0 * (masks.float()[:, None] - 0.5))  # (B, D, 4, 4): big_vision's _norm, [0, 1] -> [-1, 1]
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (B * 16, D), row-major over the grid as in TF
        emb = self._vq_vae._embedding  # (K, D)
        # squared distances written as big_vision writes them, so near-ties round the same way
        dist = (x ** 2).sum(1, keepdim=True) + (emb ** 2).sum(1) - 2 * x @ emb.T  # (B * 16, K)
        return dist.argmin(1).view(-1, CODES)

    @classmethod
    def from_npz(cls, path: str | Path) -> "MaskEncoder":
        arrays = read_npz(path, "encoder")
        emb = arrays["_vq_vae._embedding"]
        down = tuple(int(arrays[f"encoder.{i}.weight"].shape[0]) for i in (0, 2, 4, 6))  # (out, in, kh, kw)
        kernels = {name[:-len(".weight")]: tuple(a.shape[2:]) for name, a in arrays.items()
                   if name.endswith(".weight") and a.ndim == 4}
        return _load(cls(emb.shape[0], emb.shape[1], down, kernels), arrays, path)


def check_codes(codes: torch.Tensor, entries: int):
    """Name what is wrong with a batch of codes: its shape, its dtype, a code outside the codebook."""
    if codes.ndim != 2 or codes.shape[1] != CODES:
        raise ValueError(f"MaskDecoder: expected codes of shape (B, {CODES}), got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise ValueError(f"MaskDecoder: expected integer codes, got {codes.dtype}")
    bad = ((codes < 0) | (codes >= entries)).nonzero()
    if len(bad):
        b, i = bad[0].tolist()
        raise ValueError(f"MaskDecoder: code {codes[b, i].item()} at [{b}, {i}] is outside the codebook's "
                         f"0..{entries - 1} ({len(bad)} such)")


def _keys(part: str) -> list[str]:
    """The file's keys one half needs: what big_vision's code reads."""
    if part == "decoder":
        convs = ["decoder.0", "decoder.4", "decoder.6", "decoder.8", "decoder.10", "decoder.12"]
        res = [f"decoder.{i}.net.{j}" for i in (2, 3) for j in (0, 2, 4)]
    else:
        convs = ["encoder.0", "encoder.2", "encoder.4", "encoder.6", "encoder.10"]
        res = [f"encoder.{i}.net.{j}" for i in (8, 9) for j in (0, 2, 4)]
    return ["_vq_vae._embedding"] + [f"{n}.{p}" for n in sorted(convs + res) for p in ("weight", "bias")]


def read_npz(path: str | Path, part: str) -> dict[str, np.ndarray]:
    """The arrays of `path` that the decoder (or encoder) needs, as float32, with one-line errors for a missing,
    truncated or foreign file, a missing key and a tensor of the wrong rank. Other keys are left unread, as
    big_vision leaves them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the mask VQ-VAE weights big_vision publishes at {SOURCE})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz archive, or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: a single .npy array, not the .npz archive of named arrays {SOURCE} is")
    with npz:
        need = _keys(part)
        missing = [k for k in need if k not in npz.files]
        if missing and len(missing) == len(need) - 1 and part == "encoder":  # the codebook alone: a decoder file
            raise CheckpointError(f"{path}: holds no encoder half (encoder.0 ... encoder.10), which turns mask files "
                                  f"into training answers (<seg> codes); the full {SOURCE} has both halves")
        if missing:
            has = sorted(npz.files)
            raise CheckpointError(f"{path}: not the mask VQ-VAE's {part} ({SOURCE}): {len(missing)} of its "
                                  f"{len(need)} keys missing, e.g. {missing[:3]}; it holds {has[:5]}"
                                  f"{f' and {len(has) - 5} more' if len(has) > 5 else ''}")
        arrays = {}
        for k in need:
            try:
                a = npz[k]
            except Exception as e:  # damaged bytes fail anywhere: zlib, the CRC, numpy's header parser (SyntaxError)
                raise CheckpointError(f"{path}: array {k!r} is truncated or corrupt ({type(e).__name__}: {e})") from None
            if a.dtype.kind != "f":
                raise CheckpointError(f"{path}: {k!r} has dtype {a.dtype}, expected floating point")
            want = 2 if k == "_vq_vae._embedding" else 1 if k.endswith(".bias") else 4
            if a.ndim != want:
                raise CheckpointError(f"{path}: {k!r} has shape {a.shape}, expected {want} dimensions")
            arrays[k] = a.astype(np.float32)
    return arrays


def _load(net: nn.Module, arrays: dict[str, np.ndarray], path) -> nn.Module:
    """Copy the file's arrays into `net` by name, after checking every shape (which also checks that the
    layers chain: a layer's input channels are the previous one's output)."""
    state = net.state_dict()
    assert sorted(state) == sorted(arrays), (sorted(state), sorted(arrays))  # _keys() and the modules agree
    wrong = [f"{k} {tuple(a.shape)}, expected {tuple(state[k].shape)}" for k, a in arrays.items()
             if tuple(a.shape) != tuple(state[k].shape)]
    if wrong:
        raise CheckpointError(f"{path}: shapes do not fit big_vision's mask VQ-VAE: " + "; ".join(wrong))
    net.load_state_dict({k: torch.from_numpy(a) for k, a in arrays.items()})
    return net.eval().requires_grad_(False)
