"""Greedy captions of a split, unquantized vs int8 vs int4 vs NF4: how much does quantization change them?

    python benchmarks/quant_quality.py --model RUN/final --data RUN/data [--modes int8 int4 nf4] [--out FILE.md]

Per format, against the unquantized model's own captions: the share of identical captions, the share
of equal tokens (position by position over the longer of the two token sequences), and each
format's CIDEr-D against the references (its difference to the unquantized CIDEr-D, relative).
A last row loads the unquantized model in float32: how much a change of dtype alone moves the
captions (the noise floor the quantized rows are to be read against).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paligemma.captioning.data import load_examples  # noqa: E402
from paligemma.captioning.metrics import cider_d, tokenize  # noqa: E402
from paligemma.inference import load_for_inference  # noqa: E402


def greedy_tokens(model, processor, images, prompt, batch_size, max_new_tokens) -> list[list[int]]:
    """Token ids per image, up to and without <eos> / padding."""
    stop = {model.config.eos_token_id, model.config.pad_token_id}
    out = []
    for i in range(0, len(images), batch_size):
        inputs = processor(images[i:i + batch_size], prompt)
        with torch.no_grad():
            tokens = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens)
        for row in tokens.tolist():
            out.append([t for t in row[:next((j for j, t in enumerate(row) if t in stop), len(row))]])
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same_tokens = sum(sum(x == y for x, y in zip(p, q)) for p, q in zip(a, b))
    positions = sum(max(len(p), len(q), 1) for p, q in zip(a, b))
    return dict(identical=sum(p == q for p, q in zip(a, b)) / len(a), tokens_equal=same_tokens / positions)


def cider(processor, tokens, examples) -> float:
    hyps = {str(e.image): [" ".join(tokenize(processor.decode(t)))] for e, t in zip(examples, tokens)}
    refs = {str(e.image): [" ".join(tokenize(r)) for r in e.captions] for e in examples}
    return cider_d(hyps, refs)


def compare(model_dir, data, modes=("int8", "int4", "nf4"), split="test", dtype="bfloat16", prompt="caption en",
            batch_size=16, max_new_tokens=24, max_samples=None) -> dict:
    """{dtype: {...}, "int8": {...}, ..., "float32": {...}}: CIDEr-D of each, agreement of each with the
    unquantized `dtype` model's captions."""
    examples, _ = load_examples(data, split)
    examples = examples[:max_samples] if max_samples else examples
    images = [e.image for e in examples]
    results, reference = {}, None
    rows = [(dtype, None)] + [(dtype, m) for m in modes] + [("float32", None)] * (dtype != "float32")
    for row_dtype, mode in rows:
        model, processor = load_for_inference(model_dir, None, row_dtype, "cpu", quantize=mode)
        tokens = greedy_tokens(model, processor, images, prompt, batch_size, max_new_tokens)
        reference = reference or tokens
        results[mode or row_dtype] = dict(agreement(tokens, reference), cider_d=cider(processor, tokens, examples))
        del model
    base = results[dtype]["cider_d"]
    for r in results.values():
        r["cider_d_change"] = (r["cider_d"] - base) / base if base else float("nan")
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (e.g. a train.py run's OUT/final)")
    p.add_argument("--data", required=True, help="captions CSV/JSONL or folder")
    p.add_argument("--split", default="test", help="split to caption")
    p.add_argument("--modes", nargs="+", default=["int8", "int4", "nf4"], choices=["int8", "int4", "nf4"],
                   help="formats to compare")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="unquantized weights dtype")
    p.add_argument("--max-samples", type=int, help="first N images of the split")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    r = compare(args.model, args.data, args.modes, args.split, args.dtype, max_samples=args.max_samples)
    lines = [f"`python benchmarks/quant_quality.py --model {args.model} --data {args.data}`: {args.split} split, "
             f"greedy, {args.dtype}\n", "| weights | identical captions | equal tokens | CIDEr-D | CIDEr-D change |",
             "|---|---:|---:|---:|---:|"]
    for mode, x in r.items():
        lines.append(f"| {mode} | {x['identical']:.1%} | {x['tokens_equal']:.1%} | "
                     f"{x['cider_d']:.4f} | {x['cider_d_change']:+.1%} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
