"""Peak memory of a training step for each recipe of the README's table, measured, not estimated.

    python benchmarks/memory.py --method fake --out FILE.json                      # every row: 3B, all layers
    python benchmarks/memory.py --method real fake-cpu fake --text-layers 2 --vision-layers 2 --rows lora-decoder  # cross-check
    python benchmarks/memory.py --method real --device cuda --out FILE.json       # on a GPU (gpu.sh)

The step is train.py's: frozen weights in bf16 (`--dtype bfloat16`), what trains in float32 with
AdamW (its two moments), bf16 autocast, micro-batch 8 at 224 px (256 image tokens + 30 text tokens,
26 of them labels), measured at a step after the first, whose peak holds AdamW's state too (the
fake trace gives AdamW the state of its first step, adam_with_state; a real run takes two steps). The model is built on the meta device with train.py's own functions (make_trainable, the
quantizers, LoRA injection), then given storage:

- fake: every tensor a FakeTensor (shape, dtype and device, no storage, no arithmetic) and the step
  traced under torch.distributed._tools.mem_tracker.MemTracker (PeakTracker: its global peak only),
  which adds up the bytes of the live tensors as they come and go: parameters, buffers, gradients,
  optimizer states, activations saved for backward, temporaries. Seconds per row, no memory, at full
  size. The trace runs on fake CPU tensors (a CPU-only torch cannot give fake CUDA tensors an
  autograd graph: no CUDA device guard) with CUDA's kernel choices put in (cuda_kernels: float32
  layer_norm as CUDA's autocast does it, the memory-efficient SDPA kernel); `fake-cpu` traces with
  this machine's kernels instead, to set beside a real CPU step. Under fake tensors no value exists,
  so two data-dependent lines of `PaliGemma.loss` are replaced by their shape equivalents
  (`fake_loss`: the image features concatenated before the text instead of scattered into `<image>`
  slots, and the label positions sliced instead of boolean-indexed; same tensors, same sizes).
- real: the same step on real tensors. CUDA: torch.cuda.max_memory_allocated over two steps (tensors
  only: the CUDA context, about 0.5 GB, and the allocator's cached free blocks are not in it, see
  max_memory_reserved). CPU: the second step's tensors under the same PeakTracker (real values, real
  kernels, model.loss itself), and the process's resident high-water mark (VmHWM, reset before the
  steps) minus its resident memory before the model was built.
tests/test_memory.py checks fake_loss against model.loss, PeakTracker against MemTracker, the fake
trace against a real CPU step's tensors, and the dtypes of the CUDA emulation against CUDA's autocast.
"""
import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from checkpoint import hub_config  # noqa: E402

RECIPES = {  # the README's recipes table, in its order
    "lora-decoder": dict(lora="decoder"),
    "lora-all": dict(lora="all"),
    "lora-decoder+projector": dict(lora="decoder", train_modules=["multi_modal_projector"]),
    "full": dict(full=True),
    "qlora-nf4-decoder": dict(lora="decoder", quantize="nf4"),
    "qlora-int8-decoder": dict(lora="decoder", quantize="int8"),
    "qlora-nf4-all": dict(lora="all", quantize="nf4"),
}
BATCH, PROMPT, CAPTION = 8, 4, 26  # <bos> "caption en" "\n" + a caption of 25 tokens and <eos>


def build(config: dict, recipe: dict, checkpointing: bool):
    """The model train.py trains for `recipe`, on the meta device (no storage yet)."""
    from paligemma import PaliGemma, PaliGemmaConfig
    from paligemma.captioning.training import make_trainable
    from paligemma.quantize import quantize
    with torch.device("meta"):
        model = PaliGemma(PaliGemmaConfig.from_dict(config))
    model.to(torch.bfloat16).requires_grad_(False)  # from_pretrained(..., dtype=bfloat16)
    if recipe.get("quantize"):
        quantize(model, recipe["quantize"])
    make_trainable(model, recipe.get("full", False), lora_targets=recipe.get("lora", "all"), r=8, alpha=16,
                   train_modules=recipe.get("train_modules", []))
    model.set_gradient_checkpointing(checkpointing)
    return model.train()


def materialise(model: nn.Module, device: str, fill: bool):
    """Storage for every meta tensor: torch.empty (a FakeTensor under FakeTensorMode), then, for a real
    step, small random values (float) or zeros (codes, indices: valid everywhere). LoRA's B starts at 0."""
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is None:
                    continue
                new = torch.empty(t.shape, dtype=t.dtype, device=device)
                if fill:
                    new.normal_(0, 0.02) if new.is_floating_point() else new.zero_()
                store[k] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    if fill:
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.data.zero_()
    return model


def batch(config: dict, device: str) -> dict:
    """(B, T) ids in PaliGemma's layout: 256 <image>, <bos> + prompt, caption (+ <eos>) as labels.
    Built by concatenation, not item assignment: a fake CUDA tensor on a CPU-only torch cannot be
    written into (no CUDA device guard)."""
    size = config["vision_config"].get("image_size", 224)
    n_img = (size // config["vision_config"]["patch_size"]) ** 2
    full = lambda n, value: torch.full((BATCH, n), value, device=device)  # noqa: E731
    ids = torch.cat([full(n_img, config["image_token_index"]), full(PROMPT + CAPTION, 5)], 1)
    types = torch.cat([full(n_img + PROMPT, 0), full(CAPTION, 1)], 1)
    labels = torch.cat([full(n_img + PROMPT, -100), full(CAPTION, 5)], 1)
    return dict(input_ids=ids, pixel_values=torch.zeros(BATCH, 3, size, size, device=device),
                attention_mask=torch.ones_like(ids), token_type_ids=types, labels=labels)


def fake_loss(model, input_ids, pixel_values, attention_mask, token_type_ids, labels) -> torch.Tensor:
    """model.loss for the batch above without reading a value: its <image> tokens come first and its
    labels are the last CAPTION positions, so the merge is a concatenation and the label selection a
    slice (the same tensors and sizes as masked_scatter and boolean indexing)."""
    n_img = model.config.num_image_tokens
    text = model.language_model.model.embed(input_ids[:, n_img:])  # (B, T - N, D)
    x = torch.cat([model.image_features(pixel_values).to(text.dtype), text], 1)
    h = model.hidden_states(inputs_embeds=x, attention_mask=attention_mask, token_type_ids=token_type_ids)
    D = h.shape[-1]
    logits = model.language_model.logits(h[:, -CAPTION - 1:-1].reshape(-1, D)).float()  # (B * CAPTION, V)
    return F.cross_entropy(logits, labels[:, -CAPTION:].reshape(-1))


@contextlib.contextmanager
def unheard():
    """MemTracker listens to every module through global hooks, which would make every HookPoint
    `listened` and the attention spell out its probabilities for them: a training step never does."""
    from paligemma.hookpoint import HookPoint
    listened = HookPoint.listened
    HookPoint.listened = property(lambda self: False)
    try:
        yield
    finally:
        HookPoint.listened = listened


def steps(model, data: dict, device: str, fake: bool, n: int = 2, optimizer=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), fused=device.startswith("cuda"))
    loss_fn = (lambda **b: fake_loss(model, **b)) if fake else model.loss
    for _ in range(n):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = loss_fn(**data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, sum(p.numel() for p in params)


@contextlib.contextmanager
def cuda_kernels():
    """What the same step runs on CUDA, for a trace on fake CPU tensors (a CPU-only torch cannot give
    fake CUDA tensors an autograd graph: no CUDA device guard). Two things differ, found by replaying
    every call of the forward on fake CUDA tensors under CUDA's autocast (tests/test_memory.py):
    - layer_norm: CUDA's autocast runs it in float32 (its inputs cast up, its output float32); CPU's
      keeps bf16. SigLIP's LayerNorms, so the vision tower saves float32 copies where it trains.
    - attention: CUDA's SDPA takes the memory-efficient kernel for a masked call (flash takes no
      mask): the boolean mask becomes an additive bf16 bias (its last axis padded to 16), the output
      and a float32 log-sum-exp are saved, never the T x T probabilities. CPU's own fused kernel (what
      the CPU trace and a real CPU step run) saves the same, without the bias.
    Everything else (matmuls in bf16, softmax / RMSNorm / cross-entropy in float32) is the same."""
    sdpa, layer_norm = F.scaled_dot_product_attention, F.layer_norm

    def efficient(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        B, H, T, _ = q.shape
        S = k.shape[2]
        if torch.is_autocast_enabled(q.device.type):  # SDPA is in autocast's lower-precision list
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k, v = k.expand(B, H, S, -1), v.expand(B, H, S, -1)  # MQA / GQA taken natively: views, no copy
        bias = None
        if attn_mask is not None:
            bias = torch.where(attn_mask, 0.0, float("-inf")).to(q.dtype) if attn_mask.dtype == torch.bool else attn_mask
            bias = F.pad(bias, (0, -S % 16))[..., :S].expand(B, H, T, S)  # (B, H, T, S) view of (B, 1, T, S16)
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, dropout_p, is_causal, scale=scale)[0]

    def float32_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled(x.device.type):
            return layer_norm(x, shape, weight, bias, eps)
        with torch.autocast(x.device.type, enabled=False):
            return layer_norm(x.float(), shape, None if weight is None else weight.float(),
                              None if bias is None else bias.float(), eps)
    F.scaled_dot_product_attention, F.layer_norm = efficient, float32_layer_norm
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.layer_norm = sdpa, layer_norm


def autocast_differences(config: dict, recipe: dict, kernels: str) -> set[str]:
    """The functions of the forward whose output dtypes differ between CPU's and CUDA's bf16 autocast:
    the forward runs on fake CPU tensors, logged call by call, and each distinct call is replayed on
    fake CUDA tensors of the same shapes and dtypes under CUDA's autocast (a fake CUDA forward needs no
    device guard, except indexing, which autocast does not touch). With kernels "cuda" (cuda_kernels)
    nothing should differ: the trace then computes in CUDA's dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_flatten, tree_map
    calls = []

    class Log(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            calls.append((func, args, kwargs or {}, out))
            return out

    def dtypes(tree):
        return [t.dtype for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]

    def on_cuda(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda") if isinstance(t, torch.Tensor) else t

    available = torch.cuda.amp.common.amp_definitely_not_available, torch.cuda.is_bf16_supported
    torch.cuda.amp.common.amp_definitely_not_available = lambda: False  # let CUDA's autocast run without CUDA
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    model = build(config, recipe, checkpointing=False)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), cuda_kernels() if kernels == "cuda" else contextlib.nullcontext():
            materialise(model, "cpu", fill=False)
            data = batch(config, "cpu")
            with torch.no_grad(), unheard(), torch.autocast("cpu", dtype=torch.bfloat16), Log():
                fake_loss(model, **data)
            differ, seen = set(), set()
            for func, args, kwargs, out in calls:
                name = getattr(func, "__name__", str(func))
                key = (name, tuple(map(str, dtypes((args, kwargs)))))
                if key in seen or name == "__getitem__":
                    continue
                seen.add(key)
                cargs, ckwargs = tree_map(on_cuda, (args, kwargs))
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    if dtypes(func(*cargs, **ckwargs)) != dtypes(out):
                        differ.add(name)
    finally:
        torch.cuda.amp.common.amp_definitely_not_available, torch.cuda.is_bf16_supported = available
    return differ


def adam_with_state(params: list) -> torch.optim.AdamW:
    """steps()'s AdamW with the state its first step creates (what a real second step starts from):
    a float32 step count and two moments shaped like each parameter. Saves tracing a first step."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98))
    for p in params:
        optimizer.state[p] = dict(step=torch.tensor(1.0), exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                  exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
    return optimizer


class _NoHook:
    def remove(self):
        pass


def peak_tracker():
    """MemTracker, keeping only the step's global peak. Its per-module peaks cost a pass over every
    module (thousands at 3B, with LoRA's and the hook points) at every operator: most of a 3B trace's
    time. The global peak is computed exactly as MemTracker computes it."""
    from copy import deepcopy
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(snap)
    return PeakTracker()


def measure_fake(config: dict, recipe: dict, checkpointing: bool, kernels: str = "cuda") -> dict:
    """kernels "cuda": the step as CUDA runs it (cuda_kernels); "cpu": as this machine runs it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = build(config, recipe, checkpointing)
    # non-fake inputs allowed: module-level constants (NF4's code table) become fakes as they are read
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_kernels() if kernels == "cuda" else contextlib.nullcontext():
        materialise(model, "cpu", fill=False)
        data = batch(config, "cpu")
        per_kind, trainable = tracked_steps(model, data, "cpu", fake=True, optimizer=adam_with_state(
            [p for p in model.parameters() if p.requires_grad]))  # a step after the first: with AdamW's state
    return dict(peak_bytes=per_kind.pop("Total"), by_kind=per_kind, trainable=trainable)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def high_water_mark() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))


def tracked_steps(model, data: dict, device: str, fake: bool, optimizer) -> tuple[dict, int]:
    """One step under PeakTracker -> ({kind: bytes at the peak, "Total": ...}, trainable count)."""
    tracker = peak_tracker()
    for p in model.parameters():  # MemTracker hooks every parameter's gradient; frozen ones cannot take a hook
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    tracker.track_external(model, optimizer)
    with tracker, unheard():
        _, trainable = steps(model, data, device, fake=fake, n=1, optimizer=optimizer)
    return dict(next(iter(tracker.get_tracker_snapshot("peak").values()))), trainable


def measure_real(config: dict, recipe: dict, checkpointing: bool, device: str) -> dict:
    """Two real steps. CUDA: torch.cuda.max_memory_allocated over both. CPU: the second step's tensors
    under the same PeakTracker as the fake trace (real values, real kernels, model.loss itself), and
    the process's resident high-water mark over both steps (tensors + the allocator's and oneDNN's
    overheads)."""
    cuda = device.startswith("cuda")
    base = torch.cuda.memory_allocated() if cuda else rss()
    model = materialise(build(config, recipe, checkpointing), device, fill=True)
    data = batch(config, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    t0 = time.perf_counter()
    if cuda:
        _, trainable = steps(model, data, device, fake=False)
        torch.cuda.synchronize()
        return dict(trainable=trainable, seconds_per_step=(time.perf_counter() - t0) / 2,
                    peak_bytes=torch.cuda.max_memory_allocated() - base, reserved_bytes=torch.cuda.max_memory_reserved())
    optimizer, _ = steps(model, data, device, fake=False, n=1)
    seconds = time.perf_counter() - t0
    per_kind, trainable = tracked_steps(model, data, device, fake=False, optimizer=optimizer)
    return dict(trainable=trainable, seconds_per_step=seconds, peak_bytes=per_kind.pop("Total"), by_kind=per_kind,
                rss_peak_bytes=high_water_mark() - base)


def one(args) -> dict:
    config = hub_config("small" if args.small else "3b", args.text_layers, args.vision_layers)
    recipe, checkpointing = RECIPES[args.one[0]], args.one[1] == "ckpt"
    torch.set_num_threads(args.threads)
    if args.one[2].startswith("fake"):  # fake: CUDA's kernels; fake-cpu: this machine's
        return measure_fake(config, recipe, checkpointing, "cpu" if args.one[2] == "fake-cpu" else "cuda")
    return measure_real(config, recipe, checkpointing, args.device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", choices=["fake", "fake-cpu", "real"], default=["fake"],
                   help="fake: traced with CUDA's kernels; fake-cpu: with this CPU's (to set beside real on a CPU)")
    p.add_argument("--device", default="cpu", help="for --method real")
    p.add_argument("--rows", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--text-layers", type=int, help="default: the hub config's (all)")
    p.add_argument("--vision-layers", type=int)
    p.add_argument("--small", action="store_true", help="the small shape of checkpoint.py (for a quick run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results (JSON) here, row by row as they are measured")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    import subprocess
    results = dict(device=args.device, torch=torch.__version__, text_layers=args.text_layers,
                   vision_layers=args.vision_layers, small=args.small, batch=BATCH, rows=[])
    for row in args.rows:
        for ckpt in args.checkpointing:
            for method in args.method:
                cmd = [sys.executable, __file__, "--one", row, "ckpt" if ckpt == "on" else "plain", method,
                       "--device", args.device, "--threads", str(args.threads)]
                cmd += ["--text-layers", str(args.text_layers)] if args.text_layers else []
                cmd += ["--vision-layers", str(args.vision_layers)] if args.vision_layers else []
                cmd += ["--small"] if args.small else []
                t0 = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # a fresh process per line
                if proc.returncode:
                    r = dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
                else:
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                r.update(row=row, checkpointing=ckpt == "on", method=method, wall_s=time.time() - t0)
                results["rows"].append(r)
                print(json.dumps(r), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    by = {(r["row"], r["checkpointing"], r["method"]): r for r in results["rows"]}
    methods = sorted({r["method"] for r in results["rows"]})
    lines = ["| recipe | trainable | " + " | ".join(f"{m}, {c}" for c in ("without ckpt", "with ckpt") for m in methods)
             + " |", "|---|---:|" + "---:|" * (2 * len(methods))]
    for row in dict.fromkeys(r["row"] for r in results["rows"]):
        cells, trainable = [], None
        for c in (False, True):
            for m in methods:
                r = by.get((row, c, m), {})
                trainable = trainable or r.get("trainable")
                cells.append(f"{r['peak_bytes'] / 1e9:.2f} GB" if "peak_bytes" in r else r.get("error", "-")[:40])
        lines.append(f"| {row} | {trainable / 1e6:.1f} M | " if trainable else f"| {row} | - | ")
        lines[-1] += " | ".join(cells) + " |"
    return "\n".join(lines)


if __name__ == "__main__":
    main()
