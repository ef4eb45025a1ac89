"""PaliGemma from scratch: read top to bottom in this order.

config.py      hub config.json -> dataclasses
attention.py   scaled dot-product attention for both towers (one softmax, kernel chosen in one place)
hookpoint.py   identity modules that name the tensors a researcher reads or patches (free when unheard)
siglip.py      vision tower (image -> patch tokens)
gemma.py       Gemma / Gemma 2 decoder, and the tied output head
cache.py       static KV cache, and the attention masks its slots' flags make
model.py       PaliGemma: merge image tokens into the text, prefix-LM masks, logits and loss
weights.py     hub checkpoints -> model, without a float32 detour (safetensors_io.py: the file format)

Then, around the model:
tokenizer.py, processor.py   text and images -> the prompt layout and labels PaliGemma was trained on
generation.py                greedy, sampling and beam search over the cache (a compiled decode step)
inference.py                 a checkpoint (+ adapter) loaded for inference; captions of many images
tasks/                       what each task's answers mean: <loc> boxes, <seg> masks, and their scores
caption.py, cli.py           the captioning command; the arguments and one-line errors the commands share
atomic.py, checkpointing.py  crash-safe writes and run-folder locks; activation checkpointing

Add-ons: they swap or hook modules of a built model, and the model files never import them
(from_pretrained lets packing and quantize convert each weight as it is read, so that no dense copy
is made first); imports point one way, checked by tests/test_imports.py:
packing.py                   faster CPU inference (oneDNN-reordered weights)
quantize.py, int4.py         int8, int4 and 4-bit NF4 linear layers (dequantize.py: their shared
                             backward; smaller models, QLoRA with `lora`)
probe/                       hooks, run_with_cache, recorded generation, knockout, patch sweeps, the report
verify.py                    every stage against transformers on your own weights

The fine-tuning application (data, training, run folders, metrics, the synthetic demo) is
`paligemma.captioning`; LoRA is the separate package `lora`, which imports nothing from here.
"""
from .cache import KVCache
from .config import ConfigError, PaliGemmaConfig, TextConfig, VisionConfig
from .model import PaliGemma
from .processor import Processor
from .weights import CheckpointError

__all__ = ["PaliGemma", "Processor", "PaliGemmaConfig", "TextConfig", "VisionConfig", "KVCache", "ConfigError",
           "CheckpointError"]
