"""Caption a split and score it with the metrics remote-sensing papers report.

    python evaluate.py --model PATH_OR_ID [--adapter DIR] --data CSV_OR_DIR --split test --out DIR
    python evaluate.py --model M --compare ADAPTER_OR_MODEL ...   # two rows side by side: --adapter (or base) vs this
    python evaluate.py --predictions preds.jsonl --data ... --out DIR   # score captions made elsewhere

Writes OUT/predictions.jsonl, OUT/predictions.csv and OUT/metrics.json, each atomically; an existing
non-empty OUT needs --overwrite. Metrics follow the COCO caption toolkit's conventions (see README).
"""
import argparse
import csv
import io
import json
import sys
from pathlib import Path

from tqdm import tqdm

from paligemma.atomic import atomic_file
from paligemma.caption import caption, one_line
from paligemma.cli import DTYPES, NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, add_debug, load_for_inference, number, run
from paligemma.captioning.data import DataError, csv_rows, load_examples, read_jsonl, read_text
from paligemma.captioning.metrics import health, score_all


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or hub repo id")
    p.add_argument("--adapter", help="LoRA adapter folder to apply")
    p.add_argument("--compare", help="second row: an adapter folder, another model, 'base', or 'int8' / 'nf4' "
                   "(the first row's model quantized)")
    p.add_argument("--predictions", help="score this JSONL/CSV of image + prediction instead of running a model")
    p.add_argument("--data", required=True, help="captions CSV/JSONL or folder")
    p.add_argument("--split", default="test", help="split to evaluate ('all': every row, for a file without splits)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count, in metrics.json) rows whose image "
                   "is missing or unreadable instead of stopping")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder's files")
    p.add_argument("--prompt", default="caption en", help="task prefix")
    p.add_argument("--references", choices=["all", "first"], default="all",
                   help="score against all references, or only caption_1 (the study's protocol)")
    p.add_argument("--max-samples", type=POSITIVE, help="evaluate the first N images of the split (deterministic)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="images per batch")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32, help="longest caption")
    p.add_argument("--num-beams", type=POSITIVE, default=1, help="beam width (1 = greedy)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="sampling: keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="sampling: nucleus mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--quantize", choices=["int8", "nf4"], help="quantize --model's linear weights (quantize.py)")
    add_debug(p)
    args = p.parse_args(argv)
    if not (args.model or args.predictions):
        p.error("give --model (to caption the split) or --predictions (to score existing captions)")
    if args.predictions and (args.model or args.adapter or args.compare):
        p.error("--predictions scores a file: it does not take --model, --adapter or --compare")
    return args


def predict(model, processor, examples, args) -> list[str]:
    captions = caption(model, processor, [e.image for e in examples], args.prompt, args.batch_size, seed=args.seed,
                       max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                       temperature=args.temperature, top_k=args.top_k or None,
                       top_p=args.top_p if args.top_p < 1 else None)
    return list(tqdm(captions, total=len(examples), desc="captioning", mininterval=5))


def read_predictions(path, examples) -> list[str]:
    """Predictions made elsewhere, in the split's order; the images must be exactly the split's."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: predictions file not found")
    text = read_text(path)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path, text)
    else:
        rows = csv_rows(csv.DictReader(io.StringIO(text, newline="")))
    preds, lines = {}, {}
    for i, r in rows:
        if not isinstance(r, dict) or "image" not in r or "prediction" not in r:
            raise DataError(f"{path}:{i}: expected an 'image' and a 'prediction' field, got "
                            f"{sorted(r) if isinstance(r, dict) else type(r).__name__}")
        if not isinstance(r["prediction"], (str, type(None))):
            raise DataError(f"{path}:{i}: 'prediction' is {type(r['prediction']).__name__}, expected a string")
        name = Path(str(r["image"])).name  # match on the file name: predictions made elsewhere carry other folders
        if name in preds:
            raise DataError(f"{path}:{i}: a second prediction for {name} (the first is on line {lines[name]})")
        preds[name], lines[name] = r["prediction"] or "", i
    want = {e.image.name for e in examples}
    extra, missing = sorted(set(preds) - want), sorted(want - set(preds))
    if extra or missing:
        raise DataError(f"{path}: its images do not match the references' split: "
                        f"{len(missing)} without a prediction (e.g. {missing[:3]}), "
                        f"{len(extra)} not in the split (e.g. {extra[:3]})")
    return [preds[e.image.name] for e in examples]


def score(examples, preds, args) -> tuple[dict, list[dict]]:
    refs = {str(e.image): (e.captions[:1] if args.references == "first" else e.captions) for e in examples}
    by_image = {str(e.image): p for e, p in zip(examples, preds)}
    result = score_all(by_image, refs)
    result["health"] = health(by_image, refs)
    rows = [dict(image=str(e.image), prompt=args.prompt, prediction=p, references=e.captions)
            for e, p in zip(examples, preds)]
    return result, rows


def rows_to_run(args) -> dict:
    """label -> (model, adapter, quantize). --compare: adapter folders apply to --model; int8 / nf4
    quantize it; anything else is a model."""
    first = (args.model, args.adapter, args.quantize)
    if not args.compare:
        return {"model": first}
    if args.compare == "base":
        second = (args.model, None, args.quantize)
    elif args.compare in ("int8", "nf4"):
        second = (args.model, args.adapter, args.compare)
    elif (Path(args.compare) / "adapter_config.json").exists():
        second = (args.model, args.compare, args.quantize)
    else:
        second = (args.compare, None, args.quantize)
    return {"A": first, "B": second}


def table(results: dict) -> str:
    names = [k for k in next(iter(results.values())) if k != "health"]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, results: dict, rows: dict, protocol: dict):
    with atomic_file(out / "metrics.json") as f:
        json.dump({"protocol": protocol, **results}, f, indent=2)
    with atomic_file(out / "predictions.jsonl") as f:
        for name, rs in rows.items():
            for r in rs:
                f.write(json.dumps(dict(r, model=name)) + "\n")
    n_refs = max(len(r["references"]) for rs in rows.values() for r in rs)
    with atomic_file(out / "predictions.csv") as f:
        w = csv.writer(f)
        w.writerow(["model", "image", "prompt", "prediction"] + [f"caption_{i + 1}" for i in range(n_refs)])
        for name, rs in rows.items():
            for r in rs:
                w.writerow([name, r["image"], r["prompt"], r["prediction"]] + r["references"])


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to replace its files")
    split = None if args.split == "all" else args.split
    examples, skipped = load_examples(args.data, split, skip_bad=args.skip_bad)
    if skipped:
        print(skipped.report(), file=sys.stderr)
    if args.max_samples:
        examples = examples[:args.max_samples]
    results, rows = {}, {}
    if args.predictions:
        name = f"predictions: {args.predictions}"
        results[name], rows[name] = score(examples, read_predictions(args.predictions, examples), args)
    else:
        for label, (model_name, adapter, quantize) in rows_to_run(args).items():
            model, processor = load_for_inference(model_name, adapter, args.dtype, args.device, quantize)
            name = f"{label}: {model_name}" + (f" + {adapter}" if adapter else "") + (f" ({quantize})" if quantize else "")
            results[name], rows[name] = score(examples, predict(model, processor, examples, args), args)
            del model
    protocol = dict(data=str(args.data), split=args.split, images=len(examples), references=args.references,
                    prompt=args.prompt, num_beams=args.num_beams, do_sample=args.do_sample,
                    max_new_tokens=args.max_new_tokens, skipped=skipped.reasons,
                    tokenisation="lower-case, punctuation dropped (approximates pycocoevalcap's PTB tokenizer)",
                    meteor="nltk meteor_score (WordNet 3.0), not the Java Meteor 1.5")
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, results, rows, protocol)
    print(table(results))
    for name, r in results.items():
        print(f"output health ({name}): " + ", ".join(f"{k} {v:.3f}" for k, v in r["health"].items()))
    names = list(rows)
    print("\n| image | reference | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for i, r in enumerate(rows[names[0]][:5]):
        print(f"| {Path(r['image']).name} | {r['references'][0]} | "
              + " | ".join(one_line(rows[n][i]["prediction"]) for n in names) + " |")
    return results


if __name__ == "__main__":
    run(main, "evaluate.py")
