"""Fine-tune PaliGemma on image captions (LoRA anywhere, or full), in the spirit of nanoGPT's train.py.

    python train.py                                   # embedded demo: synthetic scenes, tiny model, CPU
    python train.py --data RSICD/captions.csv         # the tiny model from scratch on a real set
    python train.py --model google/paligemma-3b-pt-224 --data RISC/captions.csv --lora all
    python train.py --model ... --data ... --quantize nf4 --dtype bfloat16   # QLoRA
    torchrun --nproc_per_node 4 train.py ...          # data-parallel, same global batch

OUT holds checkpoint/ (the last save, for --resume), best/ (the adapter or model with the best
validation CIDEr-D, and best.json), adapter/ or final/ (the last step's), metrics.jsonl and loss.png.
"""
import argparse
import contextlib
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lora
from paligemma import PaliGemma
from paligemma.captioning import distributed, wordnet
from paligemma.atomic import lock_folder, unlock_folder
from paligemma.captioning.data import fingerprint, load_examples
from paligemma.captioning.precision import MODES, Precision
from paligemma.captioning.training import (Batches, append_jsonl, blind, check_run_folder, check_same_data, collate,
                                           export, first_loss_check, load_train_state, lr_at, make_trainable,
                                           save_train_state, trim_log, wandb_run)
from paligemma.captioning.validation import Best, Validation, caption_and_score, save_best
from paligemma.cli import NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, add_debug, number, run
from paligemma.processor import IGNORE, Processor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or hub id (default: a tiny random model, tokenizer from the data)")
    p.add_argument("--data", help="captions CSV/JSONL or folder (default: generate the synthetic demo set)")
    p.add_argument("--out", default="runs/demo", help="run folder: checkpoints, metrics.jsonl, adapter")
    p.add_argument("--prompt", default="caption en", help="task prefix")
    p.add_argument("--first-caption-only", action="store_true", help="always train on caption_1 (the study's setup)")
    p.add_argument("--finetune", choices=["lora", "full"], default=None, help="default: full for the demo, else lora")
    p.add_argument("--lora", default="all", help="LoRA targets: decoder, vision, projector, all, or a regex")
    p.add_argument("--lora-r", type=POSITIVE, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=POSITIVE_FLOAT, default=16, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=number(float, 0, 1, high_open=True), default=0.0, help="dropout on the LoRA input")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    p.add_argument("--train-modules", nargs="*", default=[], help="whole modules to train too, e.g. multi_modal_projector")
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
                   "scaling, for GPUs without bf16), none (float32); auto: bf16 where the device has it, else fp16")
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
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and caption sampling")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    add_debug(p)
    args = p.parse_args(argv)
    if args.early_stop and not args.val_captions:
        p.error("--early-stop needs validation captions: --val-captions above 0")
    return args


def prepare_from_scratch(out: Path, data: str | None, skip_bad: bool = False) -> tuple[str, str]:
    """No --model: a random tiny checkpoint with a tokenizer trained on the data's train captions; no
    --data either: the embedded synthetic RISC-layout set. Built once (rank 0), reused on resume."""
    from paligemma.captioning.synthetic import make_checkpoint, make_dataset
    model = out / "model"
    if data is None:
        data = out / "data" / "captions.csv"
        if not data.exists():
            make_dataset(data.parent)
    if not (model / "model.safetensors").exists():
        examples, _ = load_examples(data, split="train", check_images=False, skip_bad=skip_bad)
        make_checkpoint(model, [c for e in examples for c in e.captions])
    return str(model), str(data)


def setup(args, rank: int, world: int) -> tuple[Path, bool, bool]:
    """Checks the run folder, builds the demo's data and model when asked; returns (out, full, from_scratch)."""
    out = Path(args.out)
    if rank == 0:
        took_over = lock_folder(out, "train.py")  # one run per folder: a second one is refused by name
        if took_over:
            print(took_over)
        check_run_folder(out, args.resume)
    from_scratch = args.model is None
    if from_scratch:
        if rank == 0:
            prepare_from_scratch(out, args.data, args.skip_bad)
        distributed.barrier()
        args.model, args.data = prepare_from_scratch(out, args.data, args.skip_bad)
    elif args.data is None:
        raise SystemExit("--data is needed with --model (a captions CSV/JSONL or its folder)")
    distributed.barrier()  # the other ranks read OUT/checkpoint only after rank 0 has recovered it
    full = (args.finetune or ("full" if from_scratch and not args.quantize else "lora")) == "full"
    if full and args.quantize:
        raise SystemExit(f"--quantize {args.quantize} trains LoRA over frozen quantized weights; full fine-tuning would "
                         "update the int8 / 4-bit weights themselves: use --finetune lora, or drop --quantize")
    if args.fsdp and not (full and world > 1):
        raise SystemExit("--fsdp shards full fine-tuning over processes: use --finetune full under torchrun")
    return out, full, from_scratch


def load_splits(args, say):
    train, skipped = load_examples(args.data, "train", skip_bad=args.skip_bad)
    val, _ = load_examples(args.data, "val", skip_bad=args.skip_bad)
    test, _ = load_examples(args.data, "test", skip_bad=args.skip_bad)
    say(f"data: {len(train)} train / {len(val)} val / {len(test)} test images" + (f"; {skipped.report()}" if skipped else ""))
    if args.blind:
        train = blind(train, args.seed)
        say("image-blind control: every training caption is paired with another example's image")
    if args.overfit_batch:
        train = test = train[:args.batch_size]
        args.first_caption_only = True
        say(f"overfitting one batch of {len(train)} examples (caption_1): the loss should go to ~0")
    return train, val, test, skipped


def main(argv=None):
    args = parse_args(argv)
    rank, world, args.device = distributed.setup(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    out, full, from_scratch = setup(args, rank, world)
    lr = args.lr or (2e-3 if from_scratch else 2e-4)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = PaliGemma.from_pretrained(args.model, dtype=dtype, device=args.device, quantize=args.quantize)
    processor = Processor.from_pretrained(args.model)
    train, val, test, skipped = load_splits(args, say)
    rows = {"train": fingerprint(train), "val": fingerprint(val), "test": fingerprint(test)}  # for --resume
    make_trainable(model, full, args)
    say(lora.summary(model))
    model.set_gradient_checkpointing(args.checkpointing)
    # DDP all-reduces gradients in its backward; FSDP2 shards parameters, gradients and optimizer state
    wrapped = distributed.fully_sharded(model, world, args.device) if args.fsdp else distributed.wrap(model, world, args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    generates = rank == 0 or args.fsdp  # a sharded model generates only with every rank taking part
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.98),
                                  fused=args.device.startswith("cuda"))
    precision = Precision(args.amp, args.device)  # autocast, loss scaling, the optimizer step
    say(precision.note)
    batches, best, step = Batches(train, args.batch_size, args.seed), Best(args.early_stop), 0
    log = out / "metrics.jsonl"
    if args.resume:
        step, extra = load_train_state(out / "checkpoint", model, optimizer, batches, rng,
                                       wrapped if args.fsdp else None, args=vars(args))
        check_same_data(extra.get("data"), rows, out / "checkpoint")
        best.load(extra.get("best", best.state()), out / "best" / "best.json")
        precision.load_state_dict(extra.get("precision"))
        say(f"resumed at step {step}" + (f" (best so far: step {best.step}, val CIDEr-D {best.score:.3f})" if best.step else ""))
    if rank == 0:
        trim_log(log, step)  # a new run starts a new log; a resumed one drops what came after its checkpoint
    validation = Validation(processor, val, args.prompt, args.batch_size, args.val_captions, args.max_length)
    amp = precision.autocast_kwargs
    meteor = wordnet.available()  # the demo runs without WordNet too: METEOR is then left out, and says so
    if not meteor:
        say(f"METEOR left out of the test scores: {wordnet.INSTALL}")

    def score_test(m):
        return caption_and_score(m, processor, test[:args.eval_samples], args.prompt, with_meteor=meteor)
    wb = wandb_run(args.wandb, vars(args), rank, out)

    if step == 0 and generates:
        with distributed.root_gathered(wrapped):
            before = score_test(model)[0]
        if rank == 0:
            append_jsonl(log, {"step": 0, "test_before": before})
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="train", mininterval=5, disable=rank > 0)
    t0, tokens, losses, done = time.time(), 0, [], step
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, args.warmup, args.steps)
        loss_sum = 0.0
        micro_batches = [collate(processor, batches.next(), args.prompt, rng, args.first_caption_only,
                                 args.max_length, rank, world) for _ in range(args.grad_accum)]
        # the step's loss is a sum over its label tokens / their count over every micro-batch and rank, so
        # that k micro-batches of b give the step one batch of k x b would (micro-batches differ in length)
        n_labels = distributed.global_sum(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches),
                                          args.device)
        for micro, batch in enumerate(micro_batches):
            batch = {k: v.to(args.device) for k, v in batch.items()}
            sync = micro == args.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync or args.fsdp else wrapped.no_sync()), precision.autocast():
                loss = wrapped(**batch) * world / n_labels  # x world: DDP averages gradients over ranks
            precision.backward(loss)
            loss_sum += loss.item() / world
            tokens += int(batch["attention_mask"].sum()) * world
        loss_sum = distributed.global_sum(loss_sum, args.device)
        if step == 0:
            say(first_loss_check(loss_sum, model.config.text.vocab_size, pretrained=not from_scratch))
        losses.append(loss_sum)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"step {step}: non-finite loss ({loss_sum}); last good checkpoint: {out / 'checkpoint'}")
        grad_norm, stepped = precision.step(optimizer, params, args.clip)
        if not stepped and precision.mode != "fp16":  # fp16: the scaler skipped the step and lowered its scale
            raise FloatingPointError(f"step {step}: non-finite gradient norm ({grad_norm.item()}); last good "
                                     f"checkpoint: {out / 'checkpoint'}")
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": step + 1, "loss": loss_sum, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item(),
                  **precision.metrics()}
        evaluates, stop = (step + 1) % args.eval_every == 0 or step + 1 == args.steps, False
        if generates and evaluates:
            with distributed.root_gathered(wrapped):
                record.update(validation(model, amp, step + 1, rank))
            if "val_CIDEr-D" in record and best.update(step + 1, record["val_CIDEr-D"]):
                state = distributed.full_state(wrapped)[0] if args.fsdp else None  # FSDP: every rank gathers
                if rank == 0:
                    save_best(out / "best", model, full, args.model, step + 1, record, state)
            record.update(best_step=best.step)
        if evaluates and args.early_stop:  # rank 0 decides (it alone validates under DDP)
            stop = distributed.global_sum(float(rank == 0 and best.stop), args.device) > 0
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{record['lr']:.1e}", tok_s=f"{tokens / (time.time() - t0):.0f}",
                        cider=f"{best.score:.3f}@{best.step}" if best.step else "-", refresh=False)
        if rank == 0:
            append_jsonl(log, record)
            if wb:
                wb.log(record, step=step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
            states = distributed.full_state(wrapped, optimizer) if args.fsdp else None
            if rank == 0:
                save_train_state(out / "checkpoint", model, optimizer, step + 1, batches, rng, full, vars(args), states,
                                 extra={"best": best.state(), "data": rows, "precision": precision.state_dict()})
            distributed.barrier()
        if stop:
            say(f"early stop at step {step + 1}: {best.stale} evaluations without a better val CIDEr-D "
                f"(best: step {best.step}, {best.score:.3f})")
            break

    final_state = distributed.full_state(wrapped)[0] if args.fsdp else None
    if rank == 0:
        export(model, full, args.model, out / ("final" if full else "adapter"), final_state)
    if generates:
        with distributed.root_gathered(wrapped):
            after = score_test(model)
    if rank == 0:
        report(after, done, best, full, score_test, test, args, out, log, skipped, losses)
    if wb:
        wb.finish()
    if rank == 0:
        unlock_folder(out)
    distributed.cleanup()
    return model


def report(after, last: int, best, full: bool, score_test, test, args, out, log, skipped, losses):
    """Test metrics before, at the last step and at the best step; output health; the overfit verdict; curves."""
    from paligemma.captioning import curves
    scores, out_health, preds = after
    columns = {"before": next((json.loads(l)["test_before"] for l in open(log) if "test_before" in l), {}),
               f"last (step {last})": scores}
    if best.step and best.step != last:  # OUT/best as a user loads it
        from paligemma.cli import load_for_inference
        base, adapter = (out / "best", None) if full else (args.model, out / "best")
        best_model, _ = load_for_inference(str(base), adapter and str(adapter), args.dtype, args.device,
                                          args.quantize)
        columns[f"best (step {best.step})"] = score_test(best_model)[0]
        del best_model
    append_jsonl(log, {"step": last, "test_after": scores, "health": out_health, "best_step": best.step,
                       "test_best": list(columns.values())[-1]})
    print("\n| metric | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for k in scores:
        print(f"| {k} | " + " | ".join(f"{c.get(k, float('nan')):.4f}" for c in columns.values()) + " |")
    if "METEOR" not in scores:
        print("| METEOR | " + " | ".join("left out (no WordNet)" for _ in columns) + " |")
    if best.step:
        print(f"best: step {best.step} (val CIDEr-D {best.score:.4f}) in {out / 'best'}")
    print("output health: " + ", ".join(f"{k} {v:.3f}" for k, v in out_health.items()))
    if args.overfit_batch and losses:
        exact = sum(p.strip() == e.captions[0].strip() for e, p in zip(test, preds.values()))
        ok = losses[-1] < 0.1 * losses[0]
        print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {exact}/{len(test)} captions reproduced exactly: "
              + ("the pipeline learns" if ok else "WARNING: it did not memorise one batch; something is broken"))
    png = curves.plot(log, out / "loss.png")
    print(f"curves: {png}" if png else "curves: pip install matplotlib for loss.png")
    if skipped:
        print(skipped.report())


if __name__ == "__main__":
    run(main, "train.py")
