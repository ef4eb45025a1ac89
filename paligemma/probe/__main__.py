"""Caption images and write a where-it-looks report per image.

    python -m paligemma.probe --model PATH_OR_ID IMAGE [IMAGE ...] --out DIR [--prompt "caption en"]

DIR/index.html links DIR/<image>/report.html (open it from disk in a browser) and DIR/<image>/probe.json:
`tokens` (generated ids), `text`, `image_attention` (per generated token, per decoder layer: the
head-averaged share of that token's attention on the image tokens; token 0's row is the prefill's last
position), `top5`, `logit_lens`, `reliance`. Greedy decoding, one image at a time.
"""
import argparse
import json
from pathlib import Path

from ..atomic import atomic_file
from ..caption import one_line
from ..cli import add_image_command_args, load_for_inference
from . import generate
from .report import index, render, summarize

RECORD = ["language_model.model.layers.*.self_attn.hook_pattern", "language_model.model.layers.*.hook_resid_post"]


def probe_image(model, processor, image, prompt: str, max_new_tokens: int, folder: Path) -> dict:
    inputs = {k: v.to(model.device) for k, v in processor([image], prompt).items()}
    rec = generate(model, **inputs, max_new_tokens=max_new_tokens, names=RECORD)
    summary, heat = summarize(model, processor, rec, inputs)
    summary = dict(image=str(image), prompt=prompt, **summary)
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "probe.json", json.dumps(summary))
    seen = processor.load_image(image).resize((processor.image_size,) * 2)
    write(folder / "report.html", render(summary, heat, seen, f"{Path(image).name}: {prompt}", processor.image_size))
    return summary


def write(path: Path, text: str):
    with atomic_file(path) as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_command_args(p)
    p.add_argument("--max-new-tokens", type=int, default=20, help="longest caption in tokens")
    p.add_argument("--out", required=True, help="folder for index.html and one report folder per image")
    args = p.parse_args(argv)
    model, processor = load_for_inference(args.model, args.adapter, args.dtype, args.device)
    out, entries, used = Path(args.out), [], set()
    for image in args.images:
        name = stem = Path(image).stem
        k = 1
        while name in used:  # two images called a.png in different folders
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        summary = probe_image(model, processor, image, args.prompt, args.max_new_tokens, out / name)
        entries.append((name, str(image), summary["text"]))
        print(f"{image}\t{one_line(summary['text'])}\t{out / name / 'report.html'}")
    write(out / "index.html", index(entries))


if __name__ == "__main__":
    main()
