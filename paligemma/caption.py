"""Caption image files from the command line.

    python -m paligemma.caption --model PATH_OR_ID IMAGE [IMAGE ...] [--prompt "caption en"]
"""
import argparse
import sys

from tqdm import tqdm

from .cli import POSITIVE, add_debug, add_image_command_args, one_line, run
from .inference import caption_files, load_for_inference


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
    for path, text, error in caption_files(model, processor, args.images, args.prompt, args.batch_size,
                                           max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                           compile=args.compile):
        if error is None:
            print(f"{path}\t{one_line(text)}", flush=True)
        else:
            bad.append(path)
            print(f"paligemma.caption: {error}", file=sys.stderr)
        bar.update(1)
    bar.close()
    if bad:
        print(f"paligemma.caption: {len(bad)} of {len(args.images)} images could not be read: {', '.join(bad)}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run(main, "paligemma.caption"))
