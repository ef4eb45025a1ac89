"""LoRA for PaliGemma, in both towers and the projector.

    import lora
    names = lora.inject(model, "decoder", r=8, alpha=16)   # or "vision", "projector", "all", a regex, a list
    print(lora.summary(model))                             # trainable parameters per tower
    lora.train_modules(model, ["multi_modal_projector"])    # trained whole, saved as PEFT's modules_to_save
    lora.save(model, "adapter/"); lora.load(model, "adapter/")   # PEFT's file format
    lora.merge(model); lora.unmerge(model)                 # explicit, never a side effect
"""
from .inject import inject, lora_layers, matches, merge, summary, train_modules, trained_modules, unmerge
from .layer import LoRALinear
from .peft_format import AdapterError, export_merged, load, save

__all__ = ["LoRALinear", "matches", "inject", "merge", "unmerge", "save", "load", "export_merged", "summary",
           "train_modules", "trained_modules", "lora_layers", "AdapterError"]
