"""What the three commands (caption, evaluate.py, train.py) share: the dtype names, and loading a
model for inference with an optional LoRA adapter."""
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_inference(model: str, adapter: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, processor): a checkpoint folder or hub id, the adapter (PEFT format) applied, and on CPU
    the linear layers packed for speed (identical captions, see packing.py)."""
    from .model import PaliGemma
    from .packing import pack
    from .processor import Processor
    if not adapter:
        return PaliGemma.from_pretrained(model, DTYPES[dtype], device, inference=True), Processor.from_pretrained(model)
    net = PaliGemma.from_pretrained(model, DTYPES[dtype], device)
    import lora  # the one direction: commands use LoRA; lora/ imports nothing from paligemma/
    lora.load(net, adapter)  # LoRA wraps plain linear layers: pack after it
    return pack(net.requires_grad_(False)), Processor.from_pretrained(model)
