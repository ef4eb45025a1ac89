"""Caption image files from the command line.

    python -m paligemma.caption --model PATH_OR_ID IMAGE [IMAGE ...] [--prompt "caption en"]
"""
import argparse

from tqdm import tqdm

from .cli import DTYPES, load_for_inference


def caption(model, processor, images, prompt="caption en", batch_size=8, seed=None, **generate_kwargs):
    """Yield one caption per image, in order; with a sampling `seed`, the batch starting at image i
    samples with seed + i (so a caption does not depend on how many batches came before)."""
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        inputs = processor(chunk, [prompt] * len(chunk))
        kwargs = generate_kwargs if seed is None else dict(generate_kwargs, seed=seed + i)
        tokens = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, **kwargs)
        yield from processor.batch_decode(tokens)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="checkpoint folder or hub repo id")
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to apply")
    p.add_argument("--prompt", default="caption en", help="task prefix (default: caption en)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest caption in tokens")
    p.add_argument("--num-beams", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--quantize", choices=["int8", "nf4"], help="int8 or 4-bit NF4 linear weights (quantize.py)")
    args = p.parse_args(argv)
    model, processor = load_for_inference(args.model, args.adapter, args.dtype, args.device, args.quantize)
    captions = caption(model, processor, args.images, args.prompt, args.batch_size,
                       max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    for path, text in zip(args.images, tqdm(captions, total=len(args.images), disable=len(args.images) < 4)):
        print(f"{path}\t{one_line(text)}")


def one_line(text: str) -> str:
    """Keep one caption per output line; a broken model's newlines stay visible as \\n."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


if __name__ == "__main__":
    main()
