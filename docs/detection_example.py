"""The README's detection pictures: a tiny PaliGemma trained here to detect, then shown by the commands.

A random model writes no boxes, so this script first trains the tiny synthetic model (3 decoder layers,
64 px images, 8 x 8 patches; its tokenizer has the 1024 <loc> tokens) on the synthetic detection scenes
(`make_detection_dataset`: 1 to 3 objects of 16 px, kinds building / plane / tank), full fine-tuning for a
fixed number of steps, and scores it on the held-out scenes (mAP@0.5). Then it runs the two commands on
test scenes:

    python -m paligemma.caption --model CKPT --prompt "detect building ; plane ; tank" --draw DIR IMAGE ...
    python -m paligemma.probe   --model CKPT --prompt "detect building ; plane ; tank" --out DIR IMAGE

and writes OUT_DIR/detection-drawn.png (the first two drawings side by side) and OUT_DIR/probe-boxes.png
(the report page in headless Chromium at its first <loc> token).

    python docs/detection_example.py [OUT_DIR]        # minutes on 2 CPU cores; OUT_DIR default docs/
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from paligemma import PaliGemma, Processor
from paligemma.captioning.synthetic import make_checkpoint, make_detection_dataset
from paligemma.tasks import average_precision, parse_detections

STEPS, BATCH, LR = int(os.environ.get("STEPS", 1500)), 32, 2e-3  # STEPS=3 N_TRAIN=64: a smoke run
N_TRAIN = int(os.environ.get("N_TRAIN", 2000))
PROMPT = "detect building ; plane ; tank"


def rows(jsonl: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, jsonl.read_text().splitlines()) if r["split"] == split]


def train(model, processor, data: Path, train_rows: list[dict], seed: int = 0):
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    start = time.time()
    for step in range(STEPS):
        for g in opt.param_groups:  # linear warmup over 100 steps, then cosine to 10%
            g["lr"] = LR * min(1, (step + 1) / 100) * (0.55 + 0.45 * torch.cos(torch.tensor(step / STEPS * 3.1416)).item())
        batch = rng.sample(train_rows, BATCH)
        inputs = processor([data / "images" / r["image"] for r in batch], [r["prefix"] for r in batch],
                           [r["suffix"] for r in batch])
        loss = model.loss(**inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()


@torch.no_grad()
def test_map(model, processor, data: Path, test_rows: list[dict]) -> dict:
    preds, refs = [], []
    for i in range(0, len(test_rows), 32):
        chunk = test_rows[i:i + 32]
        inputs = processor([data / "images" / r["image"] for r in chunk], [r["prefix"] for r in chunk])
        texts = processor.batch_decode(model.generate(**inputs, max_new_tokens=24))
        preds += [parse_detections(t, 64, 64) for t in texts]
        refs += [parse_detections(r["suffix"], 64, 64) for r in chunk]
    return average_precision(preds, refs)


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="detect-example-"))
    data = make_detection_dataset(root / "data", n_train=N_TRAIN, n_val=0, n_test=100)
    train_rows, test_rows = rows(data, "train"), rows(data, "test")
    ckpt = make_checkpoint(root / "model", [r["suffix"] for r in train_rows[:200]], prompt=PROMPT, vocab_size=300,
                           task_tokens=True)
    model, processor = PaliGemma.from_pretrained(ckpt), Processor.from_pretrained(ckpt)
    before = test_map(model, processor, data.parent, test_rows)
    train(model, processor, data.parent, train_rows)
    after = test_map(model, processor, data.parent, test_rows)
    print(f"test mAP@0.5 {before['mAP@0.5']:.3f} -> {after['mAP@0.5']:.3f}, mAP {before['mAP']:.3f} -> {after['mAP']:.3f}")
    model.save_pretrained(root / "trained")
    (root / "trained" / "tokenizer.model").write_bytes((ckpt / "tokenizer.model").read_bytes())
    images = [str(data.parent / "images" / r["image"]) for r in test_rows[:4]]
    for r in test_rows[:4]:
        print(r["image"], "reference:", r["suffix"])
    cmd = [sys.executable, "-m", "paligemma.caption", "--model", str(root / "trained"), "--prompt", PROMPT,
           "--draw", str(root / "drawn"), *images]
    print("$ python", " ".join(cmd[1:]))
    print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    drawn = [Image.open(root / "drawn" / Path(p).name) for p in images[:2]]
    both = Image.new("RGB", (drawn[0].width + drawn[1].width + 8, max(d.height for d in drawn)), "white")
    both.paste(drawn[0], (0, 0))
    both.paste(drawn[1], (drawn[0].width + 8, 0))
    both.save(out / "detection-drawn.png")
    subprocess.run([sys.executable, "-m", "paligemma.probe", "--model", str(root / "trained"), "--prompt", PROMPT,
                    "--max-new-tokens", "40", "--out", str(root / "probe"), images[0]], check=True)
    page = next((root / "probe").glob("*/report.html"))
    summary = json.loads((page.parent / "probe.json").read_text())
    first = summary["loc_tokens"][0]["token"] if summary["loc_tokens"] else 0
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=1", "--window-size=1250,720", f"--screenshot={out / 'probe-boxes.png'}",
                    page.as_uri() + f"#token={first}"], check=True, capture_output=True)
    print("wrote", out / "detection-drawn.png", "and", out / "probe-boxes.png", "; run in", root)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
