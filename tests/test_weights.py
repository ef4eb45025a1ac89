"""Checkpoint loading: layouts, shards, dtype conversion and errors that name the problem."""
import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from paligemma import CheckpointError, ConfigError, PaliGemma
from paligemma.weights import save_pretrained
from tests.helpers import batch, load_hf, save_hf, tiny_hf_config


def copy_with(src, dst, edit):
    """Copy a checkpoint folder, passing its state dict through `edit`."""
    shutil.copytree(src, dst)
    state = edit(load_file(dst / "model.safetensors"))
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def logits(model):
    with torch.no_grad():
        return model(**batch(16, prompt_lens=(5,), suffix_len=2))


def test_hub_layout_with_pooling_head(pg1_dir, tmp_path):
    """The hub files say vision_tower.vision_model.* and carry SigLIP's head, which is skipped."""
    def to_hub(state):
        state = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
        state["vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, 32)
        return state
    hub = copy_with(pg1_dir, tmp_path / "hub", to_hub)
    assert any(k.startswith("vision_tower.vision_model.") for k in load_file(hub / "model.safetensors"))
    assert_close(logits(PaliGemma.from_pretrained(hub)), logits(PaliGemma.from_pretrained(pg1_dir)), rtol=0, atol=0)


def test_sharded_equals_single_file(tmp_path):
    config = tiny_hf_config("gemma2")
    single = save_hf(config, tmp_path / "single")
    sharded = save_hf(config, tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert_close(logits(PaliGemma.from_pretrained(sharded)), logits(PaliGemma.from_pretrained(single)), rtol=0, atol=0)


def test_bf16_from_float32_rounds_each_tensor(pg1_dir):
    ref = load_file(pg1_dir / "model.safetensors")
    model = PaliGemma.from_pretrained(pg1_dir, dtype=torch.bfloat16)
    got = model.state_dict()
    w = "language_model.model.layers.0.mlp.up_proj.weight"
    assert got[w].dtype == torch.bfloat16 and torch.equal(got[w], ref[w].to(torch.bfloat16))


def test_chunked_conversion_matches(pg1_dir, monkeypatch):
    import paligemma.safetensors_io as safetensors_io
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", 100)  # forces many chunks per tensor
    a = PaliGemma.from_pretrained(pg1_dir, dtype=torch.bfloat16).state_dict()
    monkeypatch.undo()
    b = PaliGemma.from_pretrained(pg1_dir, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_our_save_loads_in_both(pg2_dir, tmp_path):
    ours = PaliGemma.from_pretrained(pg2_dir)
    save_pretrained(ours, tmp_path / "single")
    save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=30_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ref = logits(ours)
    for folder in ("single", "sharded"):
        assert_close(logits(PaliGemma.from_pretrained(tmp_path / folder)), ref, rtol=0, atol=0)
        with torch.no_grad():
            hf = load_hf(tmp_path / folder)(**batch(16, prompt_lens=(5,), suffix_len=2)).logits
        assert_close(hf, ref, rtol=1e-5, atol=1e-5)


def test_missing_key(pg1_dir, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    bad = copy_with(pg1_dir, tmp_path / "bad", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(CheckpointError, match=r"missing keys: \['" + key.replace(".", r"\.")):
        PaliGemma.from_pretrained(bad)


def test_unexpected_key(pg1_dir, tmp_path):
    bad = copy_with(pg1_dir, tmp_path / "bad", lambda s: {**s, "language_model.model.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: \['language_model\.model\.extra\.weight"):
        PaliGemma.from_pretrained(bad)


def test_wrong_shape(pg1_dir, tmp_path):
    key = "multi_modal_projector.linear.bias"
    bad = copy_with(pg1_dir, tmp_path / "bad", lambda s: {**s, key: torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"multi_modal_projector\.linear\.bias.*file \(7,\), model \(48,\)"):
        PaliGemma.from_pretrained(bad)


def test_missing_config_field(pg1_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pg1_dir, bad)
    d = json.loads((bad / "config.json").read_text())
    del d["vision_config"]["hidden_size"]
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json: vision_config: missing required field\(s\) \['hidden_size'\]"):
        PaliGemma.from_pretrained(bad)


def test_folder_without_weights(pg1_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    shutil.copy(pg1_dir / "config.json", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        PaliGemma.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        PaliGemma.from_pretrained(tmp_path / "does-not-exist")


def test_same_dtype_tensors_are_views_of_the_file_and_converted_ones_are_not(pg2_dir, tmp_path):
    """A bf16 file loaded as bf16 is mapped, not copied (PaliGemma 2 ships bf16 files); loaded as float32
    it is converted into memory of its own. Checked by where each parameter's data lives."""
    src = PaliGemma.from_pretrained(pg2_dir)
    bf16_dir = tmp_path / "bf16"
    src.to(torch.bfloat16).save_pretrained(bf16_dir)
    mapped = []
    for dtype in (torch.bfloat16, torch.float32):
        model = PaliGemma.from_pretrained(bf16_dir, dtype=dtype)
        file = str((bf16_dir / "model.safetensors").resolve())
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                  for line in open("/proc/self/maps") if line.rstrip().endswith(file)]
        inside = [any(a <= p.data_ptr() < b for a, b in ranges) for p in model.parameters()]
        mapped.append((all(inside), any(inside)))
        torch.testing.assert_close(model.state_dict(), {k: v.to(dtype) for k, v in src.to(torch.bfloat16).state_dict().items()},
                                   atol=0, rtol=0)
    assert mapped == [(True, True), (False, False)]


def test_truncated_file_is_named_not_read_past_its_end(pg1_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pg1_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.+' needs bytes \d+\.\.\d+ of \d+ .*truncated"):
        PaliGemma.from_pretrained(bad)
    (bad / "model.safetensors").write_bytes(data[:100])  # cut inside the header
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a safetensors file or truncated \(100 bytes"):
        PaliGemma.from_pretrained(bad)


def test_git_lfs_pointer_says_git_lfs_pull(pg1_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pg1_dir, bad)
    (bad / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                           "oid sha256:" + "0" * 64 + "\nsize 5920000000\n")
    with pytest.raises(CheckpointError, match=r"model.safetensors: a Git LFS pointer file, not the weights: run `git lfs pull`"):
        PaliGemma.from_pretrained(bad)


def test_missing_path_that_looks_like_a_hub_id_says_both(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"^checkpoints/run1: not a local folder; as a hub id: \w+"):
        PaliGemma.from_pretrained("checkpoints/run1")


def test_loading_does_not_import_torch_dynamo(pg1_dir):
    """nn.Embedding's random init on the meta device imports torch._dynamo (2-7 s here, more than the
    whole load of a bf16 3B checkpoint): from_pretrained must not trigger it. A fresh process, since
    anything else in this one may have imported it already."""
    import subprocess
    import sys
    code = (f"import sys, torch; from paligemma import PaliGemma; PaliGemma.from_pretrained({str(pg1_dir)!r}); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- issue #28: a header whose byte range does not fit its shape ---

def write_safetensors(path, header: dict, data: bytes):
    """A safetensors file written by hand: u64 header length, JSON header, raw bytes."""
    import struct
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("shape, offsets", [([2, 3], [0, 28]), ([2, 3], [0, 20]), ([7], [0, 24]), ([], [0, 8])])
def test_header_byte_range_must_fit_its_shape(tmp_path, shape, offsets):
    """F32 (2, 3) is 24 bytes: a range of 28 or 20 bytes is refused, as is a shape its range does not
    hold, even where the file is exactly as long as the header says (safetensors' own reader refuses
    the same files); the well-formed file reads back."""
    from safetensors import SafetensorError
    from paligemma.weights import read_header
    data = torch.arange(7, dtype=torch.float32).numpy().tobytes()  # 28 bytes
    ok = write_safetensors(tmp_path / "ok.safetensors", {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}},
                           data[:24])
    assert read_header(ok)["w"]["shape"] == [2, 3]
    assert torch.equal(load_file(ok)["w"], torch.arange(6, dtype=torch.float32).view(2, 3))
    bad = write_safetensors(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}},
                            data[:offsets[1]])
    with pytest.raises(SafetensorError, match="invalid shape, data type, or offset"):
        load_file(bad)
    nbytes = 4 * math.prod(shape)
    with pytest.raises(CheckpointError, match=rf"bad.safetensors: tensor 'w' needs bytes {offsets[0]}\.\.{offsets[1]} "
                                              rf"of {offsets[1]} \({nbytes} for F32 {re.escape(str(shape))}\)"):
        read_header(bad)


def test_a_dtype_the_reader_does_not_take_is_named(tmp_path):
    """An F8_E4M3 tensor (or any dtype FILE_DTYPES lacks) is named with its dtype, not as a malformed entry."""
    from paligemma.weights import read_header
    bad = write_safetensors(tmp_path / "f8.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}},
                            bytes(4))
    with pytest.raises(CheckpointError, match=r"f8.safetensors: tensor 'w' is F8_E4M3, a dtype this reader does not take"):
        read_header(bad)
