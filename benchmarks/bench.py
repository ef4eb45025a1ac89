"""This project vs transformers (+ PEFT) on the same random weights and inputs: load, prefill, decode, LoRA step.

    python benchmarks/bench.py --ckpt DIR [--train-ckpt DIR] [--device cpu|cuda] [--reps 3] [--out FILE.md]
    python benchmarks/bench.py --ckpt DIR --quantize int8 int4 nf4 ...   # ours bf16 vs ours quantized instead

Every line runs in a fresh process per implementation (so peak memory is that line's), after one
warm-up, `--reps` times; the median is reported with the ratio ours / transformers. Memory is the
process's resident set on CPU (sampled every millisecond, minus what it held before the line), and
torch's peak allocation on CUDA. Decode bandwidth = decoder weight bytes x steps/s at batch 1,
against a measured copy bandwidth (CPU) or the HBM figure given with --hbm (GPU).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from checkpoint import shapes  # noqa: E402  (benchmarks/checkpoint.py)
PROMPT = 12  # <bos> + a short prompt + "\n", after the image tokens
NEW = 16  # decode steps measured
PACK = os.environ.get("PACK", "1") == "1"  # inference lines use paligemma.packing on CPU


class PeakMemory:
    """Peak bytes during the block: RSS sampled by a thread on CPU, the allocator's peak on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, rss())
        self.delta = self.peak - self.base


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def inputs(config: dict, batch: int, suffix: int = 0, device="cpu", seed=0) -> dict:
    """Image tokens + <bos> + prompt (+ suffix for training), the image a random tensor."""
    g = torch.Generator().manual_seed(seed)
    n_img = (config["vision_config"].get("image_size", 224) // config["vision_config"]["patch_size"]) ** 2
    vocab = config["text_config"]["vocab_size"]
    text = torch.randint(3, min(vocab, config["image_token_index"]), (batch, PROMPT - 1 + suffix), generator=g)
    ids = torch.cat([torch.full((batch, n_img), config["image_token_index"]), torch.full((batch, 1), 2), text], 1)
    types = torch.zeros_like(ids)
    if suffix:
        types[:, -suffix:] = 1
    size = config["vision_config"].get("image_size", 224)
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types,
               pixel_values=torch.rand(batch, 3, size, size, generator=g) * 2 - 1)
    if suffix:
        out["labels"] = torch.where(types.bool(), ids, torch.full_like(ids, -100))
    return {k: v.to(device) for k, v in out.items()}


# --- the two implementations behind one small interface ---------------------------------------------

def load(impl: str, ckpt: str, device: str, pack: bool = True):
    """impl: "hf", "ours", or "ours:int8" / "ours:int4" / "ours:nf4" (quantized while loading, int8 head copy).
    Ours with `pack`: the README's inference path, `from_pretrained(..., inference=True)`, whose layers
    pack themselves on CPU after packing.AFTER calls (the first-caption line measures that); with
    `pack="now"`, everything packed at once: the steady state of a long run, for the speed lines.
    Without: the plain model a training user gets."""
    if impl.startswith("ours"):
        from paligemma import PaliGemma, packing
        mode = impl.partition(":")[2] or None
        model = PaliGemma.from_pretrained(ckpt, dtype=torch.bfloat16, device=device, quantize=mode,
                                          inference=PACK and bool(pack)).eval()
        return packing.pack(model) if PACK and pack == "now" else model
    from transformers import PaliGemmaForConditionalGeneration
    return PaliGemmaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device).eval()


def generate(impl: str, model, batch: dict, new: int):
    b = {k: v for k, v in batch.items() if k != "labels"}
    if impl.startswith("ours"):
        return model.generate(**b, max_new_tokens=new, eos_id=-1)  # never stop early
    return model.generate(**b, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def add_lora(impl: str, model):
    """r=8, alpha=16 on every linear layer of both towers and the projector."""
    if impl.startswith("ours"):
        import lora
        lora.inject(model, "all", r=8, alpha=16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return model
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2", "gate_proj", "up_proj",
               "down_proj", "linear"]
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))


def train_step(impl: str, model, batch: dict, optimizer, device: str):
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        loss = model.loss(**batch) if impl.startswith("ours") else model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# --- one line, in this process ----------------------------------------------------------------------

def measure(impl: str, task: str, ckpt: str, device: str, reps: int, batch: int, checkpointing: bool,
            new: int = NEW) -> dict:
    torch.manual_seed(0)
    config = json.loads((Path(ckpt) / "config.json").read_text())
    if task == "load":
        import paligemma.weights  # noqa: F401  imports are not the load: count neither library's
        import transformers.models.paligemma.modeling_paligemma  # noqa: F401
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            model = load(impl, ckpt, device, pack=False)
            sync(device)
            seconds = time.perf_counter() - t0
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return dict(seconds=seconds, peak_bytes=mem.delta, model_bytes=nbytes)
    if task == "first_caption":  # what a user of the caption command feels: fresh process, load, one caption
        import paligemma.weights  # noqa: F401  (imports excluded, as for load)
        import transformers.models.paligemma.modeling_paligemma  # noqa: F401
        batch = inputs(config, 1, device=device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            generate(impl, load(impl, ckpt, device), batch, 20)  # ours: the inference path, as a user gets it
            sync(device)
            seconds = time.perf_counter() - t0
        return dict(seconds=seconds, peak_bytes=mem.delta)
    model = load(impl, ckpt, device, pack="now" if task != "train" else False)
    if task == "train":
        model = add_lora(impl, model).train()
        if checkpointing:
            if impl.startswith("ours"):
                model.set_gradient_checkpointing(True)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        data = inputs(config, batch, suffix=20, device=device)
        train_step(impl, model, data, optimizer, device)  # warm-up (and the optimizer's state)
        times = []
        with PeakMemory(device) as mem:
            for _ in range(reps):
                t0 = time.perf_counter()
                train_step(impl, model, data, optimizer, device)
                sync(device)
                times.append(time.perf_counter() - t0)
        return dict(seconds=statistics.median(times), peak_bytes=mem.peak, trainable=sum(p.numel() for p in params))
    data = inputs(config, batch, device=device)
    with torch.no_grad():
        generate(impl, model, data, 2)  # warm-up
        first, full = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            generate(impl, model, data, 1)
            sync(device)
            first.append(time.perf_counter() - t0)
            if task == "decode":
                t0 = time.perf_counter()
                generate(impl, model, data, new + 1)
                sync(device)
                full.append(time.perf_counter() - t0)
    if task == "prefill":
        return dict(seconds=statistics.median(first))
    step = (statistics.median(full) - statistics.median(first)) / new
    read = step_bytes(model) if impl.startswith("ours") else decoder_bytes(config)
    return dict(seconds=step, tokens_per_s=batch / step, decoder_bytes=read)


def decoder_bytes(config: dict) -> int:
    """What one decode step must read: every decoder weight (the tied head included) in bf16."""
    return 2 * sum(torch.Size(shape).numel() for k, shape in shapes(config).items() if k.startswith("language_model"))


def step_bytes(model) -> int:
    """What one decode step of our model reads, as it is stored: the decoder layers and the output head
    (a packed, int8 or int4 copy, else the embedding table); lookups read one row per token, not counted."""
    from paligemma.quantize import Int4Head, Int8Head
    lm = model.language_model
    tensors = list(lm.model.layers.state_dict().values()) + list(lm.model.norm.state_dict().values())
    head = lm.lm_head  # TiedHead or PackedHead: the bf16 table's bytes; Int8Head / Int4Head: its copy
    if isinstance(head, Int8Head):
        tensors += [head.int8(), head.scales]
    elif isinstance(head, Int4Head):
        tensors += [head.qweight, head.scales_and_zeros]
    else:
        tensors.append(lm.model.embed_tokens.weight)
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Bytes moved (read + write) per second by a large tensor copy: the memory system's practical limit."""
    n = int(gib * (1 << 30))
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best


# --- the driver: every line in fresh processes, then the table --------------------------------------

def run_line(impl, task, ckpt, device, reps, batch=1, checkpointing=False, new=NEW) -> dict:
    cmd = [sys.executable, __file__, "--one", impl, task, "--ckpt", ckpt, "--device", device, "--reps", str(reps),
           "--batch", str(batch), "--threads", str(torch.get_num_threads()), "--new", str(new)] \
        + (["--checkpointing"] if checkpointing else [])
    if task in ("load", "first_caption"):  # a fresh process per repetition: one-shot events
        runs = [json.loads(subprocess.run(cmd + ["--reps", "1"], capture_output=True, text=True, check=True,
                                          cwd=ROOT).stdout.strip().splitlines()[-1]) for _ in range(reps)]
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{impl} {task} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def gb(x):
    return f"{x / 1e9:.2f} GB"


def table(args) -> str:
    lines, rows = [], []
    limit = args.hbm * 1e9 if args.hbm else copy_bandwidth(args.device)

    def row(name, ours, hf, fmt, better_low=True, note=""):
        ratio = (hf / ours) if better_low else (ours / hf)  # > 1: ours is better
        rows.append(f"| {name} | {fmt(ours)} | {fmt(hf)} | {ratio:.2f}x | {note} |")

    o = run_line("ours", "load", args.ckpt, args.device, args.reps)
    h = run_line("hf", "load", args.ckpt, args.device, args.reps)
    row("load float32 files as bf16: wall time", o["seconds"], h["seconds"], lambda x: f"{x:.1f} s")
    row("load: peak memory", o["peak_bytes"], h["peak_bytes"], gb,
        note=f"model {gb(o['model_bytes'])}: ours {o['peak_bytes'] / o['model_bytes']:.2f}x, "
             f"transformers {h['peak_bytes'] / h['model_bytes']:.2f}x the model")
    for b in (1, 8):
        o = run_line("ours", "prefill", args.ckpt, args.device, args.reps, b)
        h = run_line("hf", "prefill", args.ckpt, args.device, args.reps, b)
        row(f"prefill (image + {PROMPT} tokens) + first token, batch {b}", o["seconds"], h["seconds"],
            lambda x: f"{x * 1000:.0f} ms")
    for b in (1, 8):
        o = run_line("ours", "decode", args.ckpt, args.device, args.reps, b)
        h = run_line("hf", "decode", args.ckpt, args.device, args.reps, b)
        note = ""
        if b == 1:
            bw = o["decoder_bytes"] / o["seconds"]
            note = (f"ours streams {bw / 1e9:.1f} GB/s of decoder weights ({gb(o['decoder_bytes'])}/token) = "
                    f"{bw / limit:.0%} of {'HBM' if args.hbm else 'measured copy'} bandwidth {limit / 1e9:.0f} GB/s; "
                    f"transformers {o['decoder_bytes'] / h['seconds'] / limit:.0%}")
        row(f"greedy decode, batch {b}", o["tokens_per_s"], h["tokens_per_s"], lambda x: f"{x:.2f} tok/s",
            better_low=False, note=note)
    train_ckpt = args.train_ckpt or args.ckpt
    for ckpt_on in (False, True):
        o = run_line("ours", "train", train_ckpt, args.device, args.reps, 4, ckpt_on)
        h = run_line("hf", "train", train_ckpt, args.device, args.reps, 4, ckpt_on)
        what = "with" if ckpt_on else "without"
        row(f"LoRA r=8 step, both towers, batch 4, {what} checkpointing: time", o["seconds"], h["seconds"],
            lambda x: f"{x:.2f} s", note=f"{o['trainable']:,} vs {h['trainable']:,} trainable")
        row(f"LoRA step {what} checkpointing: peak memory", o["peak_bytes"], h["peak_bytes"], gb)
    lines.append("| line | ours | transformers 5.24 (+ PEFT) | ours better by | note |")
    lines.append("|---|---:|---:|---:|---|")
    return "\n".join(lines + rows)


def quant_table(args) -> str:
    """Ours bf16 (packed) vs ours quantized, every line side by side; ratios against bf16."""
    impls = ["ours"] + [f"ours:{m}" for m in args.quantize]
    limit = args.hbm * 1e9 if args.hbm else copy_bandwidth(args.device)
    slow = {"ours:nf4": dict(reps=1, new=4)} if args.device == "cpu" else {}  # CPU NF4: dequantized per forward
    rows = []

    def row(name, results, fmt, note=lambda r: ""):
        base = results["ours"]
        cells = [f"{fmt(r)} ({r / base:.2f}x)" if i else fmt(r) for i, r in enumerate(results.values())]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {note(results)} |")

    def line(task, batch=1, key="seconds", ckpt=args.ckpt, checkpointing=False):
        out = {}
        for impl in impls:
            opts = dict(reps=args.reps, new=NEW) | (slow.get(impl, {}) if task in ("decode", "prefill") else {})
            out[impl] = run_line(impl, task, ckpt, args.device, opts["reps"], batch, checkpointing, opts["new"])
        return out

    r = line("load")
    row("load float32 files: wall time", {k: v["seconds"] for k, v in r.items()}, lambda x: f"{x:.1f} s")
    row("load: peak memory", {k: v["peak_bytes"] for k, v in r.items()}, gb,
        note=lambda _: "model: " + ", ".join(f"{k} {gb(v['model_bytes'])}" for k, v in r.items()))
    r = line("prefill", 1)
    row(f"prefill (image + {PROMPT} tokens) + first token, batch 1", {k: v["seconds"] for k, v in r.items()},
        lambda x: f"{x * 1000:.0f} ms")
    for b in (1, 8):
        r = line("decode", b)
        row(f"greedy decode, batch {b}", {k: v["tokens_per_s"] for k, v in r.items()}, lambda x: f"{x:.2f} tok/s",
            note=lambda res: "; ".join(
                f"{k} reads {gb(v['decoder_bytes'])}/step, {v['decoder_bytes'] / v['seconds'] / 1e9:.1f} GB/s = "
                f"{v['decoder_bytes'] / v['seconds'] / limit:.0%} of {limit / 1e9:.0f} GB/s" for k, v in r.items()) if b == 1 else "")
    train_ckpt = args.train_ckpt or args.ckpt
    for ckpt_on in (False, True):
        r = line("train", 4, ckpt=train_ckpt, checkpointing=ckpt_on)
        what = "with" if ckpt_on else "without"
        row(f"LoRA r=8 step, both towers, batch 4, {what} checkpointing: time", {k: v["seconds"] for k, v in r.items()},
            lambda x: f"{x:.2f} s")
        row(f"LoRA step {what} checkpointing: peak memory", {k: v["peak_bytes"] for k, v in r.items()}, gb)
    head = "| line | " + " | ".join(("ours bf16 (packed)" if i == "ours" else f"ours {i[5:]} (x bf16)") for i in impls)
    return "\n".join([head + " | note |", "|---|" + "---:|" * len(impls) + "---|"] + rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint for load / prefill / decode")
    p.add_argument("--train-ckpt", help="checkpoint for the LoRA step (default: --ckpt)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--hbm", type=float, help="GPU memory bandwidth limit in GB/s (instead of a measured copy)")
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.add_argument("--quantize", nargs="+", choices=["int8", "int4", "nf4"],
                   help="instead of the transformers table: ours bf16 vs ours quantized (NF4 on CPU: 1 rep, 4 steps)")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "TASK"), help=argparse.SUPPRESS)
    p.add_argument("--new", type=int, default=NEW, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(*args.one, args.ckpt, args.device, args.reps, args.batch, args.checkpointing, args.new)))
        return
    result = quant_table(args) if args.quantize else table(args)
    header = (f"`python benchmarks/bench.py --ckpt {args.ckpt}" + (f" --train-ckpt {args.train_ckpt}" if args.train_ckpt else "")
              + (f" --quantize {' '.join(args.quantize)}" if args.quantize else "")
              + f" --device {args.device}`: torch {torch.__version__}, {args.threads} threads, median of {args.reps}\n\n")
    print(header + result)
    if args.out:
        Path(args.out).write_text(header + result + "\n")


if __name__ == "__main__":
    main()
