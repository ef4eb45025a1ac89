"""Caption image files from the command line; detect and segment prompts also print (and draw) the boxes.

    python -m paligemma.caption --model PATH_OR_ID IMAGE [IMAGE ...] [--prompt "caption en"]
    python -m paligemma.caption --model M --prompt "detect plane ; ship" IMAGE ... [--draw DIR]
    python -m paligemma.caption --model M --prompt "segment roof" --vae vae-oid.npz IMAGE ... [--draw DIR]

Each image gives one line `image<TAB>generated text`. For detect and segment prompts the lines after it,
each starting with a tab, are the parsed objects (label, then x0 y0 x1 y1 in pixels of the image; with
--vae the mask's area) and a count of the objects and of the malformed pieces dropped. --draw DIR writes
DIR/<image name>.png with the boxes (and masks) drawn.
"""
import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from .atomic import atomic_file
from .cli import POSITIVE, add_debug, add_image_command_args, one_line, run
from .inference import caption_files, load_for_inference
from .tasks.readout import answer_lines, draw_answer, drawing_paths, drawn_task, read_answer
from .tasks.vqvae import SOURCE, MaskDecoder

PROG = "paligemma.caption"


def main(argv=None) -> int:
    """Prints `image<TAB>caption` per readable image; unreadable ones are named on stderr and make the
    exit code 1, without stopping the others."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_command_args(p)
    p.add_argument("--max-new-tokens", type=POSITIVE, help="longest answer in tokens (default 32; for detect and segment "
                                                             "prompts 128: a box is about 6 tokens, a mask 22)")
    p.add_argument("--num-beams", type=POSITIVE, default=1, help="beam width (1 = greedy)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="images per forward pass")
    p.add_argument("--quantize", choices=["int8", "int4", "nf4"], help="int8, int4 or NF4 linear weights (quantize.py)")
    p.add_argument("--compile", action="store_true", help="decode steps under torch.compile (CUDA graphs on CUDA)")
    p.add_argument("--draw", metavar="DIR", help="detect / segment prompts: write each image with its boxes (and "
                                                 "masks) to DIR/<image name>.png")
    p.add_argument("--vae", metavar="NPZ", help=f"segment prompts: the mask VQ-VAE (vae-oid.npz, {SOURCE}) that "
                                                "turns <seg> tokens into masks")
    add_debug(p)
    args = p.parse_args(argv)
    task = drawn_task(args.prompt)
    max_new_tokens = args.max_new_tokens or (128 if task else 32)
    if args.draw and task is None:
        p.error(f"--draw draws boxes and masks: the prompt must start with detect or segment, got {args.prompt!r}")
    if args.vae and task != "segment":
        p.error(f"--vae decodes the masks of segment answers: the prompt must start with segment, got {args.prompt!r}")
    # what can fail is checked before the model loads: the VQ-VAE file, the drawing folder
    decoder = MaskDecoder.from_npz(args.vae) if args.vae else None
    if task == "segment" and decoder is None:
        print(f"{PROG}: printing boxes only: masks need --vae PATH/vae-oid.npz (big_vision publishes it at {SOURCE})",
              file=sys.stderr)
    drawings = drawing_paths(args.images, args.draw) if args.draw else [None] * len(args.images)
    if args.draw:
        Path(args.draw).mkdir(parents=True, exist_ok=True)
        if not os.access(args.draw, os.W_OK | os.X_OK):
            raise PermissionError(f"--draw {args.draw}: folder is not writable")
    model, processor = load_for_inference(args.model, args.adapter, args.dtype, args.device, args.quantize)
    bad = []
    bar = tqdm(total=len(args.images), disable=len(args.images) < 4)
    answers = caption_files(model, processor, args.images, args.prompt, args.batch_size,
                            max_new_tokens=max_new_tokens, num_beams=args.num_beams, compile=args.compile)
    for (path, text, error, image), drawing in zip(answers, drawings):
        if error is None:
            print(f"{path}\t{one_line(text)}", flush=not task)
            if task:
                parsed = read_answer(task, text, image.width, image.height, decoder)
                print("\n".join(answer_lines(parsed)), flush=True)
            if drawing:
                with atomic_file(drawing, "wb") as f:
                    draw_answer(image, parsed).save(f, format="PNG")
        else:
            bad.append(path)
            print(f"{PROG}: {error}", file=sys.stderr)
        bar.update(1)
    bar.close()
    if bad:
        print(f"{PROG}: {len(bad)} of {len(args.images)} images could not be read: {', '.join(bad)}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run(main, PROG))
