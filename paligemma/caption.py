"""Caption image files from the command line.

    python -m paligemma.caption --model PATH_OR_ID IMAGE [IMAGE ...] [--prompt "caption en"]
"""
import argparse
import sys

from tqdm import tqdm

from .cli import POSITIVE, add_debug, add_image_command_args, load_for_inference, run


def caption(model, processor, images, prompt="caption en", batch_size=8, seed=None, **generate_kwargs):
    """Yield one caption per image, in order; with a sampling `seed`, the batch starting at image i
    samples with seed + i (so a caption does not depend on how many batches came before)."""
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        inputs = processor(chunk, [prompt] * len(chunk))
        kwargs = generate_kwargs if seed is None else dict(generate_kwargs, seed=seed + i)
        tokens = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, **kwargs)
        yield from processor.batch_decode(tokens)


def main(argv=None) -> int:
    """Prints `image<TAB>caption` per readable image; unreadable ones are named on stderr and make the
    exit code 1, without stopping the others."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_command_args(p)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32, help="longest caption in tokens")
    p.add_argument("--num-beams", type=POSITIVE, default=1, help="beam width (1 = greedy)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="images per forward pass")
    p.add_argument("--quantize", choices=["int8", "int4", "nf4"], help="int8, int4 or NF4 linear weights (quantize.py)")
    p.add_argument("--compile", action="store_true", help="decode steps under torch.compile (CUDA graphs on CUDA)")
    add_debug(p)
    args = p.parse_args(argv)
    model, processor = load_for_inference(args.model, args.adapter, args.dtype, args.device, args.quantize)
    bad = []
    bar = tqdm(total=len(args.images), disable=len(args.images) < 4)
    for i in range(0, len(args.images), args.batch_size):
        paths, images = [], []
        for path in args.images[i:i + args.batch_size]:  # read one batch at a time: a long list stays small
            try:
                images.append(processor.load_image(path))
                paths.append(path)
            except (OSError, ValueError) as e:
                bad.append(path)
                print(f"paligemma.caption: {e}", file=sys.stderr)
        texts = caption(model, processor, images, args.prompt, args.batch_size,
                        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, compile=args.compile)
        for path, text in zip(paths, texts):
            print(f"{path}\t{one_line(text)}", flush=True)
        bar.update(len(args.images[i:i + args.batch_size]))
    bar.close()
    if bad:
        print(f"paligemma.caption: {len(bad)} of {len(args.images)} images could not be read: {', '.join(bad)}",
              file=sys.stderr)
    return 1 if bad else 0


def one_line(text: str) -> str:
    """Keep one caption per output line; a broken model's newlines stay visible as \\n."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


if __name__ == "__main__":
    sys.exit(run(main, "paligemma.caption"))
