"""python -m paligemma.verify end to end on tiny checkpoints: passes as it is, and names the right
stage when one of our layers is perturbed."""
import shutil

import pytest

from paligemma import gemma, siglip, verify


@pytest.fixture(scope="module")
def pg2_tok_dir(pg2_dir, pg1_tok_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg2tok")
    for f in pg2_dir.iterdir():
        shutil.copy(f, folder / f.name)
    shutil.copy(pg1_tok_dir / "tokenizer.model", folder / "tokenizer.model")
    return folder


def run(capsys, *argv):
    try:
        verify.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


def stage_lines(out):
    return {line[:24].strip(): line for line in out.splitlines()[1:] if line.endswith(("ok", "BEYOND"))}


@pytest.mark.parametrize("family", ["pg1", "pg2"])
def test_verify_passes(request, capsys, family):
    folder = request.getfixturevalue("pg1_tok_dir" if family == "pg1" else "pg2_tok_dir")
    code, out = run(capsys, folder)
    assert code == 0, out
    lines = stage_lines(out)
    layers = 2 if family == "pg1" else 3
    expected = (["siglip embeddings", "siglip layer 0", "siglip layer 1", "siglip post-layernorm", "projector",
                 "merged embeddings"] + [f"decoder layer {i}" for i in range(layers)]
                + ["final norm", "logits", "greedy tokens"])
    assert list(lines) == expected
    assert all(line.endswith("ok") for line in lines.values())
    assert "OK: every stage within tolerance" in out


def test_verify_bfloat16_passes(capsys, pg2_tok_dir):
    code, out = run(capsys, pg2_tok_dir, "--dtype", "bfloat16")
    assert code == 0, out


def test_verify_names_a_perturbed_decoder_layer(monkeypatch, capsys, pg1_tok_dir):
    forward = gemma.GemmaDecoderLayer.forward

    def off_by_a_little(self, x, *args, **kwargs):
        out = forward(self, x, *args, **kwargs)
        return out * 1.001 if self.self_attn.layer == 1 else out

    monkeypatch.setattr(gemma.GemmaDecoderLayer, "forward", off_by_a_little)
    code, out = run(capsys, pg1_tok_dir)
    assert code == 1
    lines = stage_lines(out)
    assert lines["decoder layer 0"].endswith("ok") and lines["decoder layer 1"].endswith("BEYOND")
    assert "FAIL: first stage beyond tolerance: decoder layer 1 (relative error" in out


def test_verify_names_a_perturbed_vision_layer(monkeypatch, capsys, pg1_tok_dir):
    forward = siglip.SiglipMLP.forward
    monkeypatch.setattr(siglip.SiglipMLP, "forward", lambda self, x: forward(self, x) + 1e-3)
    code, out = run(capsys, pg1_tok_dir)
    assert code == 1
    assert stage_lines(out)["siglip embeddings"].endswith("ok")
    assert "FAIL: first stage beyond tolerance: siglip layer 0 " in out


def test_verify_without_transformers_says_so(monkeypatch, pg1_tok_dir):
    import builtins
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(SystemExit, match="pip install transformers"):
        verify.compare(str(pg1_tok_dir))


def test_stage_table_matches_both_models(pg1_tok_dir):
    """Every module path in the stage table exists on both sides."""
    from paligemma import PaliGemma
    from tests.helpers import load_hf
    ours, theirs = PaliGemma.from_pretrained(pg1_tok_dir), load_hf(pg1_tok_dir)
    mine, hf = dict(ours.named_modules()), dict(theirs.named_modules())
    for stage, o, t in verify.stages(ours.config):
        assert o in mine, stage
        assert t is None or t in hf, stage


def test_verify_with_adapter(capsys, pg1_tok_dir, tmp_path):
    """A LoRA adapter (non-zero B, so it changes the model) applied on both sides: ours via lora.load,
    transformers' via PEFT."""
    import torch

    import lora
    from paligemma import PaliGemma
    model = PaliGemma.from_pretrained(pg1_tok_dir)
    lora.inject(model, "all", r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    lora.save(model, tmp_path / "adapter", str(pg1_tok_dir))
    code, out = run(capsys, pg1_tok_dir, "--adapter", tmp_path / "adapter")
    assert code == 0, out
    from tests.helpers import batch
    inputs = batch(16)
    with torch.no_grad():  # the adapter matters: a side without it would not pass
        assert not torch.allclose(model(**inputs), PaliGemma.from_pretrained(pg1_tok_dir)(**inputs), atol=1e-3)


# --- issue #27: bad numbers refused at parse time; bad input one line, through cli.run ---

@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_new_tokens_must_be_positive(capsys, value):
    with pytest.raises(SystemExit) as e:
        verify.main(["m", "--max-new-tokens", value])
    assert e.value.code == 2 and f"argument --max-new-tokens: expected an integer >= 1, got '{value}'" in capsys.readouterr().err


def test_missing_model_is_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    p = subprocess.run([sys.executable, "-m", "paligemma.verify", str(tmp_path / "nowhere")], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 1 and p.stderr.strip() == (f"paligemma.verify: {tmp_path / 'nowhere'}: not a checkpoint "
                                                      "folder, and not a hub repo id (owner/name)")
