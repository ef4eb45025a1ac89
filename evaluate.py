"""Caption a split and score it with the metrics remote-sensing papers report.

    python evaluate.py --model PATH_OR_ID [--adapter DIR] --data CSV_OR_DIR --split test --out DIR
    python evaluate.py --model M --compare ADAPTER_DIR ...   # base and adapter side by side

Writes OUT/predictions.jsonl and OUT/metrics.json (atomically; an existing OUT needs --overwrite).
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from paligemma import PaliGemma
from paligemma.atomic import atomic_file
from paligemma.data import load_examples
from paligemma.metrics import health, score_all
from paligemma.processor import Processor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder or hub repo id")
    p.add_argument("--adapter", help="LoRA adapter folder to apply")
    p.add_argument("--compare", help="a second adapter folder (or 'base') evaluated in the same run")
    p.add_argument("--data", required=True, help="captions CSV/JSONL or folder")
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder's files")
    p.add_argument("--prompt", default="caption en", help="task prefix")
    p.add_argument("--references", choices=["all", "first"], default="all",
                   help="score against all references, or only caption_1 (the study's protocol)")
    p.add_argument("--max-samples", type=int, help="evaluate the first N images (deterministic)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest caption")
    p.add_argument("--num-beams", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    return p.parse_args(argv)


def predict(model, processor, examples, args) -> list[str]:
    out = []
    for i in tqdm(range(0, len(examples), args.batch_size), desc="captioning", mininterval=5):
        chunk = examples[i:i + args.batch_size]
        inputs = {k: v.to(args.device) for k, v in processor([e.image for e in chunk], args.prompt).items()}
        tokens = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                do_sample=args.do_sample, temperature=args.temperature, seed=args.seed + i)
        out.extend(processor.batch_decode(tokens))
    return out


def evaluate(model, processor, examples, args) -> tuple[dict, list[dict]]:
    preds = predict(model, processor, examples, args)
    refs = {str(e.image): (e.captions[:1] if args.references == "first" else e.captions) for e in examples}
    by_image = {str(e.image): p for e, p in zip(examples, preds)}
    result = score_all(by_image, refs)
    result["health"] = health(by_image, refs)
    rows = [dict(image=str(e.image), prompt=args.prompt, prediction=p, references=e.captions)
            for e, p in zip(examples, preds)]
    return result, rows


def table(results: dict) -> str:
    names = [k for k in next(iter(results.values())) if k != "health"]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    import lora
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        sys.exit(f"{out} exists and is not empty: pass --overwrite to replace its files")
    examples, _ = load_examples(args.data, args.split)
    if args.max_samples:
        examples = examples[:args.max_samples]
    processor = Processor.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    runs = {"model": args.adapter}
    if args.compare:
        runs = {"A": args.adapter, "B": None if args.compare == "base" else args.compare}
    results, rows = {}, {}
    for label, adapter in runs.items():
        model = PaliGemma.from_pretrained(args.model, dtype=dtype, device=args.device)
        if adapter:
            lora.load(model, adapter)
        name = f"{label}: {adapter or 'base'}"
        results[name], rows[name] = evaluate(model, processor, examples, args)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "metrics.json") as f:
        json.dump(results, f, indent=2)
    with atomic_file(out / "predictions.jsonl") as f:
        for name, rs in rows.items():
            for r in rs:
                f.write(json.dumps(dict(r, model=name)) + "\n")
    print(table(results))
    first = next(iter(rows.values()))
    print("\n| image | reference | prediction |\n|---|---|---|")
    for r in first[:5]:
        print(f"| {Path(r['image']).name} | {r['references'][0]} | {r['prediction']} |")
    return results


if __name__ == "__main__":
    main()
