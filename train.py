"""Fine-tune PaliGemma on image captions (LoRA anywhere, or full), in the spirit of nanoGPT's train.py.

    python train.py                                   # embedded demo: synthetic scenes, tiny model, CPU
    python train.py --data RSICD/captions.csv         # the tiny model from scratch on a real set
    python train.py --model google/paligemma-3b-pt-224 --data RISC/captions.csv --lora all
    torchrun --nproc_per_node 4 train.py ...          # data-parallel, same global batch
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
from paligemma.captioning import distributed
from paligemma.captioning.data import load_examples
from paligemma.processor import IGNORE, Processor
from paligemma.captioning.training import (Batches, append_jsonl, blind, collate, first_loss_check, image_reliance,
                                load_train_state, lr_at, save_train_state, wandb_run)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or hub id (default: a tiny random model, tokenizer from the data)")
    p.add_argument("--data", help="captions CSV/JSONL or folder (default: generate the synthetic demo set)")
    p.add_argument("--out", default="runs/demo", help="run folder: checkpoints, metrics.jsonl, adapter")
    p.add_argument("--prompt", default="caption en", help="task prefix")
    p.add_argument("--first-caption-only", action="store_true", help="always train on caption_1 (the study's setup)")
    p.add_argument("--finetune", choices=["lora", "full"], default=None, help="default: full for the demo, else lora")
    p.add_argument("--lora", default="all", help="LoRA targets: decoder, vision, projector, all, or a regex")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    p.add_argument("--train-modules", nargs="*", default=[], help="whole modules to train too, e.g. multi_modal_projector")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="global micro-batch, split over torchrun processes")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 demo, 2e-4 otherwise)")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--max-length", type=int, default=None, help="truncate suffixes to fit this many tokens")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="storage dtype of frozen weights")
    p.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="autocast compute dtype (none: float32)")
    p.add_argument("--eval-every", type=int, default=100, help="validation loss, samples and image reliance")
    p.add_argument("--eval-samples", type=int, default=100, help="test images captioned at the end")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint interval")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--overfit-batch", action="store_true", help="train on one batch (caption_1) to prove the pipeline learns")
    p.add_argument("--blind", action="store_true", help="control run: train on images shuffled across the set")
    p.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (rank 0)")
    p.add_argument("--fsdp", action="store_true", help="full fine-tuning sharded over torchrun processes (FSDP2)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad examples instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and caption sampling")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    return p.parse_args(argv)


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


def evaluate_captions(model, processor, examples, prompt, batch_size=32):
    from paligemma.caption import caption
    from paligemma.captioning.metrics import health, score_all
    from paligemma.captioning import wordnet
    model.eval()
    texts = caption(model, processor, [e.image for e in examples], prompt, batch_size, max_new_tokens=24)
    preds = {str(e.image): c for e, c in zip(examples, texts)}
    refs = {str(e.image): e.captions for e in examples}
    scores = score_all(preds, refs, with_meteor=wordnet.available())  # the demo runs without WordNet too
    return scores, health(preds, refs), preds


def export(model, full: bool, base: str, out: Path, state: dict | None = None):
    """The result a user keeps: OUT/final (a hub-layout checkpoint + tokenizer) or OUT/adapter (PEFT).
    `state`: the whole state gathered from FSDP shards."""
    import shutil
    from paligemma.weights import resolve
    if full:
        model.save_pretrained(out / "final", state_dict=state)
        shutil.copyfile(resolve(base) / "tokenizer.model", out / "final" / "tokenizer.model")
    else:
        lora.save(model, out / "adapter", base_model_name_or_path=base)


def main(argv=None):
    args = parse_args(argv)
    rank, world, args.device = distributed.setup(args.device)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    from_scratch = args.model is None
    if from_scratch:
        if rank == 0:
            prepare_from_scratch(out, args.data, args.skip_bad)
        distributed.barrier()
        args.model, args.data = prepare_from_scratch(out, args.data, args.skip_bad)
    elif args.data is None:
        raise SystemExit("--data is needed with --model (a captions CSV/JSONL or its folder)")
    full = (args.finetune or ("full" if from_scratch else "lora")) == "full"
    if args.fsdp and not (full and world > 1):
        raise SystemExit("--fsdp shards full fine-tuning over processes: use --finetune full under torchrun")
    lr = args.lr or (2e-3 if from_scratch else 2e-4)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    say = print if rank == 0 else (lambda *a, **k: None)

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = PaliGemma.from_pretrained(args.model, dtype=dtype, device=args.device)
    processor = Processor.from_pretrained(args.model)
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

    if full:
        for p in model.parameters():
            p.requires_grad_(True)
        model.float()  # full fine-tuning keeps float32 master weights; autocast computes in bf16
    else:
        lora.inject(model, args.lora, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    rslora=args.rslora)
        lora.train_modules(model, args.train_modules)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    say(lora.summary(model))
    model.set_gradient_checkpointing(args.checkpointing)
    # DDP all-reduces gradients in its backward; FSDP2 shards parameters, gradients and optimizer state
    wrapped = distributed.fsdp(model, world, args.device) if args.fsdp else distributed.wrap(model, world, args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    generates = rank == 0 or args.fsdp  # a sharded model generates only with every rank taking part
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.98),
                                  fused=args.device.startswith("cuda"))
    batches = Batches(train, args.batch_size, args.seed)
    step = 0
    if args.resume and (out / "checkpoint" / "state.pt").exists():
        step = load_train_state(out / "checkpoint", model, optimizer, batches, rng, wrapped if args.fsdp else None)
        say(f"resumed at step {step}")
    val = val[::max(1, len(val) // args.batch_size)][:args.batch_size]  # spread over the split, not its first rows
    val_batch = collate(processor, val, args.prompt, random.Random(0), True, args.max_length)
    val_prompts = processor([e.image for e in val[:3]], args.prompt)  # no suffix: what generation sees
    amp = dict(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.amp == "bf16")
    log = out / "metrics.jsonl"
    wb = wandb_run(args.wandb, vars(args), rank)

    if step == 0 and generates:
        with distributed.root_gathered(wrapped):
            before, _, _ = evaluate_captions(model, processor, test[:args.eval_samples], args.prompt)
        if rank == 0:
            append_jsonl(log, {"step": 0, "test_before": before})
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="train", mininterval=5, disable=rank > 0)
    t0, tokens, first_loss = time.time(), 0, None
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
            with (contextlib.nullcontext() if sync or args.fsdp else wrapped.no_sync()), torch.autocast(**amp):
                loss = wrapped(**batch) * world / n_labels  # x world: DDP averages gradients over ranks
            loss.backward()
            loss_sum += loss.item() / world
            tokens += int(batch["attention_mask"].sum()) * world
        loss_sum = distributed.global_sum(loss_sum, args.device)
        if step == 0:
            say(first_loss_check(loss_sum, model.config.text.vocab_size, pretrained=not from_scratch))
        first_loss = loss_sum if first_loss is None else first_loss
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
            raise FloatingPointError(f"step {step}: non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient norm'} "
                                     f"(loss {loss_sum}, grad norm {grad_norm.item()}); last good checkpoint: {out / 'checkpoint'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                        tok_s=f"{tokens / (time.time() - t0):.0f}", refresh=False)
        record = {"step": step + 1, "loss": loss_sum, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item()}
        if generates and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            with distributed.root_gathered(wrapped):
                record.update(validate(model, processor, val_batch, val_prompts, val, amp, step + 1, rank))
        if rank == 0:
            append_jsonl(log, record)
            if wb:
                wb.log(record, step=step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            states = distributed.full_state(wrapped, optimizer) if args.fsdp else None
            if rank == 0:
                save_train_state(out / "checkpoint", model, optimizer, step + 1, batches, rng, full, vars(args), states)
            distributed.barrier()

    final_state = distributed.full_state(wrapped)[0] if args.fsdp else None
    if rank == 0:
        export(model, full, args.model, out, final_state)
    if generates:
        with distributed.root_gathered(wrapped):
            after, out_health, preds = evaluate_captions(model, processor, test[:args.eval_samples], args.prompt)
    if rank == 0:
        report(after, out_health, preds, test, args, out, log, skipped, first_loss, loss_sum)
    if wb:
        wb.finish()
    distributed.cleanup()
    return model


def validate(model, processor, val_batch, val_prompts, val, amp, step: int, rank: int = 0) -> dict:
    """Validation loss with own vs shuffled images, and a few decoded captions next to their references."""
    model.eval()
    device = model.device
    with torch.autocast(**amp):
        own, shuffled = image_reliance(model, {k: v.to(device) for k, v in val_batch.items()})
    samples = model.generate(**{k: v.to(device) for k, v in val_prompts.items()}, max_new_tokens=24)
    gap = shuffled - own
    if rank:
        return {}
    tqdm.write(f"step {step}: val loss {own:.3f}, with shuffled images {shuffled:.3f} (gap {gap:+.3f}"
               f"{'  <- the decoder is NOT using the image' if gap < 0.02 else ''})")
    for e, text in zip(val[:3], processor.batch_decode(samples)):
        tqdm.write(f"  {e.image.name}: {text!r}  | ref: {e.captions[0]!r}")
    return dict(val_loss=own, val_loss_shuffled_images=shuffled, image_gap=gap)


def report(after, out_health, preds, test, args, out, log, skipped, first_loss, last_loss):
    """Test metrics before/after, output health, the overfit verdict, the curves."""
    from paligemma.captioning import curves
    append_jsonl(log, {"step": args.steps, "test_after": after, "health": out_health})
    before = next((json.loads(l)["test_before"] for l in open(log) if "test_before" in l), {})
    print("\n| metric | before | after |\n|---|---:|---:|")
    for k, v in after.items():
        print(f"| {k} | {before.get(k, float('nan')):.4f} | {v:.4f} |")
    print("output health: " + ", ".join(f"{k} {v:.3f}" for k, v in out_health.items()))
    if args.overfit_batch:
        exact = sum(p.strip() == e.captions[0].strip() for e, p in zip(test, preds.values()))
        ok = last_loss < 0.1 * first_loss
        print(f"overfit: loss {first_loss:.3f} -> {last_loss:.3f}, {exact}/{len(test)} captions reproduced exactly: "
              + ("the pipeline learns" if ok else "WARNING: it did not memorise one batch; something is broken"))
    png = curves.plot(log, out / "loss.png")
    print(f"curves: {png}" if png else "curves: pip install matplotlib for loss.png")
    if skipped:
        print(skipped.report())


if __name__ == "__main__":
    main()
