"""Caption a split and score it with the metrics remote-sensing papers report.

    python evaluate.py --model PATH_OR_ID [--adapter DIR] --data CSV_OR_DIR --split test --out DIR
    python evaluate.py --model M --compare ADAPTER_OR_MODEL ...   # two rows side by side: --adapter (or base) vs this
    python evaluate.py --predictions preds.jsonl --data ... --out DIR   # score captions made elsewhere

    python evaluate.py ... --resume                    # continue an evaluation that stopped (same arguments)
    python evaluate.py ... --meteor java --bootstrap 1000   # the defaults where Java is here: METEOR 1.5, 95 % intervals

Writes OUT/predictions.jsonl, OUT/predictions.csv and OUT/metrics.json. Before the first caption it
checks what can fail later: the data, every model and adapter (without loading two models), the
metrics' requirements (METEOR without WordNet is left out, and says so), that OUT is writable and
has room. Captions are appended to OUT/.partial as each batch is made, so a failure loses nothing
and --resume continues; the finished set replaces an old one (--overwrite) only once it is whole
(paligemma/captioning/results.py). Metrics follow the COCO caption toolkit's conventions (see README).

Any PaliGemma task: each row's own prefix (or --prompt) says which (`detect ...`: mAP@0.5 and COCO
mAP, boxes scored by the model's confidence in their <loc> tokens; `answer ...`: VQA accuracy and
exact match; `ocr`: ANLS and CER; `segment ...`: mean mask IoU and box accuracy; captions: BLEU,
METEOR, ROUGE-L, CIDEr-D), or --metric chooses (paligemma/tasks/evaluation.py); every metric with its
95 % interval over images and, under --compare, B - A's paired one (paligemma/tasks/resampling.py):

    python evaluate.py --model M --data boxes.jsonl --draw pics/   # a detection set: mAP, boxes drawn
    python evaluate.py --model M --data masks.jsonl --vae vae-oid.npz   # a segmentation set: mIoU, box accuracy

A segmentation set's references are its rows' mask files where it has them (at the image's size), else
the rows' own <seg> answers decoded by the --vae decoder.
"""
import argparse
import csv
import functools
import gc
import io
import json
import sys
from pathlib import Path

from tqdm import tqdm

from paligemma.atomic import atomic_file, lock_folder, unlock_folder
from paligemma.inference import caption, load_for_inference
from paligemma.tasks.evaluation import (METRIC_FLAG, VAE_HELP, draw_split, image_sizes, measure_split, parse_references,
                                        row_fields, task_of_split)
from paligemma.cli import DTYPES, NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, add_debug, number, one_line, run
from paligemma.captioning import results as store
from paligemma.captioning import wordnet
from paligemma.captioning.scorer import Scorer, choose_meteor, table
from paligemma.captioning.data import DataError, csv_rows, fingerprint, load_examples, read_jsonl, read_text
from paligemma.captioning.metrics import health
from paligemma.captioning.validation import row_keys
from paligemma.tasks.boxes import loc_probs_of
from paligemma.tasks.mask_files import describe
from paligemma.tasks.registry import names_task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or hub repo id")
    p.add_argument("--adapter", help="LoRA adapter folder to apply")
    p.add_argument("--compare", help="second row: an adapter folder, another model, 'base', or 'int8' / 'int4' / 'nf4' "
                   "(the first row's model quantized)")
    p.add_argument("--predictions", help="score this JSONL/CSV of image + prediction (+ prompt, where an image has "
                   "several rows; + boxes with their scores, as predictions.jsonl saves them; + model, a --compare run's: a row "
                   "per model) instead of running a model")
    p.add_argument("--data", required=True, help="captions CSV/JSONL or folder")
    p.add_argument("--split", default="test", help="split to evaluate ('all': every row, for a file without splits)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count, in metrics.json) rows whose image "
                   "is missing or unreadable instead of stopping")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder's results (the old "
                   "ones stay until the new set is complete)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished evaluation in --out (same "
                   "arguments): only the missing captions are made")
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
    p.add_argument("--meteor", choices=["java", "nltk", "auto"], default="auto", help="METEOR 1.5 by "
                   "pycocoevalcap's jar (as papers report it; needs Java and `pip install .[coco]`), nltk's, or "
                   "auto: the jar where it can run, else nltk (metrics.json's protocol names the one used)")
    p.add_argument("--bootstrap", type=NON_NEGATIVE, default=1000, metavar="N", help="95 %% intervals over images "
                   "from N resamples, for every metric of every task (0: none); --compare adds B - A's paired interval")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--quantize", choices=["int8", "int4", "nf4"], help="quantize --model's linear weights (quantize.py)")
    p.add_argument("--compile", action="store_true", help="decode steps under torch.compile (CUDA graphs on CUDA)")
    p.add_argument("--metric", choices=sorted(METRIC_FLAG), help="score as this task (default: the task each row's "
                   "prefix, or --prompt, asks for)")
    p.add_argument("--vae", help=f"segmentation sets: path to vae-oid.npz ({VAE_HELP})")
    p.add_argument("--draw", help="detection / segmentation sets: write each image with its predicted (and "
                   "reference) boxes or masks into this folder")
    add_debug(p)
    args = p.parse_args(argv)
    if not (args.model or args.predictions):
        p.error("give --model (to caption the split) or --predictions (to score existing captions)")
    if args.predictions and (args.model or args.adapter or args.compare):
        p.error("--predictions scores a file: it does not take --model, --adapter or --compare")
    if args.resume and (args.overwrite or args.predictions):
        p.error("--resume continues captioning into --out: it does not take --overwrite or --predictions")
    return args


def predict(model, processor, examples, args, name: str, done: int, out: Path) -> list[dict]:
    """Rows of `examples[done:]`, each batch appended to OUT/.partial as soon as it is captioned. A batch
    starting at image i samples with seed + i wherever the run (re)started (`done` is a whole number of
    batches), so a resumed run makes the captions an uninterrupted one would."""
    rest = examples[done:]
    prompts = [prompt_of(e, args) for e in rest] if any(e.prefix for e in rest) else args.prompt
    scored = args.task == "detect"  # each <loc>'s probability: the boxes' scores
    captions = caption(model, processor, [e.image for e in rest], prompts, args.batch_size,
                       seed=args.seed + done, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                       do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k or None,
                       top_p=args.top_p if args.top_p < 1 else None, compile=args.compile, loc_scores=scored)
    rows, batch = [], []
    for e, text in zip(rest, tqdm(captions, total=len(rest), desc=f"captioning ({name})", mininterval=5)):
        text, probs = text if scored else (text, None)
        batch.append(dict(model=name, image=str(e.image), prompt=prompt_of(e, args), prediction=text,
                          references=references_of(e), **({"loc_probs": probs} if scored else {})))
        if len(batch) == args.batch_size or len(rows) + len(batch) == len(rest):
            store.append(out, batch)
            rows, batch = rows + batch, []
    return rows


def predictions_by_model(path, examples, prompts: list[str]) -> dict[str, list[tuple[int, dict]]]:
    """A --predictions file's rows per model: {"": rows} for one model's file; for a file that names several
    in its `model` field (predictions.jsonl of a --compare run), {model: rows} for each, so each is scored
    as its own row and the two compared as that run compared them. Each as read_predictions returns it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: predictions file not found")
    text = read_text(path)
    rows = read_jsonl(path, text) if path.suffix == ".jsonl" else csv_rows(csv.DictReader(io.StringIO(text, newline="")))
    models = list(dict.fromkeys(r.get("model") for _, r in rows if isinstance(r, dict)))
    if len(models) < 2:
        return {"": read_predictions(path, rows, examples, prompts)}
    if None in models:
        i = next(i for i, r in rows if isinstance(r, dict) and "model" not in r)
        raise DataError(f"{path}:{i}: no 'model' field, which other rows have ({models[0]!r}, ...): each row "
                        "says which model made it")
    return {m: read_predictions(path, [(i, r) for i, r in rows if r.get("model") == m], examples, prompts)
            for m in models}


def read_predictions(path, rows, examples, prompts: list[str]) -> list[tuple[int, dict]]:
    """Predictions made elsewhere (`rows`: (line, row) of file `path`), as (line, row) in the split's order;
    the rows must be exactly the split's. A row is matched by its image's file name (predictions made
    elsewhere carry other folders), and also by its `prompt` where the split has an image under several
    prompts (questions, question generation): the field is then required. prompts: each example's prompt
    (prompt_of)."""
    names = [e.image.name for e in examples]
    repeated = sorted({n for n in names if names.count(n) > 1})
    key_of = (lambda name, p: (name, p)) if repeated else (lambda name, p: name)
    want = [key_of(n, p) for n, p in zip(names, prompts)]
    if len(set(want)) < len(want):  # one file name twice under one prompt: two folders, or two rows alike
        twice = next(k for k in want if want.count(k) > 1)
        raise DataError(f"{path}: the split has two rows of {twice}: predictions matched by file name cannot tell "
                        "them apart")
    found, lines = {}, {}
    for i, r in rows:
        if not isinstance(r, dict) or "image" not in r or "prediction" not in r:
            raise DataError(f"{path}:{i}: expected an 'image' and a 'prediction' field, got "
                            f"{sorted(r) if isinstance(r, dict) else type(r).__name__}")
        for field in ("prediction", "prompt") if repeated else ("prediction",):
            if field not in r:
                raise DataError(f"{path}:{i}: no '{field}' field: the split has images under several prompts "
                                f"({', '.join(repeated[:3])}), so each prediction says which it answers")
            if r[field] is None:  # a JSON null, or a CSV row cut short: never an empty answer
                raise DataError(f"{path}:{i}: '{field}' is empty (null, or a CSV row cut short)")
            if not isinstance(r[field], str):
                raise DataError(f"{path}:{i}: '{field}' is {type(r[field]).__name__}, expected a string")
        name = Path(str(r["image"])).name
        key = key_of(name, r.get("prompt"))
        said = f"{name}, prompt {key[1]!r}" if repeated else name
        if key in found:
            raise DataError(f"{path}:{i}: a second prediction for {said} (the first is on line {lines[key]})")
        found[key], lines[key] = r, i
    extra, missing = sorted(set(found) - set(want), key=str), sorted(set(want) - set(found), key=str)
    if extra or missing:
        raise DataError(f"{path}: its images do not match the references' split: "
                        f"{len(missing)} without a prediction (e.g. {missing[:3]}), "
                        f"{len(extra)} not in the split (e.g. {extra[:3]})")
    return [(lines[k], found[k]) for k in want]


def saved_loc_probs(path, rows: list[tuple[int, dict]]) -> list | None:
    """Per row of a --predictions file, <loc> probabilities that give its boxes the scores saved with them
    (evaluate.py's own predictions.jsonl carries each box's `score`), or None where the file saves none
    (each box then scores 1.0). A file that saves them for some rows only, or boxes its prediction does
    not parse to, is named by file:line."""
    saved = [(i, r["boxes"]) for i, r in rows if "boxes" in r]
    if not saved:
        return None
    if len(saved) < len(rows):
        i = next(i for i, r in rows if "boxes" not in r)
        raise DataError(f"{path}:{i}: no 'boxes' field, which other rows have (their scores rank the boxes)")
    out = []
    for i, r in rows:
        try:
            scores = [float(b["score"]) for b in r["boxes"]]
            out.append(loc_probs_of(r["prediction"], scores))
        except (TypeError, KeyError, ValueError) as e:
            raise DataError(f"{path}:{i}: 'boxes' does not give the score of each box of its prediction: {e}") from None
    return out


def references_of(example) -> list[str]:
    """An example's references as text: its captions or answers, or its mask files and labels."""
    return [describe(example.masks)] if example.masks else example.captions


def prompt_of(example, args) -> str:
    """The prompt the model is given for an example: the row's own prefix, or the run's --prompt."""
    return example.prefix if example.prefix is not None else args.prompt


def check_task(args, examples):
    """Before the first answer: the task of the split (args.task), what it needs (--vae for masks), and
    its references readable as boxes or masks."""
    args.task = task_of_split([e.prefix for e in examples], args.prompt, [str(e.image) for e in examples], args.metric)
    if args.task == "caption" and not args.metric and not names_task(args.prompt) and \
            any(e.prefix is None for e in examples):
        print(f"--prompt {args.prompt!r} names no PaliGemma task: scored as captions (--metric chooses another)",
              file=sys.stderr)
    if args.task != "segment" and any(e.masks for e in examples):
        raise ValueError(f"{args.data}: rows with mask files are segmentation references: score them with --metric "
                         f"segmentation, not {args.metric}")
    if args.task == "segment" and not args.vae:
        raise ValueError(f"{args.data}: a segmentation set (prompt {prompt_of(examples[0], args)!r}) needs --vae PATH: "
                         f"{VAE_HELP}")
    if args.draw and args.task not in ("detect", "segment"):
        raise ValueError(f"--draw draws boxes and masks: {args.data} is a {args.task} set")
    if args.draw:  # drawings are named after their images: never among the images themselves
        folders = {e.image.resolve().parent for e in examples}
        if Path(args.draw).resolve() in folders:
            raise ValueError(f"--draw {args.draw}: the split's images are in this folder; choose another one for "
                             "the drawings")
        Path(args.draw).mkdir(parents=True, exist_ok=True)
    if args.task in ("detect", "segment"):
        names = [str(e.image) for e in examples]
        parse_references(args.task, [e.captions for e in examples], names, image_sizes(names), mask_decoder(args.vae),
                         [e.masks for e in examples])


@functools.cache
def mask_decoder(path):
    """The VQ-VAE decoder of --vae, loaded once (None without --vae)."""
    from paligemma.tasks import MaskDecoder
    return MaskDecoder.from_npz(path) if path else None


def score_task(examples, preds, args, scorer: Scorer, name: str, loc_probs=None,
               draw_to=None) -> tuple[dict, list[dict]]:
    """A detection / question / OCR / segmentation split scored by its task, with 95 % intervals when
    resampling (tasks/resampling.py); rows carry the parsed answers."""
    names = [str(e.image) for e in examples]
    sizes = image_sizes(names) if args.task in ("detect", "segment") else None
    stats, parsed, refs = measure_split(args.task, preds, [e.captions for e in examples], names, sizes, loc_probs,
                                        mask_decoder(args.vae) if args.task == "segment" else None,
                                        [e.masks for e in examples])
    result = scorer.score_task(name, stats)
    rows = [dict(image=n, prompt=prompt_of(e, args), prediction=p, references=references_of(e),
                 **row_fields(args.task, q))
            for n, e, p, q in zip(names, examples, preds, parsed)]
    if draw_to:
        draw_split(draw_to, args.task, names, parsed, refs)
    return result, rows


def score(examples, preds, args, scorer: Scorer, name: str, loc_probs=None, draw_to=None) -> tuple[dict, list[dict]]:
    if args.task != "caption":
        return score_task(examples, preds, args, scorer, name, loc_probs, draw_to)
    keys = row_keys(examples)  # an image under several prompts is several rows, each scored
    refs = {k: (e.captions[:1] if args.references == "first" else e.captions) for k, e in zip(keys, examples)}
    by_row = dict(zip(keys, preds))
    result = scorer.score(name, by_row, refs)
    result["health"] = health(by_row, refs)
    rows = [dict(image=str(e.image), prompt=prompt_of(e, args), prediction=p, references=e.captions)
            for e, p in zip(examples, preds)]
    return result, rows


def rows_to_run(args) -> dict:
    """label -> (model, adapter, quantize). --compare: adapter folders apply to --model; int8 / int4 / nf4
    quantize it; anything else is a model."""
    first = (args.model, args.adapter, args.quantize)
    if not args.compare:
        return {"model": first}
    if args.compare == "base":
        second = (args.model, None, args.quantize)
    elif args.compare in ("int8", "int4", "nf4"):
        second = (args.model, args.adapter, args.compare)
    elif (Path(args.compare) / "adapter_config.json").exists():
        second = (args.model, args.compare, args.quantize)
    else:
        second = (args.compare, None, args.quantize)
    return {"A": first, "B": second}


def check_loadable(model: str, adapter: str | None):
    """What load_for_inference will read, checked without loading any weight: the checkpoint found
    (a hub id is fetched), config.json and tokenizer.model (and their agreement), every safetensors
    header (whole, not truncated), and the adapter applied to the model built on `meta` (its config,
    keys and shapes). Errors name the file."""
    import torch
    import lora
    from paligemma import PaliGemma, PaliGemmaConfig
    from paligemma.processor import Processor
    from paligemma.weights import read_header, resolve, weight_files
    folder = resolve(model)
    Processor.from_pretrained(folder)
    for path in weight_files(folder):
        read_header(path)
    if adapter:
        with torch.device("meta"):
            net = PaliGemma(PaliGemmaConfig.from_json(folder / "config.json"))
        lora.load(net, adapter)


def write_outputs(out: Path, results: dict, rows: dict, protocol: dict):
    """The finished set, into `out` (OUT/.partial, before results.seal swaps it in)."""
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


def plan_of(args, examples, runs: dict) -> dict:
    """What the captions depend on: an unfinished run resumes only with the same plan."""
    return dict(data=str(Path(args.data).resolve()), split=args.split, images=fingerprint(examples),
                prompt=args.prompt, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                num_beams=args.num_beams, do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, dtype=args.dtype,
                models={label: list(r) for label, r in runs.items()}, **task_plan(args, examples))


def task_plan(args, examples) -> dict:
    """A task set's part of the plan: its task and the rows' own prompts (a caption set's plan is unchanged)."""
    import hashlib
    if args.task == "caption" and not any(e.prefix for e in examples):
        return {}
    prompts = "\n".join(prompt_of(e, args) for e in examples)
    return dict(task=args.task, prompts=hashlib.sha256(prompts.encode()).hexdigest()[:12])


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    store.check_output(out, args.resume, args.overwrite)
    split = None if args.split == "all" else args.split
    examples, skipped = load_examples(args.data, split, skip_bad=args.skip_bad)
    if skipped:
        print(skipped.report(), file=sys.stderr)
    if args.max_samples:
        examples = examples[:args.max_samples]
    check_task(args, examples)
    runs = {} if args.predictions else rows_to_run(args)
    for model_name, adapter, _ in dict.fromkeys(runs.values()):  # before the first caption: every row loads
        check_loadable(model_name, adapter)
    given = None  # --predictions: per model, (its predictions, their boxes' saved <loc> probabilities or None)
    if args.predictions:
        given = {model: ([r["prediction"] for _, r in read],
                         saved_loc_probs(args.predictions, read) if args.task == "detect" else None)
                 for model, read in predictions_by_model(args.predictions, examples,
                                                         [prompt_of(e, args) for e in examples]).items()}
    meteor, why = choose_meteor(args.meteor) if args.task == "caption" else (None, None)  # no JVM for boxes
    left_out = {"METEOR": why} if why else {}
    if why:
        print(f"METEOR left out: {wordnet.INSTALL}", file=sys.stderr)
    refs_bytes = sum(len(c) + 4 for e in examples for c in references_of(e))
    store.free_space_check(out, 3 * max(1, len(runs)) * (refs_bytes + len(examples) * (300 + 8 * args.max_new_tokens))
                           + (1 << 20))
    created = not out.exists()
    try:
        took_over = lock_folder(out, "evaluate.py")
    except OSError:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    if took_over:
        print(took_over, file=sys.stderr)
    try:
        with Scorer(meteor, args.bootstrap) as scorer:  # one JVM for every row
            return evaluate(args, out, examples, skipped, runs, given, scorer, left_out)
    except BaseException:
        if runs and (out / store.PARTIAL / "captions.jsonl").exists():
            print(f"evaluate.py: the captions made so far are kept in {out / store.PARTIAL}: run the same command "
                  "with --resume to continue", file=sys.stderr)
        raise
    finally:
        unlock_folder(out)


def draw_folder(args, label: str, runs: dict):
    """--draw DIR, or DIR/<row label> when --compare draws two rows."""
    return None if not args.draw else Path(args.draw) / label if len(runs) > 1 else Path(args.draw)


def evaluate(args, out, examples, skipped, runs, given, scorer, left_out):
    done = store.start(out, plan_of(args, examples, runs), args.resume)
    results, rows = {}, {}
    for model, (preds, probs) in (given or {}).items():
        name = f"{model} (predictions: {args.predictions})" if model else f"predictions: {args.predictions}"
        results[name], rows[name] = score(examples, preds, args, scorer, name, probs,
                                          draw_folder(args, model or name, {"": 0} if not model else given))
    for label, (model_name, adapter, quantize) in runs.items():
        name = f"{label}: {model_name}" + (f" + {adapter}" if adapter else "") + (f" ({quantize})" if quantize else "")
        made = done.get(name, [])
        if len(made) < len(examples):
            if made:
                print(f"{name}: {len(made)} of {len(examples)} captions already made, continuing")
            model, processor = load_for_inference(model_name, adapter, args.dtype, args.device, quantize)
            made = made + predict(model, processor, examples, args, name, len(made), out)
            del model, processor  # never two models in memory
            gc.collect()
        if [r["image"] for r in made] != [str(e.image) for e in examples]:
            raise store.ResultsError(f"{out / store.PARTIAL}: the captions of {name} do not follow the split's "
                                     "images: rerun with --overwrite")
        results[name], rows[name] = score(examples, [r["prediction"] for r in made], args, scorer, name,
                                          [r.get("loc_probs") for r in made], draw_folder(args, label, runs))
    scorer.add_paired(results)
    protocol = dict(data=str(args.data), split=args.split, images=len(examples), references=args.references,
                    prompt=args.prompt, num_beams=args.num_beams, do_sample=args.do_sample,
                    max_new_tokens=args.max_new_tokens, skipped=skipped.reasons,
                    tokenisation="lower-case, punctuation dropped (approximates pycocoevalcap's PTB tokenizer)",
                    **scorer.protocol(args.task))
    if left_out:
        protocol["meteor"] = f"left out: no WordNet ({wordnet.INSTALL})"
    if args.task != "caption":
        for caption_only in ("references", "tokenisation"):
            protocol.pop(caption_only, None)
        protocol.update(task=args.task, chosen_by="--metric" if args.metric else "the rows' prompts")
    store.seal(out, lambda folder: write_outputs(folder, results, rows, protocol))
    print(table(results, left_out))
    for name, r in filter(lambda item: "health" in item[1], results.items()):
        print(f"output health ({name}): " + ", ".join(f"{k} {v:.3f}" for k, v in r["health"].items()))
    names = list(rows)
    print("\n| image | reference | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for i, r in enumerate(rows[names[0]][:5]):
        print(f"| {Path(r['image']).name} | {r['references'][0]} | "
              + " | ".join(one_line(rows[n][i]["prediction"]) for n in names) + " |")
    return results


if __name__ == "__main__":
    run(main, "evaluate.py")
