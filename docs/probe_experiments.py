"""The README's three probe experiments on the embedded demo's model, and their figures.

    python train.py --out /tmp/probe-demo --steps 250          # the demo model (a few minutes on 2 cores)
    python docs/probe_experiments.py --run /tmp/probe-demo --out docs

1. knockout: the demo's 100 test images captioned while the caption (or all the text: <bos>, prompt
   and caption) may not attend to the image from layer k on; how often each fact of the scene (count,
   colour, kind, place, background) is still right.                        -> probe-knockout.png
2. patch sweep: two scenes that differ only in the objects' colour; the clean scene's activations
   restored one site, layer and token group at a time into the other's run, scored by the logit
   difference between the two colour words, with the caption written up to the colour.
                                                                            -> probe-sweep.png
3. attention shares: per layer, how the caption's tokens split their attention between the image,
   <bos>, the prompt and the caption so far (colour words, object words, the rest), over the test set.
                                                                            -> probe-shares.png
Prints the numbers behind each figure.
"""
import argparse
import csv
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paligemma import PaliGemma, Processor, probe  # noqa: E402
from paligemma.captioning.synthetic import BACKGROUNDS, COLOURS, KINDS, NUMBERS, PLACES, draw_object  # noqa: E402

PROMPT = "caption en"
FACTS = {"count": list(NUMBERS.values()), "colour": list(COLOURS), "kind": KINDS, "place": list(PLACES),
         "background": list(BACKGROUNDS)}


def facts(text: str) -> dict:
    """{fact: the first word of its vocabulary found in the caption, or None}."""
    found = {}
    for fact, words in FACTS.items():
        hits = [(text.find(w), w) for w in words if w in text]
        found[fact] = min(hits)[1] if hits else None
    return found


def test_set(run: Path):
    with open(run / "data" / "captions.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    return [run / "data" / "images" / r["image"] for r in rows], [facts(r["caption_1"]) for r in rows]


def captions(model, processor, images, block=None, layers=None, batch=25) -> list[str]:
    out = []
    for i in range(0, len(images), batch):
        inputs = processor(images[i:i + batch], PROMPT)
        if block is None:
            tokens = model.generate(**inputs, max_new_tokens=20)
        else:
            with probe.knockout(model, block, layers=layers):
                tokens = model.generate(**inputs, max_new_tokens=20)
        out += processor.batch_decode(tokens)
    return out


def knockout_experiment(model, processor, images, truth, out: Path):
    import matplotlib.pyplot as plt
    L = model.config.text.num_hidden_layers
    conditions = {"caption -> image": {"suffix": ["image"]},
                  "text (<bos>, prompt, caption) -> image": {"suffix": ["image"], "prompt": ["image"], "bos": ["image"]}}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True, constrained_layout=True)
    plain = captions(model, processor, images)
    for ax, (label, block) in zip(axes, conditions.items()):
        rows = {}
        for k in list(range(L)) + [L]:  # k = L: nothing blocked
            texts = plain if k == L else captions(model, processor, images, block, range(k, L))
            got = [facts(t) for t in texts]
            rows[k] = {f: float(np.mean([g[f] == t[f] for g, t in zip(got, truth)])) for f in FACTS}
            print(f"knockout {label}, from layer {k}{' (none)' if k == L else ''}: " +
                  ", ".join(f"{f} {a:.2f}" for f, a in rows[k].items()) + f"; e.g. {texts[0]!r}")
        for f in FACTS:
            ax.plot(list(rows), [rows[k][f] for k in rows], marker="o", label=f)
        ax.set_xticks(list(rows), [str(k) for k in range(L)] + ["none"])
        ax.set_xlabel("blocked from layer")
        ax.set_title(f"{label} blocked", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"fact right in the caption ({len(images)} test images)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.savefig(out / "probe-knockout.png", dpi=110)


def two_scenes(colours=("red", "white"), kind="plane", place="top left", background="field", n=2, size=64):
    """The same noisy background and object positions, drawn in two colours."""
    rng = random.Random(3)
    noise = np.random.default_rng(3).normal(0, 10, (size, size, 3))
    base = np.clip(np.array(BACKGROUNDS[background]) + noise, 0, 255).astype(np.uint8)
    half, s = size // 2, size // 8
    qx, qy = PLACES[place]
    slots = [(qx * half + 2 + i * (s + 3), qy * half + 2 + j * (s + 3)) for j in range(2) for i in range(2)]
    spots = [(x + rng.randint(0, 2), y + rng.randint(0, 2)) for x, y in rng.sample(slots, n)]
    images = []
    for c in colours:
        img = Image.fromarray(base.copy())
        for x, y in spots:
            draw_object(ImageDraw.Draw(img), kind, x, y, s, COLOURS[c])
        images.append(img)
    return images, (qx, qy)


def sweep_experiment(model, processor, out: Path):
    (red, white), (qx, qy) = two_scenes()
    tok = processor.tokenizer
    inputs = [processor([im], PROMPT) for im in (red, white)]
    clean_tokens = model.generate(**inputs[0], max_new_tokens=20)[0].tolist()
    text = processor.decode(clean_tokens)
    pieces = [tok.sp.id_to_piece(t).replace("\u2581", "") for t in clean_tokens]
    at = next(i for i, p in enumerate(pieces) if p in COLOURS)  # the colour word's position in the caption
    prefix = torch.tensor([clean_tokens[:at]])

    def with_prefix(x):
        return dict(x, input_ids=torch.cat([x["input_ids"], prefix], 1),
                    attention_mask=torch.cat([x["attention_mask"], torch.ones_like(prefix)], 1),
                    token_type_ids=torch.cat([x["token_type_ids"], torch.ones_like(prefix)], 1))

    clean, corrupted = with_prefix(inputs[0]), with_prefix(inputs[1])
    with torch.no_grad():
        other = int(model(**corrupted)[0, -1].argmax())
    target = (clean_tokens[at], other)
    words = [processor.decode([t]).strip() for t in target]
    print(f"sweep: clean caption {text!r}; after {processor.decode(clean_tokens[:at])!r} the clean scene's next "
          f"word is {words[0]!r}, the other scene's {words[1]!r}")
    side = model.config.vision.image_size // model.config.vision.patch_size
    grid = torch.arange(side * side).view(side, side)
    half = side // 2
    quadrant = grid[qy * half:(qy + 1) * half, qx * half:(qx + 1) * half].flatten().tolist()
    groups = probe.sweep_columns(model, clean)
    columns = {"image: objects' quarter": quadrant,
               "image: other quarters": [j for j in groups["image"] if j not in quadrant],
               "<bos>": groups["bos"], "prompt": groups["prompt"], "caption so far": groups["suffix"]}
    sites = ("resid_post", "attn_out", "mlp_out")
    sweep = probe.patch_sweep(model, clean, corrupted, target, sites=sites, positions=columns)
    for i, s in enumerate(sites):
        print(f"sweep {s}: " + "; ".join(f"layer {l}: " + " ".join(f"{v:.2f}" for v in sweep[i, l].tolist())
                                         for l in range(sweep.shape[1])))
    fig = probe.plot_sweep(sweep, sites, columns=columns, title=f"{words[0]} vs {words[1]}, after "
                           f"{processor.decode(clean_tokens[:at])!r}: restored logit difference")
    fig.savefig(out / "probe-sweep.png", dpi=110)
    each = probe.patch_sweep(model, clean, corrupted, target, sites=("resid_post",),
                             positions={str(j): [j] for j in groups["image"]})  # (1, L, side * side)
    best = each[0].max(-1).values
    print("sweep per image patch, resid_post, best patch per layer: " + " ".join(f"{v:.2f}" for v in best.tolist()))


def shares_experiment(model, processor, images, out: Path):
    import matplotlib.pyplot as plt
    L = model.config.text.num_hidden_layers
    tok = processor.tokenizer
    sums = {k: torch.zeros(L, 4) for k in ("colour word", "object word", "other words")}
    counts = dict.fromkeys(sums, 0)
    for i in range(0, len(images), 25):
        inputs = processor(images[i:i + 25], PROMPT)
        rec = probe.generate(model, **inputs, max_new_tokens=20, names=["*.self_attn.hook_pattern"])
        shares = rec.attention_shares(model)  # (B, n, L, 4)
        for b in range(shares.shape[0]):
            for t, token in enumerate(rec.tokens[b].tolist()):
                if token in (tok.eos_id, tok.pad_id):
                    break
                # token t was chosen at the position of token t - 1: classify the word being written
                p = tok.sp.id_to_piece(token).replace("\u2581", "")
                kind = "colour word" if p in COLOURS else "object word" if any(p.startswith(k) for k in KINDS) \
                    else "other words"
                sums[kind] += shares[b, t]
                counts[kind] += 1
    fig, axes = plt.subplots(1, L, figsize=(3 * L, 3.4), sharey=True, constrained_layout=True)
    colours = ["#e8a317", "#8e44ad", "#3b6fb6", "#2e9e6b"]
    names = ["image", "<bos>", "prompt", "caption so far"]
    for l, ax in enumerate(np.atleast_1d(axes)):
        bottom = np.zeros(len(sums))
        for g in range(4):
            v = np.array([sums[k][l, g].item() / counts[k] for k in sums])
            ax.bar(range(len(sums)), v, bottom=bottom, color=colours[g], label=names[g])
            bottom += v
        ax.set_xticks(range(len(sums)), list(sums), fontsize=8)
        ax.set_title(f"layer {l}", fontsize=10)
    np.atleast_1d(axes)[0].set_ylabel("share of the attention, heads averaged")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], fontsize=8, loc="outside right center")
    fig.suptitle(f"where the word being written looks ({sum(counts.values())} caption tokens, "
                 f"{len(images)} test images)", fontsize=10)
    fig.savefig(out / "probe-shares.png", dpi=110)
    for k in sums:
        print(f"shares of {k} ({counts[k]} tokens): " + "; ".join(
            f"layer {l}: " + " ".join(f"{n} {sums[k][l, g].item() / counts[k]:.3f}" for g, n in enumerate(names))
            for l in range(L)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the demo's run folder (train.py --out): final/ and data/")
    p.add_argument("--out", default=str(ROOT / "docs"), help="where the PNGs go")
    p.add_argument("--only", nargs="*", choices=["knockout", "sweep", "shares"], help="a subset")
    args = p.parse_args()
    torch.manual_seed(0)
    run, out = Path(args.run), Path(args.out)
    model = PaliGemma.from_pretrained(run / "final").requires_grad_(False)
    processor = Processor.from_pretrained(run / "final")
    images, truth = test_set(run)
    only = set(args.only or ["knockout", "sweep", "shares"])
    if "knockout" in only:
        knockout_experiment(model, processor, images, truth, out)
    if "sweep" in only:
        sweep_experiment(model, processor, out)
    if "shares" in only:
        shares_experiment(model, processor, images, out)


if __name__ == "__main__":
    main()
