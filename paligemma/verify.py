"""Check this implementation against transformers on your own checkpoint, stage by stage.

    python -m paligemma.verify MODEL [--image X] [--prompt P] [--dtype float32|bfloat16] [--adapter A]

Loads MODEL (a checkpoint folder or hub id) twice, here (as the commands load it: packed on CPU,
adapter applied) and as transformers' PaliGemmaForConditionalGeneration with eager attention (adapter
through PEFT), runs both on the same image and prompt, and prints one row per stage: SigLIP
embeddings, each SigLIP layer, post-layernorm, projector, merged embeddings, each decoder layer,
final norm, logits, then the greedy tokens. Errors are max |ours - theirs| and the relative error
||ours - theirs|| / ||theirs|| over the stage's tensor. Tolerance on the relative error: 1e-4 in
float32; 5e-2 in bfloat16, where both sides round every op to 8 bits of mantissa in different
orders (the residual stream drifts by ~1e-2 over a few layers; a wrong layer is off by far more).
Greedy tokens must all agree in float32; in bfloat16 the first must (later ones may part at near
ties). The first stage beyond tolerance is named and the exit status is 1.
"""
import argparse
import sys

import numpy as np
import torch

from .weights import to_transformers

TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def stages(config) -> list[tuple[str, str, str]]:
    """(stage, our module path, transformers' module path), in the order the forward reaches them."""
    def theirs(path):  # the table maps name prefixes, which end in a dot
        return to_transformers(path + ".")[:-1]
    vision = "vision_tower.vision_model."
    ours = [("siglip embeddings", vision + "embeddings")]
    ours += [(f"siglip layer {i}", vision + f"encoder.layers.{i}") for i in range(config.vision.num_hidden_layers)]
    ours += [("siglip post-layernorm", vision + "post_layernorm"), ("projector", "multi_modal_projector")]
    rows = [(stage, path, theirs(path)) for stage, path in ours]
    rows += [("merged embeddings", "hook_embed", theirs("language_model.model"))]  # theirs: the decoder's input
    rows += [(f"decoder layer {i}", f"language_model.model.layers.{i}", theirs(f"language_model.model.layers.{i}"))
             for i in range(config.text.num_hidden_layers)]
    rows += [("final norm", "language_model.model.norm", theirs("language_model.model.norm")),
             ("logits", "language_model.lm_head", None)]  # theirs: the output's logits (soft-capped there)
    return rows


def record(model, paths: dict) -> tuple[dict, list]:
    """Forward hooks that store each module's output (a decoder layer may return a tuple) under its
    stage name; the transformers decoder's *input* for the merged embeddings. -> (values, handles)."""
    values, handles, modules = {}, [], dict(model.named_modules())
    for stage, path in paths.items():
        if path is None:
            continue
        if stage == "merged embeddings" and path.startswith("model."):
            def before(m, args, kwargs, stage=stage):
                values[stage] = (kwargs.get("inputs_embeds") if "inputs_embeds" in kwargs else args[0]).detach()
            handles.append(modules[path].register_forward_pre_hook(before, with_kwargs=True))
        else:
            def after(m, args, out, stage=stage):
                values[stage] = (out[0] if isinstance(out, tuple) else out).detach()
            handles.append(modules[path].register_forward_hook(after))
    return values, handles


def demo_image(size: int = 224):
    """A fixed synthetic picture (colour ramps and a disc) for runs without --image."""
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05)
    rgb = np.stack([x, y, 1 - x * y], -1) * 0.7 + disc[..., None] * np.array([0.3, 0.1, -0.4])
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def compare(model: str, image=None, prompt: str = "caption en", dtype: str = "float32", adapter=None,
            max_new_tokens: int = 8) -> list[dict]:
    """-> one dict per stage: stage, shape, max_abs, rel, ok (and tokens for the greedy row)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("paligemma.verify compares against transformers, which is not installed: "
                         "pip install transformers") from None
    from transformers import PaliGemmaForConditionalGeneration
    from .cli import DTYPES
    from .inference import load_for_inference
    ours, processor = load_for_inference(model, adapter, dtype)
    theirs = PaliGemmaForConditionalGeneration.from_pretrained(model, attn_implementation="eager", dtype=DTYPES[dtype])
    if adapter:
        from peft import PeftModel
        theirs = PeftModel.from_pretrained(theirs, adapter).get_base_model()
    theirs.eval()
    inputs = processor([demo_image() if image is None else image], prompt)
    table = stages(ours.config)
    got, mine = record(ours, {s: o for s, o, _ in table})
    want, hf_handles = record(theirs, {s: t for s, _, t in table})
    try:
        with torch.no_grad():
            ours(**inputs)
            want["logits"] = theirs(**inputs).logits
    finally:
        for h in mine + hf_handles:
            h.remove()
    tol = TOLERANCE[dtype]
    rows = []
    for stage, _, _ in table:
        a, b = got[stage].float(), want[stage].float()
        if a.shape != b.shape:
            rows.append(dict(stage=stage, shape=f"{tuple(a.shape)} vs {tuple(b.shape)}", max_abs=float("inf"),
                             rel=float("inf"), ok=False))
            continue
        diff = (a - b).abs()
        rel = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-30))
        rows.append(dict(stage=stage, shape="x".join(map(str, a.shape)), max_abs=float(diff.max()), rel=rel,
                         ok=rel <= tol))
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        a = ours.generate(**inputs, max_new_tokens=max_new_tokens)[0].tolist()
        b = theirs.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, T:].tolist()
    eos = processor.tokenizer.eos_id
    a, b = (x[:x.index(eos) + 1] if eos in x else x for x in (a, b))  # what follows <eos> is padding
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    ok = a == b if dtype == "float32" else agree >= 1
    rows.append(dict(stage="greedy tokens", shape=str(len(b)), max_abs=None, rel=None, ok=ok,
                     tokens=(a, b), agree=agree))
    return rows


def main(argv=None):
    from .cli import POSITIVE, add_debug
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder or hub repo id (hub layout, with tokenizer.model)")
    p.add_argument("--image", help="image file (default: a fixed synthetic picture)")
    p.add_argument("--prompt", default="caption en", help="task prefix (default: caption en)")
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32", help="both models' dtype")
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT format), applied on both sides")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=8, help="greedy tokens compared")
    add_debug(p)
    args = p.parse_args(argv)
    rows = compare(args.model, args.image, args.prompt, args.dtype, args.adapter, args.max_new_tokens)
    tol = TOLERANCE[args.dtype]
    print(f"{'stage':<24} {'shape':<16} {'max abs err':>12} {'rel err':>10}   (tolerance: rel <= {tol:g}, {args.dtype})")
    for r in rows:
        if r["max_abs"] is None:
            a, b = r["tokens"]
            detail = f"{r['agree']} of {len(b)} equal" + ("" if r["ok"] else f": ours {a}, transformers {b}")
            print(f"{r['stage']:<24} {r['shape']:<16} {detail}   {'ok' if r['ok'] else 'BEYOND'}")
        else:
            print(f"{r['stage']:<24} {r['shape']:<16} {r['max_abs']:>12.3e} {r['rel']:>10.3e}   "
                  f"{'ok' if r['ok'] else 'BEYOND'}")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        first = bad[0]
        why = "" if first["rel"] is None else f" (relative error {first['rel']:.2e} > {tol:g})"
        print(f"FAIL: first stage beyond tolerance: {first['stage']}{why}")
        sys.exit(1)
    print(f"OK: every stage within tolerance ({args.dtype})")


if __name__ == "__main__":
    from .cli import run
    run(main, "paligemma.verify")
