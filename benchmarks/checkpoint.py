"""A random PaliGemma checkpoint in the hub's layout (config.json + float32 safetensors shards + index).

    python benchmarks/checkpoint.py OUT [--shape 3b|small] [--text-layers N] [--vision-layers N]
    python benchmarks/checkpoint.py OUT --gemma-from CKPT   # CKPT's decoder as a transformers GemmaForCausalLM

The config is the real hub config of google/paligemma-3b-pt-224 (tests/data), so transformers and
this project read the same file. Tensors are written shard by shard: peak memory is one shard.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without `pip install -e .`
HUB_CONFIG = ROOT / "tests" / "data" / "paligemma-3b-pt-224.config.json"
SHARD_BYTES = 2 << 30


def hub_config(shape: str, text_layers: int | None, vision_layers: int | None) -> dict:
    config = json.loads(HUB_CONFIG.read_text())
    if shape == "small":  # PaliGemma's structure at a size where every line runs in seconds
        config["text_config"].update(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                     num_key_value_heads=1, head_dim=64, num_hidden_layers=6, vocab_size=32000)
        config["vision_config"].update(hidden_size=384, intermediate_size=1536, num_attention_heads=6,
                                       num_hidden_layers=6)
        config.update(hidden_size=512, projection_dim=512, image_token_index=31999)
        config["vision_config"]["projection_dim"] = 512
    if text_layers:
        config["text_config"]["num_hidden_layers"] = text_layers
    if vision_layers:
        config["vision_config"]["num_hidden_layers"] = vision_layers
    return config


def shapes(config: dict) -> dict:
    """Hub key -> shape, from this project's model built on the meta device (its names are the hub's)."""
    from paligemma import PaliGemma, PaliGemmaConfig
    with torch.device("meta"):
        model = PaliGemma(PaliGemmaConfig.from_dict(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write(out: str | Path, config: dict, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    groups, current, size = [], [], 0
    for key, shape in shapes(config).items():
        nbytes = 4 * torch.Size(shape).numel()
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key, shape in group:
            std = 0.1 if "norm" in key else 0.02
            tensors[key] = torch.randn(shape, generator=g) * std
            weight_map[key] = name
            total += tensors[key].numel() * 4
        save_file(tensors, out / name, metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_gemma(ckpt: str | Path, out: str | Path) -> Path:
    """The decoder of one of these checkpoints as a transformers `GemmaForCausalLM` checkpoint (bf16, the
    dtype both sides compute in; keys without `language_model.`; a small SentencePiece tokenizer, which
    llama.cpp's converter pads to the vocabulary with unused pieces): what benchmarks/llamacpp.py
    converts to GGUF, so that llama.cpp decodes the very weights ours does."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from paligemma.tokenizer import train_tokenizer
    ckpt, out = Path(ckpt), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((ckpt / "config.json").read_text())
    text = dict(config["text_config"], architectures=["GemmaForCausalLM"], model_type="gemma", torch_dtype="bfloat16",
                bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(sorted(ckpt.glob("*.safetensors"))):
        tensors = {}
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if key.startswith("language_model."):
                    tensors[key.removeprefix("language_model.")] = f.get_tensor(key).to(torch.bfloat16)
        if tensors:
            name = f"model-{i + 1:05d}.safetensors"
            save_file(tensors, out / name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, name)
            total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(text, indent=2))
    words = "a an the of with and near river road field building plane airport lake beach ships".split()
    model = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], out / "tokenizer", vocab_size=300)
    assert model == out / "tokenizer.model"
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--shape", choices=["3b", "small"], default="3b")
    p.add_argument("--text-layers", type=int)
    p.add_argument("--vision-layers", type=int)
    p.add_argument("--gemma-from", help="instead: write this checkpoint's decoder as a transformers GemmaForCausalLM")
    args = p.parse_args()
    if args.gemma_from:
        write_gemma(args.gemma_from, args.out)
    else:
        write(args.out, hub_config(args.shape, args.text_layers, args.vision_layers))
    print(args.out)


if __name__ == "__main__":
    main()
