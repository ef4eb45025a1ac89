"""Fine-tune PaliGemma on captions or any of its tasks (LoRA anywhere, or full), in the spirit of nanoGPT's train.py.

    python train.py                                   # embedded demo: synthetic scenes, tiny model, CPU
    python train.py --demo detect                     # the same for detection: boxes as <loc> tokens, mAP
    python train.py --data RSICD/captions.csv         # the tiny model from scratch on a real set
    python train.py --model google/paligemma-3b-pt-224 --data RISC/captions.csv --lora all
    python train.py --model ... --data ... --quantize nf4 --dtype bfloat16   # QLoRA
    torchrun --nproc_per_node 4 train.py ...          # data-parallel, same global batch

Rows {"image", "prefix", "suffix", "split"} (JSONL or CSV) train each image under its own prompt; the
prefixes' task (detect, answer, ocr, ...; captions otherwise) chooses the metrics (paligemma/tasks).
Segmentation (`segment ...` rows, a `<seg>` suffix or a mask file per object) needs --vae vae-oid.npz:

    python train.py --model M --data masks.jsonl --vae vae-oid.npz   # OUT/best by mean mask IoU

OUT holds checkpoint/ (the last save, for --resume), best/ (the adapter or model with the best
validation CIDEr-D, or the task's own metric, and best.json), adapter/ or final/ (the last step's),
metrics.jsonl and loss.png.
"""
import argparse
import os
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lora
from paligemma import PaliGemma
from paligemma.atomic import lock_folder, unlock_folder
from paligemma.captioning import distributed, wordnet
from paligemma.captioning.data import fingerprint, load_examples, run_task
from paligemma.captioning.precision import MODES, Precision
from paligemma.captioning.run_folder import (append_jsonl, check_run_folder, check_same_data, export, load_train_state,
                                             read_log, save_train_state, set_aside, trim_log, wandb_run)
from paligemma.captioning.training import (Batches, accumulate, blind, check_prefixes_fit, check_step, collate,
                                           first_loss_check, lr_at, make_trainable)
from paligemma.captioning.validation import (Best, Validation, answer_budget, caption_and_score, draw_answers, row_keys,
                                             save_best)
from paligemma.cli import DTYPES, NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, add_debug, number, run
from paligemma.processor import Processor
from paligemma.tasks.mask_files import training_answers
from paligemma.tasks.vqvae import VAE_HELP, MaskDecoder


# What `--demo detect` changes from the caption demo's defaults (flags given on the command line still win):
# detection answers are longer (four <loc> tokens and a label per object), so it trains longer; and its
# random SigLIP stays frozen: trained along, the tower's output became nearly the same for every image on
# 3 runs of 18 (the image-blind answer prior to the end); frozen, 15 runs of 15 used the image by step 100
# (docs/tasks.md, the detection demo).
DEMOS = {"caption": {"out": "runs/demo"},
         "detect": {"out": "runs/demo-detect", "steps": 600, "lr": 3e-3, "eval_every": 100, "val_captions": 50,
                    "freeze": ["vision_tower"]}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or hub id (default: a tiny random model, tokenizer from the data)")
    p.add_argument("--data", help="captions CSV/JSONL or folder (default: generate the synthetic demo set)")
    p.add_argument("--demo", choices=sorted(DEMOS), default="caption", help="without --data: the synthetic set to "
                   "generate (captions, or detection scenes: " + ", ".join(f"{k} {v}" for k, v in DEMOS["detect"].items()
                                                                        if k != "out") + ")")
    p.add_argument("--out", default="runs/demo", help="run folder: checkpoints, metrics.jsonl, adapter "
                   "(default runs/demo, runs/demo-detect for --demo detect)")
    p.add_argument("--prompt", default="caption en", help="task prefix of rows without their own \"prefix\"")
    p.add_argument("--first-caption-only", action="store_true", help="always train on caption_1 (the study's setup)")
    p.add_argument("--finetune", choices=["lora", "full"], default=None, help="default: full for the demo, else lora")
    p.add_argument("--lora", default="all", help="LoRA targets: decoder, vision, projector, all, or a regex")
    p.add_argument("--lora-r", type=POSITIVE, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=POSITIVE_FLOAT, default=16, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=number(float, 0, 1, high_open=True), default=0.0, help="dropout on the LoRA input")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    p.add_argument("--train-modules", nargs="*", default=[], help="whole modules to train too, e.g. multi_modal_projector")
    p.add_argument("--freeze", nargs="*", default=[], help="full fine-tuning: modules kept frozen, e.g. vision_tower")
    p.add_argument("--steps", type=POSITIVE, default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="global micro-batch, split over torchrun processes")
    p.add_argument("--grad-accum", type=POSITIVE, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="peak learning rate (default 2e-3 demo, 2e-4 otherwise)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=30, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.0, help="AdamW weight decay")
    p.add_argument("--clip", type=POSITIVE_FLOAT, default=1.0, help="gradient-norm clip")
    p.add_argument("--max-length", type=POSITIVE, default=None, help="truncate suffixes to fit this many tokens")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="storage dtype of frozen weights")
    p.add_argument("--quantize", choices=["int8", "nf4"], help="QLoRA: LoRA over a frozen int8 or 4-bit NF4 base "
                   "(the adapter still loads on the unquantized model)")
    p.add_argument("--amp", choices=MODES, default="auto", help="autocast compute dtype: bf16, fp16 (with loss "
                   "scaling, for GPUs without bf16), none (float32); auto: bf16 where the device has it, else fp16 (a CPU: float32)")
    p.add_argument("--eval-every", type=POSITIVE, default=100, help="validation: loss, image reliance, and "
                   "--val-captions captions scored (CIDEr-D picks OUT/best)")
    p.add_argument("--val-captions", type=NON_NEGATIVE, default=32, help="validation images captioned at each "
                   "evaluation (0: no captions, no OUT/best)")
    p.add_argument("--early-stop", type=POSITIVE, metavar="N", help="stop after N evaluations without a better "
                   "validation CIDEr-D")
    p.add_argument("--eval-samples", type=POSITIVE, default=100, help="test images captioned at the end")
    p.add_argument("--save-every", type=POSITIVE, default=200, help="checkpoint interval")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--overfit-batch", action="store_true", help="train on one batch (caption_1) to prove the pipeline learns")
    p.add_argument("--blind", action="store_true", help="control run: train on images shuffled across the set")
    p.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (rank 0)")
    p.add_argument("--fsdp", action="store_true", help="full fine-tuning sharded over torchrun processes (FSDP2)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad examples instead of stopping")
    p.add_argument("--vae", metavar="NPZ", help=f"segmentation sets: {VAE_HELP}; its encoder writes the answers of "
                   "rows with mask files, its decoder turns answers into masks for validation (mean mask IoU)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and caption sampling")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    add_debug(p)
    demo = p.parse_known_args(argv)[0].demo  # its defaults first, then the flags given
    p.set_defaults(**DEMOS[demo])
    args = p.parse_args(argv)
    if args.demo != "caption" and (args.data or args.model):
        p.error(f"--demo {args.demo} generates its own data and model: drop --data / --model")
    if args.early_stop and not args.val_captions:
        p.error("--early-stop needs validation captions: --val-captions above 0")
    if args.model is not None and args.data is None:
        p.error("--data is needed with --model (a captions CSV/JSONL or its folder)")
    args.full = (args.finetune or ("full" if args.model is None and not args.quantize else "lora")) == "full"
    if args.full and args.quantize:
        p.error(f"--quantize {args.quantize} trains LoRA over frozen quantized weights; full fine-tuning would update "
                "the int8 / 4-bit weights themselves: use --finetune lora, or drop --quantize")
    if args.freeze and not args.full:
        if args.freeze == DEMOS[args.demo].get("freeze"):  # the demo's default, not the user's: LoRA freezes anyway
            args.freeze = []
        else:
            p.error("--freeze is for full fine-tuning (--finetune full); LoRA trains only its adapters and "
                    "--train-modules")
    if args.fsdp and not (args.full and int(os.environ.get("WORLD_SIZE", 1)) > 1):
        p.error("--fsdp shards full fine-tuning over processes: use --finetune full under torchrun")
    return args


def prepare_from_scratch(out: Path, data: str | None, skip_bad: bool = False, demo: str = "caption") -> tuple[str, str]:
    """No --model: a random tiny checkpoint with a tokenizer trained on the data's train captions (and
    prefixes); no --data either: the embedded synthetic set, RISC-layout captions or (--demo detect)
    detection scenes. The tokenizer carries PaliGemma's <loc> / <seg> tokens when the data has them.
    Built once (rank 0), reused on resume."""
    from paligemma.captioning.synthetic import DEMO_SCENE, make_checkpoint, make_dataset, make_detection_dataset
    model = out / "model"
    if data is None:
        data = out / "data" / ("captions.csv" if demo == "caption" else "detections.jsonl")
        if not data.exists():
            make_dataset(data.parent) if demo == "caption" else make_detection_dataset(data.parent, **DEMO_SCENE)
    if not all((model / name).exists() for name in ("model.safetensors", "tokenizer.model")):  # one alone: rebuilt
        examples, _ = load_examples(data, split="train", check_images=False, skip_bad=skip_bad)
        texts = [c for e in examples for c in e.captions] + sorted({e.prefix for e in examples if e.prefix})
        labels = sorted({m.label for e in examples for m in e.masks or ()})  # mask rows: answers come later
        make_checkpoint(model, texts + labels, task_tokens=bool(labels) or any("<loc" in t or "<seg" in t for t in texts))
    return str(model), str(data)


def setup(args, rank: int) -> tuple[Path, bool]:
    """Takes the run folder (one run at a time), checks it, builds the demo's data and model when asked;
    returns (out, from_scratch)."""
    out = Path(args.out)
    if rank == 0:
        took_over = lock_folder(out, "train.py")  # one run per folder: a second one is refused by name
        if took_over:
            print(took_over)
        check_run_folder(out, args.resume)
    from_scratch = args.model is None
    if from_scratch:
        if rank == 0:
            prepare_from_scratch(out, args.data, args.skip_bad, args.demo)
        distributed.barrier()
        args.model, args.data = prepare_from_scratch(out, args.data, args.skip_bad, args.demo)
    distributed.barrier()  # the other ranks read OUT/checkpoint only after rank 0 has recovered it
    return out, from_scratch


def load_splits(args, say):
    """The three splits, their one task, and mask rows' answers (made once, by the --vae encoder)."""
    train, skipped = load_examples(args.data, "train", skip_bad=args.skip_bad)
    val, _ = load_examples(args.data, "val", skip_bad=args.skip_bad)
    test, _ = load_examples(args.data, "test", skip_bad=args.skip_bad)
    say(f"data: {len(train)} train / {len(val)} val / {len(test)} test images" + (f"; {skipped.report()}" if skipped else ""))
    task = run_task(args.prompt, train, val, test)  # which metrics score it and pick OUT/best
    train, val, test = training_answers(task, args.vae, train, val, test)
    if args.blind:
        train = blind(train, args.seed)
        say("image-blind control: every training caption is paired with another example's image")
    if args.overfit_batch:
        train = test = train[:args.batch_size]
        args.first_caption_only = True
        say(f"overfitting one batch of {len(train)} examples (caption_1): the loss should go to ~0")
    return train, val, test, skipped, task


def main(argv=None):
    args = parse_args(argv)
    decoder = MaskDecoder.from_npz(args.vae) if args.vae else None  # a missing or foreign file named before anything loads
    rank, world, args.device = distributed.setup(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    out, from_scratch = setup(args, rank)
    lr = args.lr or (2e-3 if from_scratch else 2e-4)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    # bad rows, a segment set without --vae, a --max-length too short for a prefix: all refused before the model loads
    train, val, test, skipped, task = load_splits(args, say)
    processor = Processor.from_pretrained(args.model)
    check_prefixes_fit(processor, {"train": train, "val": val, "test": test}, args.prompt, args.max_length, args.data)
    model = PaliGemma.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device, quantize=args.quantize)
    budget = answer_budget(processor, train, task)  # new tokens per answer
    if task != "caption":
        say(f"task: {task} (prefixes such as {next((e.prefix for e in train if e.prefix), args.prompt)!r}); "
            f"{budget} new tokens per answer")
    rows = {"train": fingerprint(train), "val": fingerprint(val), "test": fingerprint(test)}  # for --resume
    make_trainable(model, args.full, lora_targets=args.lora, r=args.lora_r, alpha=args.lora_alpha,
                   dropout=args.lora_dropout, rslora=args.rslora, train_modules=args.train_modules, freeze=args.freeze)
    say(lora.summary(model))
    model.set_gradient_checkpointing(args.checkpointing)
    par = distributed.Parallel(model, rank, world, args.device, fsdp=args.fsdp)  # one process, DDP or FSDP2
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.98),
                                  fused=args.device.startswith("cuda"))
    precision = Precision(args.amp, args.device)  # autocast, loss scaling, the optimizer step
    say(precision.note)
    batches, best, step, log = Batches(train, args.batch_size, args.seed), Best(args.early_stop), 0, out / "metrics.jsonl"
    validation = Validation(processor, val, args.prompt, args.batch_size, args.val_captions, args.max_length,
                            task, budget, decoder)
    if args.resume:
        step = resume(args, out, par, optimizer, batches, rng, best, precision, rows, say, validation.metric)
    if rank == 0 and args.resume:
        trim_log(log, step)  # drops what the first run logged after its checkpoint
    elif rank == 0 and (kept := set_aside(log)):  # a new run starts a new log; a killed run's is kept
        print(f"a new run, a new log: the earlier run's {log.name} is kept as {kept}")
    meteor = wordnet.available() and task == "caption"  # the demo runs without WordNet too: METEOR is then left out, and says so
    if not meteor and task == "caption":
        say(f"METEOR left out of the test scores: {wordnet.INSTALL}")

    def score_test(m):
        return caption_and_score(m, processor, test[:args.eval_samples], args.prompt, with_meteor=meteor, task=task,
                                 max_new_tokens=budget, decoder=decoder)
    wb = wandb_run(args.wandb, vars(args), rank, out)
    if step == 0 and par.generates:
        with par.gathered():
            before = score_test(model)[0]
        if rank == 0:
            append_jsonl(log, {"step": 0, "test_before": before})
    if best.stop:  # the restored tracker says stop (an early stop's checkpoint): finish, do not train on
        say(f"early stop already reached at step {step}: {best.stale} evaluations without a better val "
            f"{validation.metric} (best: step {best.step}); finishing (a larger --early-stop trains on)")
    end = step if best.stop else args.steps
    bar = tqdm(range(step, end), initial=step, total=args.steps, desc="train", mininterval=5, disable=rank > 0)
    t0, tokens, losses, done = time.time(), 0, [], step
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, args.warmup, args.steps)
        micro_batches = [collate(processor, batches.next(), args.prompt, rng, args.first_caption_only,
                                 args.max_length, rank, world) for _ in range(args.grad_accum)]
        loss, n_tokens = accumulate(par, precision, micro_batches, args.device)
        tokens += n_tokens
        if step == 0:
            say(first_loss_check(loss, model.config.text.vocab_size, pretrained=not from_scratch))
        losses.append(loss)
        grad_norm, stepped = precision.step(optimizer, params, args.clip)
        check_step(step, loss, grad_norm, stepped, precision, out / "checkpoint")
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item(),
                  **precision.metrics()}
        evaluates = done % args.eval_every == 0 or done == args.steps
        stop = evaluates and validate(args, out, par, validation, best, precision, record)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.1e}", tok_s=f"{tokens / (time.time() - t0):.0f}",
                        **{validation.metric.split("@")[0].split("-")[0].lower(): f"{best.score:.3f}@{best.step}"
                           if best.step else "-"}, refresh=False)
        if rank == 0:
            append_jsonl(log, record)
            if wb:
                wb.log(record, step=done)
        if done % args.save_every == 0 or done == args.steps or stop:
            save_checkpoint(args, out, par, optimizer, done, batches, rng, best, precision, rows)
        if stop:
            say(f"early stop at step {done}: {best.stale} evaluations without a better val {validation.metric} "
                f"(best: step {best.step}, {best.score:.3f})")
            break
    finish(args, out, par, best, score_test, test, skipped, losses, done, wb, validation.metric, task, decoder)
    return model


def resume(args, out: Path, par, optimizer, batches, rng, best, precision, rows: dict, say, metric="CIDEr-D") -> int:
    """Everything OUT/checkpoint saved, restored; refused when the data's rows changed. Returns the step."""
    step, extra = load_train_state(out / "checkpoint", par.model, optimizer, batches, rng,
                                   par.wrapped if par.sharded else None, args=vars(args))
    check_same_data(extra.get("data"), rows, out / "checkpoint")
    best.load(extra.get("best", best.state()), out / "best" / "best.json")
    precision.load_state_dict(extra.get("precision"))
    say(f"resumed at step {step}" + (f" (best so far: step {best.step}, val {metric} {best.score:.3f})" if best.step else ""))
    return step


def validate(args, out: Path, par, validation, best, precision, record: dict) -> bool:
    """One evaluation into `record`; a better validation CIDEr-D (or task metric) is kept in OUT/best. Returns whether
    --early-stop ends the run (rank 0 decides: it alone validates under DDP)."""
    step = record["step"]
    if par.generates:
        with par.gathered():
            record.update(validation(par.model, precision.autocast_kwargs, step, par.rank))
        if validation.key in record and best.update(step, record[validation.key]):
            state = par.full_state()[0]  # sharded: every rank gathers
            if par.rank == 0:
                save_best(out / "best", par.model, args.full, args.model, step, record, state, validation.key)
        record.update(best_step=best.step)
    return bool(args.early_stop) and distributed.global_sum(float(par.rank == 0 and best.stop), args.device) > 0


def save_checkpoint(args, out: Path, par, optimizer, step: int, batches, rng, best, precision, rows: dict):
    """OUT/checkpoint: what --resume needs, gathered from the shards first when sharded; every rank calls."""
    model_state, optimizer_state = par.full_state(optimizer)
    if par.rank == 0:
        save_train_state(out / "checkpoint", par.model, optimizer, step, batches, rng, args.full, vars(args),
                         (model_state, optimizer_state) if par.sharded else None,
                         extra={"best": best.state(), "data": rows, "precision": precision.state_dict()})
    distributed.barrier()


def finish(args, out: Path, par, best, score_test, test, skipped, losses: list, done: int, wb, metric: str = "CIDEr-D",
           task: str = "caption", decoder=None):
    """The last step's export (OUT/adapter or OUT/final), test captions and the report; the run folder freed."""
    final_state = par.full_state()[0]
    if par.rank == 0:
        export(par.model, args.full, args.model, out / ("final" if args.full else "adapter"), final_state)
    if par.generates:
        with par.gathered():
            after = score_test(par.model)
    if par.rank == 0:
        report(args, out, after=after, last=done, best=best, score_test=score_test, test=test, skipped=skipped,
               losses=losses, metric=metric, task=task, decoder=decoder)
    if wb:
        wb.finish()
    if par.rank == 0:
        unlock_folder(out)
    distributed.cleanup()


def report(args, out: Path, *, after, last: int, best, score_test, test, skipped, losses, metric="CIDEr-D",
           task="caption", decoder=None):
    """Test metrics before, at the last step and at the best step (with 95 % intervals over the test
    images: evaluate.py's bootstrap, for captions and task metrics); output health; the overfit verdict; curves."""
    from paligemma.captioning import curves
    from paligemma.captioning.scorer import Scorer, cell
    scores, out_health, preds, stats = after
    full, log = args.full, out / "metrics.jsonl"
    examples = test[:args.eval_samples]
    refs = dict(zip(row_keys(examples), (e.captions for e in examples)))  # keyed as caption_and_score keys its preds
    scorer = Scorer("nltk" if "METEOR" in scores else None)  # its METEOR (captions)
    measured = lambda name, p, s: (scorer.score(name, p, refs) if s is None else scorer.score_task(name, s))["ci95"]
    before = [r["test_before"] for r in read_log(log) if "test_before" in r]
    columns = {"before": before[-1] if before else {}, f"last (step {last})": scores}
    ci95 = {f"last (step {last})": measured("last", preds, stats)}
    if best.step and best.step != last:  # OUT/best as a user loads it
        from paligemma.inference import load_for_inference
        base, adapter = (out / "best", None) if full else (args.model, out / "best")
        best_model, _ = load_for_inference(str(base), adapter and str(adapter), args.dtype, args.device,
                                          args.quantize)
        best_scores, _, best_preds, best_stats = score_test(best_model)
        columns[f"best (step {best.step})"] = best_scores
        ci95[f"best (step {best.step})"] = measured("best", best_preds, best_stats)
        del best_model
    append_jsonl(log, {"step": last, "test_after": scores, "health": out_health, "best_step": best.step,
                       "test_best": list(columns.values())[-1], "test_ci95": ci95})
    print("\n| metric [95 % interval] | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for k in scores:
        print(f"| {k} | " + " | ".join(cell(c.get(k, float("nan")), ci95.get(name, {}).get(k))
                                      for name, c in columns.items()) + " |")
    if "METEOR" not in scores and task == "caption":
        print("| METEOR | " + " | ".join("left out (no WordNet)" for _ in columns) + " |")
    if best.step:
        print(f"best: step {best.step} (val {metric} {best.score:.4f}) in {out / 'best'}")
    print("output health: " + ", ".join(f"{k} {v:.3f}" for k, v in out_health.items()))
    if args.overfit_batch and losses:
        exact = sum(p.strip() == e.captions[0].strip() for e, p in zip(test, preds.values()))
        ok = losses[-1] < 0.1 * losses[0]
        print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {exact}/{len(test)} captions reproduced exactly: "
              + ("the pipeline learns" if ok else "WARNING: it did not memorise one batch; something is broken"))
    if task == "detect":
        print(f"test boxes drawn (predicted in colour, references white): "
              f"{draw_answers(task, test, list(preds.values()), out / 'detections.png')}")
    if task == "segment":
        print(f"test masks drawn: {draw_answers(task, test, list(preds.values()), out / 'segmentations.png', decoder)}")
    png = curves.plot(log, out / "loss.png")
    print(f"curves: {png}" if png else "curves: pip install matplotlib for loss.png")
    if skipped:
        print(skipped.report())


if __name__ == "__main__":
    run(main, "train.py")
