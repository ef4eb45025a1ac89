"""PaliGemma from scratch: read top to bottom in this order.

config.py   hub config.json -> dataclasses
siglip.py   vision tower (image -> patch tokens)
gemma.py    Gemma / Gemma 2 decoder
cache.py    static KV cache
model.py    PaliGemma: merge image tokens into the text, prefix-LM masks, logits and loss
weights.py  hub checkpoints -> model, without a float32 detour
"""
from .cache import KVCache
from .config import ConfigError, PaliGemmaConfig, TextConfig, VisionConfig
from .model import PaliGemma
from .weights import CheckpointError

__all__ = ["PaliGemma", "PaliGemmaConfig", "TextConfig", "VisionConfig", "KVCache", "ConfigError",
           "CheckpointError"]
