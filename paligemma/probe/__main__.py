"""Caption images and write a where-it-looks report per image.

    python -m paligemma.probe --model PATH_OR_ID IMAGE [IMAGE ...] --out DIR [--prompt "caption en"]

DIR/index.html lists the images (thumbnail, caption) and links DIR/<image>/report.html (open it from disk
in a browser) and DIR/<image>/probe.json: `tokens` (generated ids), `text`, `attention_shares` (per
generated token, per decoder layer: the head-averaged attention on image / <bos> / prompt / the caption
so far, `share_groups`; token 0's row is the prefill's last position), `image_attention` (the image's
share alone), `top5`, `logit_lens`, `reliance`, `knockout`; for detect / segment answers `detections` (boxes in pixels of
the image, `width` x `height`) and `loc_tokens` (each <loc> token's coordinate and where the model looked
when it wrote it: probe/locations.py); with --vae a segment answer's masks are drawn too, and `segments`
lists them (`detection`: the box it belongs to, `pixels`: its area in pixels of the image). Greedy
decoding, one image at a time.

An image that cannot be read (missing, truncated, broken chunk, decompression bomb) is named on
stderr and skipped; the others are reported and the exit code is 1. A DIR that already holds an
index.html (an earlier run) is refused unless --overwrite is given.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from PIL import Image

from ..atomic import atomic_file
from ..cli import one_line
from ..cli import POSITIVE, add_debug, add_image_command_args, run
from ..inference import load_for_inference
from ..tasks.vqvae import SOURCE, MaskDecoder
from .locations import locations, segment_masks
from .recording import generate
from .report import index, mask_overlay, render, summarize, thumbnail

RECORD = ["language_model.model.layers.*.self_attn.hook_pattern", "language_model.model.layers.*.hook_resid_post"]
PROG = "paligemma.probe"


def probe_image(model, processor, image, name: str, prompt: str, max_new_tokens: int, folder: Path,
                decoder=None) -> dict:
    """image: an RGB PIL image (as processor.load_image returns it), `name` its file; decoder: the --vae
    MaskDecoder, whose masks a segment answer gets drawn with."""
    inputs = {k: v.to(model.device) for k, v in processor([image], prompt).items()}
    rec = generate(model, **inputs, max_new_tokens=max_new_tokens, names=RECORD)
    summary, heat = summarize(model, processor, rec, inputs)
    boxes = locations(processor.tokenizer, summary["tokens"], heat, image.width, image.height)
    summary, overlay = dict(image=name, prompt=prompt, **summary, **boxes), None
    if decoder is not None:
        masks = segment_masks(summary["text"], image.width, image.height, decoder)
        summary["segments"] = [dict(detection=j, pixels=int(m.sum())) for j, m in enumerate(masks) if m is not None]
        overlay = mask_overlay(masks, [d["colour"] for d in summary["detections"]])
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "probe.json", json.dumps(summary))
    seen = image.resize((processor.image_size,) * 2)
    write(folder / "report.html", render(summary, heat, seen, f"{Path(name).name}: {prompt}", processor.image_size,
                                         overlay))
    return summary


def write(path: Path, text: str):
    with atomic_file(path) as f:
        f.write(text)


def read_image(processor, path: str):
    """-> RGB PIL image; every way a file can fail to decode is a ValueError or OSError naming it."""
    try:
        return processor.load_image(path)
    except Image.DecompressionBombError as e:  # not an OSError: PIL's guard against huge images
        raise ValueError(f"{path}: not read ({e})") from None
    except SyntaxError as e:  # some PIL decoders report a corrupt file this way
        raise ValueError(f"{path}: not a readable image ({e})") from None


def check_out(out: Path, overwrite: bool):
    """Before the model loads: DIR writable, and no earlier run replaced without a word."""
    if (out / "index.html").exists() and not overwrite:
        raise ValueError(f"{out / 'index.html'} exists (an earlier probe run): pass --overwrite to replace its "
                         f"reports, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: output folder is not writable")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_command_args(p)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=20, help="longest caption in tokens")
    p.add_argument("--out", required=True, help="folder for index.html and one report folder per image")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's index.html (and its reports of the same names)")
    p.add_argument("--vae", metavar="NPZ", help=f"segment prompts: the mask VQ-VAE (vae-oid.npz, {SOURCE}) whose "
                                                "masks the report draws")
    add_debug(p)
    args = p.parse_args(argv)
    if args.vae and (args.prompt.split() or [""])[0].lower() != "segment":  # registry.task_of's reading
        p.error(f"--vae decodes the masks of segment answers: the prompt must start with segment, got {args.prompt!r}")
    decoder = MaskDecoder.from_npz(args.vae) if args.vae else None  # a missing or foreign file named before the model
    out = Path(args.out)
    check_out(out, args.overwrite)
    model, processor = load_for_inference(args.model, args.adapter, args.dtype, args.device)
    entries, used, bad = [], set(), []
    for path in args.images:
        try:
            image = read_image(processor, path)
        except (OSError, ValueError) as e:
            bad.append(path)
            print(f"{PROG}: {e}", file=sys.stderr)
            continue
        name = stem = Path(path).stem
        k = 1
        while name in used:  # two images called a.png in different folders
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        summary = probe_image(model, processor, image, str(path), args.prompt, args.max_new_tokens, out / name,
                              decoder)
        entries.append((name, str(path), summary["text"], thumbnail(image)))
        write(out / "index.html", index(entries))  # after every image: what is done stays linked
        print(f"{path}\t{one_line(summary['text'])}\t{out / name / 'report.html'}", flush=True)
    if bad:
        print(f"{PROG}: {len(bad)} of {len(args.images)} images could not be read: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run(main, PROG))
