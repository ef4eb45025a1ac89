"""LoRA: our module against PEFT and hand-computed values."""
import json
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import lora
from paligemma import PaliGemma, PaliGemmaConfig
from tests.helpers import batch, load_hf

N_IMG = 16
DATA = Path(__file__).parent / "data"


def logits(model, seed=0):
    with torch.no_grad():
        return model(**batch(N_IMG, prompt_lens=(4, 6), suffix_len=3, seed=seed))


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


@pytest.fixture
def model(pg2_dir):
    return PaliGemma.from_pretrained(pg2_dir)


def test_fresh_injection_changes_nothing(model):
    before = logits(model)
    names = lora.inject(model, "all", r=4, alpha=8)
    assert len(names) == 2 * 6 + 3 * 7 + 1  # vision q,k,v,out,fc1,fc2 x2; decoder 7 x3; projector
    assert torch.equal(logits(model), before)


def test_suffix_list_reaches_both_towers(model):
    names = lora.inject(model, ["q_proj", "v_proj"], r=2)
    assert {n.split(".")[0] for n in names} == {"vision_tower", "language_model"}
    summary = lora.summary(model)
    assert "| vision | " in summary and "| decoder | " in summary


def test_only_intended_parameters_change(model):
    lora.inject(model, "decoder", r=4, alpha=8)
    lora.train_modules(model, ["multi_modal_projector"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(N_IMG, prompt_lens=(4, 6), suffix_len=3)
    labels = inputs["input_ids"].masked_fill(inputs["token_type_ids"] == 0, -100)
    model.loss(labels=labels, **inputs).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    expected = {k for k in before if ".lora_" in k or k.startswith("multi_modal_projector.")}
    assert changed == expected


def test_merge_unmerge_round_trip(model):
    lora.inject(model, "all", r=4, alpha=8)
    randomize_lora(model)
    unmerged = logits(model)
    lora.merge(model)
    assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        lora.merge(model)
    lora.unmerge(model)
    assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-5)  # float32 W + d - d: rounding only


def test_merge_in_bf16(pg2_dir):
    model = PaliGemma.from_pretrained(pg2_dir, dtype=torch.bfloat16)
    lora.inject(model, "all", r=4, alpha=8)
    randomize_lora(model)
    unmerged = logits(model).float()
    lora.merge(model)
    assert_close(logits(model).float(), unmerged, rtol=0.05, atol=0.05)  # one bf16 rounding of W + BA


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling(model, rslora):
    lora.inject(model, ["multi_modal_projector.linear"], r=4, alpha=6, rslora=rslora)
    layer = model.multi_modal_projector.linear
    assert layer.scaling == (6 / 2 if rslora else 6 / 4)
    randomize_lora(model)
    x = torch.randn(3, layer.base.in_features)
    expected = layer.base(x) + layer.scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_gradients_with_activation_checkpointing(model):
    lora.inject(model, "all", r=4, alpha=8)
    randomize_lora(model)
    model.set_gradient_checkpointing(True)
    model.train()
    inputs = batch(N_IMG, prompt_lens=(4,), suffix_len=3)
    labels = inputs["input_ids"].masked_fill(inputs["token_type_ids"] == 0, -100)
    model.loss(labels=labels, **inputs).backward()
    for name, layer in lora.lora_layers(model).items():
        assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0, name
        assert layer.lora_A.weight.grad is not None, name


def test_errors(model, tmp_path):
    with pytest.raises(ValueError, match="match no module"):
        lora.inject(model, "nothing_here")
    with pytest.raises(ValueError, match="linear layers only"):
        lora.inject(model, ["mlp"])
    lora.inject(model, "projector")
    with pytest.raises(RuntimeError, match="already has LoRA layers"):
        lora.inject(model, "decoder")


def peft_model(folder, targets, r=4, alpha=8, rslora=False):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(load_hf(folder), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                      use_rslora=rslora, lora_dropout=0.0))


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft(pg2_dir, tmp_path, rslora):
    from peft import PeftModel
    ours = PaliGemma.from_pretrained(pg2_dir)
    lora.inject(ours, "all", r=4, alpha=8, rslora=rslora)
    randomize_lora(ours)
    lora.save(ours, tmp_path / "adapter", base_model_name_or_path=str(pg2_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias",
            "base_model_name_or_path"} <= set(config)
    hf = PeftModel.from_pretrained(load_hf(pg2_dir), tmp_path / "adapter").eval()
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=3)
    with torch.no_grad():
        assert_close(ours(**inputs), hf(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_ours(pg2_dir, tmp_path):
    hf = peft_model(pg2_dir, ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "gate_proj", "linear"],
                    r=3, alpha=5)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "peft")
    ours = PaliGemma.from_pretrained(pg2_dir)
    names = lora.load(ours, tmp_path / "peft")
    assert any(n.startswith("vision_tower.vision_model.") for n in names)
    assert "multi_modal_projector.linear" in names
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=3)
    hf.eval()
    with torch.no_grad():
        assert_close(ours(**inputs), hf(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_adapter_that_does_not_fit(pg1_dir, pg2_dir, tmp_path):
    ours = PaliGemma.from_pretrained(pg2_dir)
    lora.inject(ours, "decoder", r=4)
    lora.save(ours, tmp_path / "pg2")
    with pytest.raises(lora.AdapterError, match="not linear layers of the model.*layers\\.2"):
        lora.load(PaliGemma.from_pretrained(pg1_dir), tmp_path / "pg2")  # pg1 has 2 layers, pg2 has 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(lora.AdapterError, match="no adapter_config.json"):
        lora.load(PaliGemma.from_pretrained(pg1_dir), tmp_path / "empty")


@pytest.mark.parametrize("text, message", [("{\"r\": 4,", r"adapter_config.json: not valid JSON \(Expecting"),
                                           ("[4, 8]", "adapter_config.json: expected a JSON object, got list"),
                                           ('{"r": "4", "lora_alpha": 8}', r"adapter_config.json: r is '4', expected a positive integer"),
                                           ('{"r": 4, "lora_alpha": null}', "adapter_config.json: lora_alpha is None, expected a number")])
def test_malformed_adapter_config_is_named(pg1_dir, tmp_path, text, message):
    ours = PaliGemma.from_pretrained(pg1_dir)
    lora.inject(ours, "decoder", r=4)
    lora.save(ours, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(text)
    with pytest.raises(lora.AdapterError, match=message):
        lora.load(PaliGemma.from_pretrained(pg1_dir), tmp_path / "a")


def test_export_merged_loads_everywhere(pg2_dir, tmp_path):
    ours = PaliGemma.from_pretrained(pg2_dir)
    lora.inject(ours, "all", r=4, alpha=8)
    randomize_lora(ours)
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=3)
    with torch.no_grad():
        expected = ours(**inputs)
    lora.export_merged(ours, tmp_path / "merged")
    with torch.no_grad():
        assert_close(PaliGemma.from_pretrained(tmp_path / "merged")(**inputs), expected, rtol=1e-5, atol=1e-5)
        hf = load_hf(tmp_path / "merged")(**inputs).logits
    assert_close(hf, expected, rtol=1e-5, atol=1e-5)
    assert not any(l.merged for l in lora.lora_layers(ours).values())


def test_3b_decoder_only_table_on_meta():
    """The study's setup (decoder q,k,v,o,gate,up,down; r=8) at full PaliGemma-3B size, no weights allocated.
    Hand count per layer: q, o 8*(2048+2048); k, v 8*(2048+256); gate, up 8*(2048+16384); down 8*(16384+2048)."""
    config = PaliGemmaConfig.from_json(DATA / "paligemma-3b-pt-224.config.json")
    with torch.device("meta"):
        model = PaliGemma(config)
    lora.inject(model, "decoder", r=8, alpha=16)
    per_layer = 2 * 8 * 4096 + 2 * 8 * 2304 + 3 * 8 * 18432
    assert per_layer == 544_768
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 18 * per_layer == 9_805_824
    table = lora.summary(model)
    assert "| decoder |" in table and "9,805,824" in table
    assert "| vision | " in table and "| 0 (0.000%) |" in table


def test_regex_target_must_match_the_whole_name(pg1_dir):
    """A string target is a regex matched against the whole module name (PEFT's re.fullmatch):
    'q_proj' alone names no module, '.*language_model.*q_proj' only the decoder's query projections."""
    model = PaliGemma.from_pretrained(pg1_dir)
    with pytest.raises(ValueError, match="match no module"):
        lora.inject(model, "q_proj")
    lora.inject(model, r".*language_model.*q_proj", r=2)
    wrapped = sorted(lora.lora_layers(model))
    assert wrapped == [f"language_model.model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_dropout_on_the_lora_input_only():
    """y = W x + s B A dropout(x) (PEFT): the mask has the input's shape and the base path is never
    dropped; checked against the formula with the same dropout draw."""
    from lora.layer import LoRALinear
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 20)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(6, 12)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    torch.manual_seed(1)
    y = layer(x)
    with torch.no_grad():
        expected = base(x) + 2.0 * dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert_close(y, expected)
    assert not torch.allclose(y, base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)


# --- issue #27: what trains is what is exported; merge refused where it cannot be exact; full disk ---

def train_projector_too(model, seed=0):
    """--lora decoder --train-modules multi_modal_projector, with trained-looking values on both."""
    lora.inject(model, "decoder", r=4, alpha=8)
    lora.train_modules(model, ["multi_modal_projector"])
    randomize_lora(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.multi_modal_projector.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_modules_to_save_reach_peft(pg2_dir, tmp_path):
    """The projector trained beside LoRA is in the adapter as PEFT's modules_to_save (its key layout, as
    PEFT 0.21 itself writes it): PeftModel on transformers computes our logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    ours = PaliGemma.from_pretrained(pg2_dir)
    train_projector_too(ours)
    assert lora.trained_modules(ours) == ["multi_modal_projector"]
    lora.save(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.multi_modal_projector"]
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {"base_model.model.model.multi_modal_projector.linear.weight",
            "base_model.model.model.multi_modal_projector.linear.bias"} <= keys
    hf = PeftModel.from_pretrained(load_hf(pg2_dir), tmp_path / "adapter").eval()
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=3)
    with torch.no_grad():
        assert_close(ours(**inputs), hf(**inputs).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(PaliGemma.from_pretrained(pg2_dir)(**inputs), ours(**inputs), atol=1e-3)


def test_peft_modules_to_save_load_in_ours(pg2_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    hf = get_peft_model(load_hf(pg2_dir), LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "fc1"],
                                                      modules_to_save=["multi_modal_projector"]))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "peft")
    ours = PaliGemma.from_pretrained(pg2_dir)
    lora.load(ours, tmp_path / "peft")
    assert lora.trained_modules(ours) == ["multi_modal_projector"]  # trains again, as in PEFT; saves again
    inputs = batch(N_IMG, prompt_lens=(6,), suffix_len=3)
    hf.eval()
    with torch.no_grad():
        assert_close(ours(**inputs), hf(**inputs).logits, rtol=1e-5, atol=1e-5)
    lora.save(ours, tmp_path / "again")
    again = PaliGemma.from_pretrained(pg2_dir)
    lora.load(again, tmp_path / "again")
    assert_close(again.multi_modal_projector.linear.weight, ours.multi_modal_projector.linear.weight, rtol=0, atol=0)


def test_modules_to_save_older_peft_keys_and_mismatches(pg2_dir, tmp_path):
    """PEFT before 0.17 kept `.modules_to_save.` in the key; a file lacking a module's weight is named."""
    from safetensors.torch import load_file, save_file
    ours = PaliGemma.from_pretrained(pg2_dir)
    train_projector_too(ours)
    lora.save(ours, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(path)
    old = {k.replace("multi_modal_projector.", "multi_modal_projector.modules_to_save."): v for k, v in state.items()}
    save_file(old, path)
    other = PaliGemma.from_pretrained(pg2_dir)
    lora.load(other, tmp_path / "a")
    assert torch.equal(other.multi_modal_projector.linear.weight, ours.multi_modal_projector.linear.weight)
    save_file({k: v for k, v in state.items() if not k.endswith("projector.linear.bias")}, path)
    with pytest.raises(lora.AdapterError, match=r"modules_to_save \['multi_modal_projector'\] do not fit: "
                                                r"missing \['multi_modal_projector.linear.bias'\]"):
        lora.load(PaliGemma.from_pretrained(pg2_dir), tmp_path / "a")


def test_training_a_module_both_whole_and_by_lora_is_refused(model):
    lora.inject(model, "projector", r=2)
    with pytest.raises(ValueError, match=r"cannot train 'multi_modal_projector' whole: it holds LoRA layers "
                                         r"\['multi_modal_projector.linear'\]"):
        lora.train_modules(model, ["multi_modal_projector"])


def packed_three_ways(pg2_dir):
    """LoRA layers whose base is packed: by pack() at once; lazily (load_for_inference's `after`) and
    packed by enough multi-row forwards; lazily and not yet packed."""
    from paligemma.packing import AFTER, PackedLinear, pack
    if not torch.backends.mkldnn.is_available():
        pytest.skip("packing needs oneDNN (mkldnn)")
    models = {}
    for way in ("pack()", "lazily, packed", "lazily, not yet packed"):
        m = PaliGemma.from_pretrained(pg2_dir)
        lora.inject(m, "all", r=4, alpha=8)
        randomize_lora(m)
        pack(m.requires_grad_(False), after=0 if way == "pack()" else AFTER)
        if way == "lazily, packed":
            for i in range(AFTER):
                logits(m, seed=i)
        bases = [l.base for l in lora.lora_layers(m).values()]
        assert all(isinstance(b, PackedLinear) for b in bases)
        assert all((b.packed is None) == (way == "lazily, not yet packed") for b in bases)
        models[way] = m
    return models


def test_merge_on_packed_layers_is_refused_by_name(pg2_dir):
    """The issue's silent error: merging into a packed base wrote into a dense copy and marked the layer
    merged (logits 2.4 off). Every way a layer can be packed is refused, naming the layer, before any
    layer changes; merging first and packing after is exact."""
    from paligemma.packing import pack
    for way, m in packed_three_ways(pg2_dir).items():
        before = logits(m)
        with pytest.raises(RuntimeError, match=r"lora.merge: \S+: cannot merge into a PackedLinear base"):
            lora.merge(m)
        assert not any(l.merged for l in lora.lora_layers(m).values()), way
        assert_close(logits(m), before, rtol=0, atol=0)
    plain = PaliGemma.from_pretrained(pg2_dir)
    lora.inject(plain, "all", r=4, alpha=8)
    randomize_lora(plain)
    unmerged = logits(plain)
    lora.merge(plain)
    pack(plain.requires_grad_(False))
    assert_close(logits(plain), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="lora.unmerge: .*cannot unmerge from a PackedLinear base"):
        lora.unmerge(plain)


def test_lora_cannot_wrap_a_model_loaded_for_inference(pg2_dir):
    """from_pretrained(inference=True) packs (or will pack) every linear layer: LoRA refuses them by type."""
    m = PaliGemma.from_pretrained(pg2_dir, inference=True)
    with pytest.raises(ValueError, match=r"linear layers only .*PackedLinear"):
        lora.inject(m, "decoder")


def test_full_disk_keeps_the_previous_adapter(model, tmp_path, monkeypatch):
    import errno
    import lora.peft_format as peft_format
    lora.inject(model, "decoder", r=4)
    lora.save(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    randomize_lora(model)

    def full(path, data=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)  # the config, written after the weights' temp file
    with pytest.raises(OSError, match=rf"no space left on device: {tmp_path / 'a' / 'adapter_config.json'}"):
        lora.save(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before  # both old files, no temp
    monkeypatch.undo()

    def full_safetensors(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(peft_format, "save_file", full_safetensors)
    with pytest.raises(OSError, match="no space left on device: .*adapter_model.safetensors"):
        lora.save(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


# --- issue #28: what the adapter files keep, and what the loader refuses ---

def saved_adapter(folder, tmp_path, **kwargs):
    """A decoder adapter of the tiny PaliGemma 1 model with random B, saved in tmp_path / 'a'."""
    ours = PaliGemma.from_pretrained(folder)
    lora.inject(ours, "decoder", **{"r": 4, "alpha": 8, **kwargs})
    randomize_lora(ours)
    lora.save(ours, tmp_path / "a")
    return ours, tmp_path / "a"


def test_dropout_and_rslora_are_written_and_loaded(pg1_dir, tmp_path):
    """lora_dropout and use_rslora reach the file (as PEFT reads it back) and the loaded layers."""
    from peft import LoraConfig
    ours, folder = saved_adapter(pg1_dir, tmp_path, r=4, alpha=6, dropout=0.25, rslora=True)
    config = LoraConfig.from_pretrained(folder)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 6, 0.25, True)
    again = PaliGemma.from_pretrained(pg1_dir)
    names = lora.load(again, folder)
    layers = lora.lora_layers(again)
    assert sorted(names) == sorted(layers) == sorted(lora.lora_layers(ours))
    assert {(l.dropout.p, l.scaling, l.rslora) for l in layers.values()} == {(0.25, 6 / 2, True)}
    ours.eval(), again.eval()
    assert torch.equal(logits(again), logits(ours))


@pytest.mark.parametrize("part", ["lora_A", "lora_B"])
def test_adapter_file_missing_a_tensor_is_refused(pg1_dir, tmp_path, part):
    from safetensors.torch import load_file, save_file
    _, folder = saved_adapter(pg1_dir, tmp_path)
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    key = f"base_model.model.model.language_model.layers.1.mlp.down_proj.{part}.weight"
    del state[key]
    save_file(state, path)
    with pytest.raises(lora.AdapterError, match=rf"missing \['language_model\.model\.layers\.1\.mlp\.down_proj\.{part}'\]"):
        lora.load(PaliGemma.from_pretrained(pg1_dir), folder)


@pytest.mark.parametrize("edit, message", [
    (dict(r=0), "r is 0, expected a positive integer"),
    (dict(r=-2), "r is -2, expected a positive integer"),
    (dict(r=True), "r is True, expected a positive integer"),
    (dict(r=4.0), "r is 4.0, expected a positive integer"),
    (dict(lora_alpha=True), "lora_alpha is True, expected a number"),
    (dict(peft_type="IA3"), "peft_type 'IA3', expected 'LORA'"),
    (dict(use_dora=True), "DoRA adapters are not supported"),
    (dict(rank_pattern={"q_proj": 8}), "per-layer rank_pattern is not supported"),
    (dict(r=None), "r is None"),
])
def test_adapter_configs_the_loader_refuses(pg1_dir, tmp_path, edit, message):
    _, folder = saved_adapter(pg1_dir, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(lora.AdapterError, match="adapter_config.json: " + re.escape(message)):
        lora.load(PaliGemma.from_pretrained(pg1_dir), folder)


def test_adapter_whose_rank_disagrees_with_its_tensors_is_refused(pg1_dir, tmp_path):
    _, folder = saved_adapter(pg1_dir, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, r=2)))
    with pytest.raises(lora.AdapterError, match=r"wrong shapes \['language_model\.model\.layers\.0\.mlp\.down_proj"
                                                r"\.lora_A: file \(4, 96\), model \(2, 96\)"):
        lora.load(PaliGemma.from_pretrained(pg1_dir), folder)


def test_a_merged_model_is_not_saved_as_an_adapter(pg1_dir, tmp_path):
    ours = PaliGemma.from_pretrained(pg1_dir)
    lora.inject(ours, "decoder", r=4)
    lora.merge(ours)
    with pytest.raises(RuntimeError, match="unmerge before saving"):
        lora.save(ours, tmp_path / "a")
    assert not (tmp_path / "a").exists()
