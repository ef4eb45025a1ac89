"""Two pieces of benchmarks/gpu.sh: parity on the device under each SDPA kernel, and the report.

    python benchmarks/cuda_checks.py parity --ckpt DIR --device cuda --out parity.json
    python benchmarks/cuda_checks.py report --results DIR --out gpu.json      # gpu.sh's one JSON + README rows

parity: our logits against transformers' (eager attention, float32, on the same device, TF32 off)
on the checkpoint given (the small shape of checkpoint.py: head dims of 64, which the fused kernels
take) and on a tiny random PaliGemma 2 (soft-capped attention: our spelled-out kernel), for ours in
float32 and bf16 with torch's SDPA restricted to one kernel at a time (math, flash, memory-efficient,
cuDNN) and unrestricted. A kernel that cannot take our inputs (flash has no arbitrary mask; a
decoder prefix mask is one) is reported with torch's reason, not as a failure. Tolerance on the
relative error ||ours - theirs|| / ||theirs|| over real tokens: verify.py's (1e-4 float32, 5e-2 bf16).
"""
import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def kernels(device: str) -> dict:
    from torch.nn.attention import SDPBackend
    sets = {"default": None, "math": [SDPBackend.MATH], "flash": [SDPBackend.FLASH_ATTENTION]}
    if device.startswith("cuda"):
        sets.update({"memory-efficient": [SDPBackend.EFFICIENT_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION]})
    return sets


def parity_one(folder: str, device: str, config: dict) -> list[dict]:
    from torch.nn.attention import sdpa_kernel
    from transformers import PaliGemmaForConditionalGeneration
    from bench import inputs
    from paligemma import PaliGemma
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    data = inputs(config, 2, suffix=4, device=device)
    data.pop("labels")
    real = data["attention_mask"].bool()
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager",
                                                           dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        ref = hf(**data).logits[real].float()
    del hf
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        ours = PaliGemma.from_pretrained(folder, dtype=dtype, device=device).eval()
        for kernel, backends in kernels(device).items():
            row = dict(model=Path(folder).name, dtype=name, kernel=kernel)
            try:
                with torch.no_grad(), (sdpa_kernel(backends) if backends else contextlib.nullcontext()):
                    got = ours(**data)[real].float()
                err = float((got - ref).norm() / ref.norm())
                row.update(rel_error=err, argmax_agree=float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                           ok=err <= TOLERANCE[name])
            except RuntimeError as e:  # this kernel cannot take these inputs: torch says why
                row.update(unavailable=str(e).strip().splitlines()[0][:200])
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ours
    return rows


def parity(args):
    folders = [args.ckpt]
    with tempfile.TemporaryDirectory() as tmp:
        from tests.helpers import save_hf, tiny_hf_config
        folders.append(str(save_hf(tiny_hf_config("gemma2"), Path(tmp) / "tiny-pg2")))
        rows = []
        for folder in folders:
            config = json.loads((Path(folder) / "config.json").read_text())
            rows += parity_one(folder, args.device, config)
    failed = [r for r in rows if r.get("ok") is False]
    result = dict(device=args.device, rows=rows, failed=len(failed))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"parity: {len(failed)} of {sum('ok' in r for r in rows)} beyond tolerance", flush=True)
    return 1 if failed else 0


def read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"missing": f"{path.name}: {e}"}


def fp16_summary(metrics: Path) -> dict:
    """train.py --amp fp16's log: steps, first and last loss, the final loss scale and skipped steps."""
    try:
        steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    except (OSError, ValueError) as e:
        return {"missing": f"{metrics}: {e}"}
    if not steps:
        return {"missing": f"{metrics}: no steps logged"}
    return dict(steps=len(steps), first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"],
                scale=steps[-1].get("loss_scale"), skipped=steps[-1].get("skipped_steps"))


def report(args):
    """gpu.sh's results folder -> one JSON, and the README rows (Markdown) next to it."""
    d = Path(args.results)
    out = {name: read(d / f"{name}.json") for name in ("parity", "memory", "decode")}
    out["fp16"] = fp16_summary(d / "fp16-run" / "metrics.jsonl")
    out["versions"] = (d / "versions.txt").read_text().strip() if (d / "versions.txt").exists() else None
    out["timings"] = read(d / "timings.json")
    md = []
    p = out["parity"]
    if "rows" in p:
        md += ["| parity (rel. error vs transformers float32) | " + " | ".join(kernels(p["device"])) + " |",
               "|---|" + "---:|" * len(kernels(p["device"]))]
        for model in dict.fromkeys(r["model"] for r in p["rows"]):
            for dtype in ("float32", "bfloat16"):
                cells = [next((f"{r['rel_error']:.1e}" if "rel_error" in r else "n/a"
                               for r in p["rows"] if (r["model"], r["dtype"], r["kernel"]) == (model, dtype, k)), "-")
                         for k in kernels(p["device"])]
                md.append(f"| {model}, {dtype} | " + " | ".join(cells) + " |")
    m = out["memory"]
    if "rows" in m:
        fake = read(Path(args.fake)) if args.fake else {}
        fake_by = {(r["row"], r["checkpointing"]): r for r in fake.get("rows", []) if "peak_bytes" in r}
        md += ["", f"| recipe ({m['device']}) | trainable | step time | peak allocated | fake-tensor trace | "
                   "with --checkpointing: time | peak | trace |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        by = {(r["row"], r["checkpointing"]): r for r in m["rows"]}
        for row in dict.fromkeys(r["row"] for r in m["rows"]):
            cells = []
            for c in (False, True):
                r, f = by.get((row, c), {}), fake_by.get((row, c), {})
                cells += [f"{r['seconds_per_step']:.2f} s" if "seconds_per_step" in r else r.get("error", "-")[:30],
                          f"{r['peak_bytes'] / 1e9:.2f} GB" if "peak_bytes" in r else "-",
                          f"{f['peak_bytes'] / 1e9:.2f} GB" if f else "-"]
            trainable = by.get((row, False), {}).get("trainable")
            md.append(f"| {row} | {trainable / 1e6:.1f} M | " if trainable else f"| {row} | - | ")
            md[-1] += " | ".join(cells) + " |"
    if "markdown" in out["decode"]:
        md += ["", out["decode"]["markdown"]]
    f16 = out["fp16"]
    if "steps" in f16:
        md += ["", f"fp16 (train.py --amp fp16, demo model): {f16['steps']} steps, loss {f16['first_loss']:.3f} -> "
                   f"{f16['last_loss']:.3f}, loss scale {f16['scale']:g}, {f16['skipped']} skipped"]
    out["markdown"] = "\n".join(md)
    Path(args.out).write_text(json.dumps(out, indent=2))
    Path(args.out).with_suffix(".md").write_text(out["markdown"] + "\n")
    print(out["markdown"])
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("parity")
    a.add_argument("--ckpt", required=True)
    a.add_argument("--device", default="cuda")
    a.add_argument("--out", required=True)
    b = sub.add_parser("report")
    b.add_argument("--results", required=True, help="gpu.sh's output folder")
    b.add_argument("--fake", help="memory.py --method fake JSON to set beside the measured rows")
    b.add_argument("--out", required=True)
    args = p.parse_args()
    return parity(args) if args.cmd == "parity" else report(args)


if __name__ == "__main__":
    sys.exit(main())
