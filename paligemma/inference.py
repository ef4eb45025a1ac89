"""Inference around the model, for the commands and the fine-tuning application: a checkpoint (with an
adapter) loaded for captioning, and the captions of many images, one batch at a time.

    model, processor = load_for_inference("google/paligemma-3b-pt-224", adapter="runs/x/adapter")
    for path, text, error in caption_files(model, processor, paths, "caption en"):
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


def caption_batch(model, processor, images: list, prompts, seed=None, loc_scores=False, **generate_kwargs) -> list:
    """One forward batch: images (PIL or paths) and a prompt (or one per image: the processor pads each
    row on the left, so rows of different prompts decode together) -> their captions; loc_scores: ->
    (caption, [probability of each <locNNNN> in it]) pairs (tasks/confidence.py)."""
    inputs = processor(images, [prompts] * len(images) if isinstance(prompts, str) else prompts)
    kwargs = dict(generate_kwargs, **({} if seed is None else {"seed": seed}))
    if loc_scores:
        kwargs["return_scores"] = True
    out = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, **kwargs)
    if not loc_scores:
        return processor.batch_decode(out)
    from .tasks.confidence import loc_probabilities
    tokens, probs = (t.cpu() for t in out)
    return [(processor.decode(t), loc_probabilities(processor.tokenizer, t, p)) for t, p in zip(tokens, probs)]


def caption(model, processor, images, prompt="caption en", batch_size=8, seed=None, **generate_kwargs):
    """Yield one caption per image, in order (prompt: one for all, or a list with one per image); with
    a sampling `seed`, the batch starting at image i samples with seed + i (so a caption does not
    depend on how many batches came before)."""
    if not isinstance(prompt, str) and len(prompt) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompt)} prompts: one prompt, or one per image")
    for i, chunk in batches(images, batch_size):
        prompts = prompt if isinstance(prompt, str) else prompt[i:i + len(chunk)]
        yield from caption_batch(model, processor, chunk, prompts, None if seed is None else seed + i,
                                 **generate_kwargs)


def caption_files(model, processor, paths: list, prompt="caption en", batch_size=8, **generate_kwargs):
    """Yield (path, caption, None) for each readable image file and (path, None, error) for each other,
    in order, reading one batch of files at a time (a long list never sits in memory): one bad file
    never stops the rest."""
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
            yield (path, texts[path], None) if path in texts else (path, None, errors[path])
