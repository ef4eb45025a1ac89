"""PaliGemma from scratch: read top to bottom in this order.

config.py   hub config.json -> dataclasses
siglip.py   vision tower (image -> patch tokens)
gemma.py    Gemma / Gemma 2 decoder
cache.py    static KV cache
model.py    PaliGemma: merge image tokens into the text, prefix-LM masks, logits and loss
weights.py  hub checkpoints -> model, without a float32 detour

Then, around the model:
tokenizer.py, processor.py   text and images -> the prompt layout and labels PaliGemma was trained on
generation.py                greedy, sampling and beam search over the cache
packing.py                   faster CPU inference (oneDNN-reordered weights)
data.py, training.py         captions on disk -> batches; the pieces of train.py
distributed.py, curves.py    torchrun (DDP, FSDP2); loss.png
metrics.py, wordnet.py       BLEU / METEOR / ROUGE-L / CIDEr-D with the COCO toolkit's conventions
synthetic.py                 the embedded demo: procedural aerial scenes and a tiny config
atomic.py, caption.py        crash-safe writes; the captioning command line
"""
from .cache import KVCache
from .config import ConfigError, PaliGemmaConfig, TextConfig, VisionConfig
from .model import PaliGemma
from .weights import CheckpointError

__all__ = ["PaliGemma", "PaliGemmaConfig", "TextConfig", "VisionConfig", "KVCache", "ConfigError",
           "CheckpointError"]
