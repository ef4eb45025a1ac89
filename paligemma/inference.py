"""Inference around the model, for the commands and the fine-tuning application: a checkpoint (with an
adapter) loaded for captioning, and the captions of many images, one batch at a time.

    model, processor = load_for_inference("google/paligemma-3b-pt-224", adapter="runs/x/adapter")
    for path, text, error, image in caption_files(model, processor, paths, "caption en"):
        ...
"""
from .cli import DTYPES


def load_for_inference(model: str, adapter: str | None = None, dtype: str = "float32", device: str = "cpu",
                       quantize: str | None = None):
    """(model, processor): a checkpoint folder or hub id, quantized while loading if asked ("int8", "int4",
    "nf4": quantize.py), the adapter (PEFT format) applied, and on CPU the linear layers packed for
    speed once they have been used enough to pay for it (identical captions, see packing.py)."""
    from .model import PaliGemma
    from .processor import Processor
    net = PaliGemma.from_pretrained(model, DTYPES[dtype], device, inference=True, quantize=quantize, adapter=adapter)
    return net, Processor.from_pretrained(model)


def batches(items: list, size: int):
    """items in consecutive slices of `size` (the last may be shorter), with each slice's first index."""
    for i in range(0, len(items), size):
        yield i, items[i:i + size]


def caption_batch(model, processor, images: list, prompts, seed=None, **generate_kwargs) -> list[str]:
    """One forward batch: images (PIL or paths) and a prompt (or one per image) -> their captions."""
    inputs = processor(images, [prompts] * len(images) if isinstance(prompts, str) else prompts)
    kwargs = generate_kwargs if seed is None else dict(generate_kwargs, seed=seed)
    tokens = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, **kwargs)
    return processor.batch_decode(tokens)


def caption(model, processor, images, prompt="caption en", batch_size=8, seed=None, **generate_kwargs):
    """Yield one caption per image, in order; with a sampling `seed`, the batch starting at image i
    samples with seed + i (so a caption does not depend on how many batches came before)."""
    for i, chunk in batches(images, batch_size):
        yield from caption_batch(model, processor, chunk, prompt, None if seed is None else seed + i,
                                 **generate_kwargs)


def caption_files(model, processor, paths: list, prompt="caption en", batch_size=8, **generate_kwargs):
    """Yield (path, caption, None, image) for each readable image file (the RGB PIL image it was read as,
    for its size and drawing) and (path, None, error, None) for each other, in order, reading one batch of
    files at a time (a long list never sits in memory): one bad file never stops the rest."""
    for _, chunk in batches(paths, batch_size):
        images, errors = {}, {}
        for path in chunk:
            try:
                images[path] = processor.load_image(path)
            except (OSError, ValueError) as e:  # every decoding error is a ValueError naming the file
                errors[path] = e
        texts = dict(zip(images, caption_batch(model, processor, list(images.values()), prompt,
                                               **generate_kwargs))) if images else {}
        for path in chunk:
            yield (path, texts[path], None, images[path]) if path in texts else (path, None, errors[path], None)
