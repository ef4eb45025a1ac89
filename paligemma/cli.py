"""What the three commands (caption, evaluate.py, train.py) share: the dtype names, and loading a
model for inference with an optional LoRA adapter."""
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_inference(model: str, adapter: str | None = None, dtype: str = "float32", device: str = "cpu",
                       quantize: str | None = None):
    """(model, processor): a checkpoint folder or hub id, quantized while loading if asked ("int8",
    "nf4": quantize.py), the adapter (PEFT format) applied, and on CPU the linear layers packed for
    speed (identical captions, see packing.py)."""
    from .model import PaliGemma
    from .packing import pack
    from .processor import Processor
    if not adapter:
        net = PaliGemma.from_pretrained(model, DTYPES[dtype], device, inference=True, quantize=quantize)
        return net, Processor.from_pretrained(model)
    net = PaliGemma.from_pretrained(model, DTYPES[dtype], device, quantize=quantize)
    import lora  # the one direction: commands use LoRA; lora/ imports nothing from paligemma/
    lora.load(net, adapter)  # LoRA wraps plain (or quantized) linear layers: pack after it
    if quantize:
        from .quantize import int8_head
        int8_head(net)  # logits from an int8 copy of the table, not a packed bf16 one
    return pack(net.requires_grad_(False)), Processor.from_pretrained(model)
