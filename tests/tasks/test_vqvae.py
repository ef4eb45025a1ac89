"""The mask VQ-VAE against big_vision's own code (tests/tasks/reference/, copied verbatim), and its file checks."""
import zipfile

import numpy as np
import pytest
import torch

from paligemma.tasks import MaskDecoder, MaskEncoder
from paligemma.weights import CheckpointError
from tests.tasks.vae_files import blocky_vae, random_vae


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """Random weights, D = 512 (PaliGemma's codebook width), big_vision's decoder channels."""
    return random_vae(tmp_path_factory.mktemp("vae") / "vae.npz", D=512)


def _big_vision(module: str, requirement: str):
    """Import a reference module, or skip saying what to install."""
    for name in requirement.split():
        pytest.importorskip(name.split("==")[0].replace("-cpu", ""), reason=f"big_vision's reference needs "
                            f"`pip install {requirement}` (the setup.cfg test extra)")
    import importlib
    return importlib.import_module(f"tests.tasks.reference.{module}")


def test_decoder_equals_big_vision(vae):
    """big_vision's get_reconstruct_masks (its _get_params mapping and Flax Decoder, jit on CPU) on the same
    file and codes. Measured: max |diff| / max |mask| = 1e-6; the bar is 1e-5."""
    bv = _big_vision("big_vision_decoder", "jax==0.10.2 flax==0.12.8")
    codes = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    codes[0, :2] = torch.tensor([0, 127])  # both ends of the codebook
    ours = MaskDecoder.from_npz(vae)(codes).numpy()  # (8, 64, 64)
    ref = np.asarray(bv.get_reconstruct_masks(str(vae))(codes.numpy().astype(np.int32)))[..., 0]  # (8, 64, 64, 1)
    assert ours.shape == ref.shape == (8, 64, 64)
    assert np.abs(ref).max() > 0.1 and ref.std() > 0.01  # the weights reach the output: a real comparison
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def _blob_masks(n, seed=0):
    """(n, 64, 64) float masks in [0, 1]: ellipses, with soft edges on half of them (resized crops are soft)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64] + 0.5
    out = []
    for i in range(n):
        cy, cx, ry, rx = g.uniform(10, 54), g.uniform(10, 54), g.uniform(6, 30), g.uniform(6, 30)
        r = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        out.append(np.clip((1.5 - r) * 2, 0, 1) if i % 2 else (r < 1).astype(np.float64))
    return np.stack(out).astype(np.float32)


def test_encoder_equals_big_vision(vae):
    """big_vision's TensorFlow encode_to_codebook_indices on the same file and masks gives the same codes:
    a padding, layout or distance mistake would move most of the 16 x 12 codes."""
    bv = _big_vision("big_vision_encoder", "tensorflow-cpu==2.21.0")
    masks = _blob_masks(12)
    ref = bv.encode_to_codebook_indices(dict(np.load(vae)), masks[..., None]).numpy()  # (12, 16)
    ours = MaskEncoder.from_npz(vae)(torch.from_numpy(masks)).numpy()
    assert len(np.unique(ref)) > 8  # the masks use many codes: a real comparison
    np.testing.assert_array_equal(ours, ref)


def test_sizes_come_from_the_file(tmp_path):
    """Another codebook, width and channel plan than PaliGemma's: read from the file, not assumed."""
    path = random_vae(tmp_path / "small.npz", K=40, D=8, C=24, up=(16, 12, 8, 4), enc=(4, 8, 8, 16),
                      enc_kernels=(3, 4, 3, 5))
    dec, enc = MaskDecoder.from_npz(path), MaskEncoder.from_npz(path)
    assert dec.entries == 40 and dec.decoder[10].weight.shape == (8, 4, 4, 4)
    assert dec(torch.randint(0, 40, (3, 16))).shape == (3, 64, 64)
    codes = enc(torch.from_numpy(_blob_masks(3)))
    assert codes.shape == (3, 16) and int(codes.max()) < 40


def test_known_codes_give_known_mask(tmp_path):
    """The hand-built decoder: code i paints rows 16 (i // 4) .. + 16, columns 16 (i % 4) .. + 16."""
    dec = MaskDecoder.from_npz(blocky_vae(tmp_path / "blocky.npz"))
    codes = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1]])
    want = -np.ones((64, 64), np.float32)
    for i in codes[0].nonzero()[:, 0].tolist():
        want[16 * (i // 4):16 * (i // 4) + 16, 16 * (i % 4):16 * (i % 4) + 16] = 1
    np.testing.assert_array_equal(dec(codes)[0].numpy(), want)


def test_bad_codes_are_named(tmp_path):
    dec = MaskDecoder.from_npz(blocky_vae(tmp_path / "blocky.npz"))
    with pytest.raises(ValueError, match=r"code 2 at \[0, 5\] is outside the codebook's 0..1"):
        dec(torch.tensor([[0] * 5 + [2] + [0] * 10]))
    with pytest.raises(ValueError, match=r"code -1 at \[1, 0\]"):
        dec(torch.tensor([[0] * 16, [-1] + [0] * 15]))
    with pytest.raises(ValueError, match=r"expected codes of shape \(B, 16\), got \(1, 15\)"):
        dec(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="expected integer codes, got torch.float32"):
        dec(torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"expected masks of shape \(B, 64, 64\), got \(2, 32, 32\)"):
        MaskEncoder.from_npz(random_vae(tmp_path / "r.npz", D=8))(torch.zeros(2, 32, 32))


def test_bad_files_are_named(tmp_path, vae):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(FileNotFoundError, match=r"nowhere.npz: no such file .*gs://big_vision/paligemma/vae-oid.npz"):
        MaskDecoder.from_npz(missing)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(vae.read_bytes()[: vae.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.npz: not a readable .npz archive, or truncated"):
        MaskDecoder.from_npz(truncated)

    pointer = tmp_path / "pointer.npz"  # what a Git LFS checkout without `git lfs pull` leaves
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(CheckpointError, match="pointer.npz: not a readable .npz archive"):
        MaskDecoder.from_npz(pointer)

    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(CheckpointError, match="single.npy: a single .npy array"):
        MaskDecoder.from_npz(single)

    other = tmp_path / "other.npz"
    np.savez(other, weight=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"other.npz: not the mask VQ-VAE's decoder .* 25 of its 25 keys "
                                              r"missing, e.g. \['_vq_vae._embedding'.*it holds \['weight'\]"):
        MaskDecoder.from_npz(other)

    arrays = dict(np.load(vae))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{**arrays, "decoder.6.weight": np.zeros((100, 64, 4, 4), np.float32),
                       "decoder.8.weight": np.zeros((64, 32, 3, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r"wrong.npz: shapes do not fit .*decoder.6.weight \(100, 64, 4, 4\), "
                                              r"expected \(128, 64, 4, 4\); decoder.8.weight \(64, 32, 3, 3\), "
                                              r"expected \(64, 32, 4, 4\)"):
        MaskDecoder.from_npz(wrong)
    np.savez(wrong, **{**arrays, "decoder.2.net.0.bias": np.zeros((128, 1), np.float32)})
    with pytest.raises(CheckpointError, match=r"'decoder.2.net.0.bias' has shape \(128, 1\), expected 1 dimensions"):
        MaskDecoder.from_npz(wrong)
    np.savez(wrong, **{**arrays, "_vq_vae._embedding": np.zeros((128, 512), np.int32)})
    with pytest.raises(CheckpointError, match="'_vq_vae._embedding' has dtype int32, expected floating point"):
        MaskDecoder.from_npz(wrong)

    decoder_only = random_vae(tmp_path / "decoder_only.npz", D=8, encoder=False)
    assert MaskDecoder.from_npz(decoder_only).entries == 128
    with pytest.raises(CheckpointError, match=r"decoder_only.npz: holds no encoder half \(encoder.0 ... encoder.10\), "
                                              r"which turns mask files into training answers"):
        MaskEncoder.from_npz(decoder_only)


def test_corrupt_member_is_named(tmp_path, vae):
    """The archive's directory intact, one array's bytes damaged (a bad download): named, not a zlib crash."""
    bad = tmp_path / "damaged.npz"
    with zipfile.ZipFile(vae) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item.filename))
    data = bytearray(bad.read_bytes())
    with zipfile.ZipFile(bad) as z:
        info = z.getinfo("decoder.4.weight.npy")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header, then data
    data[start + 100:start + 400] = bytes(300)
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged.npz: array 'decoder.4.weight' is truncated or corrupt"):
        MaskDecoder.from_npz(bad)
