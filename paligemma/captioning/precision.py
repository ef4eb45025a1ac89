"""Mixed precision for the training loop, as one object: autocast, loss scaling, the optimizer step.

    precision = Precision("auto", device)          # bf16 where the device has it, else fp16
    with precision.autocast():
        loss = model.loss(**batch)
    precision.backward(loss)
    grad_norm, stepped = precision.step(optimizer, params, clip)

- "bf16": autocast to bfloat16. Its range is float32's, so gradients need no scaling.
- "fp16": autocast to float16, for cards without bf16 (T4, V100). float16's smallest normal value
  is 6e-5 and its largest 65504, so small gradients would flush to zero: the loss is multiplied by a
  scale before backward (torch.amp.GradScaler) and the gradients divided by it before clipping. A
  step whose gradients hold an inf or NaN (the scale was too large) is skipped and the scale halved;
  after 2000 good steps it doubles. Skipped steps are counted, and the scale and the count are part of
  the checkpoint, so a resumed run continues with the same scale.
- "none": float32 throughout.
- "auto": bf16 if the device computes in it, else fp16 (float32 on a CPU without bf16 kernels: the demo's
  step there took 0.15 s in float32, 1.51 in bf16, 1.74 in fp16); `note` says which was picked and why.

Where float32 is kept inside the model under float16 (the residual stream, the norms, the final
soft-cap): paligemma/gemma.py's docstring.
"""
import torch

MODES = ("bf16", "fp16", "none", "auto")


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively (emulation does not count: it is slower than fp16)."""
    if device.type == "cpu":  # where oneDNN has bf16 kernels (packing.bf16_packs); an AVX2-only CPU
        # emulates them: the demo's step took 1.51 s there against 0.15 s in float32
        from ..packing import bf16_packs
        return bf16_packs()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:  # mps and others: try the operation
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return bool(torch.isfinite(a @ a).all())
    except (RuntimeError, TypeError):
        return False


class Precision:
    def __init__(self, mode: str, device: str | torch.device):
        if mode not in MODES:
            raise ValueError(f"--amp {mode!r}: expected one of {', '.join(MODES)}")
        self.device = torch.device(device)
        self.note = f"--amp {mode}"
        if mode == "auto":  # a CPU without bf16 kernels is slower still in float16: float32 there
            mode = "bf16" if bf16_supported(self.device) else "none" if self.device.type == "cpu" else "fp16"
            why = {"bf16": "computes in bfloat16", "fp16": "has no bfloat16: float16 with loss scaling",
                   "none": "has no bfloat16 kernels (AVX2 only): float32"}[mode]
            self.note = f"--amp auto: {mode} ({self.device.type} {why})"
        self.mode = mode
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}[mode]
        # a GradScaler that is not enabled passes everything through: one code path for every mode
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mode == "fp16")
        self.skipped = 0  # steps the scaler skipped (inf / NaN gradients)

    @property
    def autocast_kwargs(self) -> dict:
        """torch.autocast(**these): for callers that open their own autocast (validation)."""
        return dict(device_type=self.device.type, dtype=self.dtype, enabled=self.mode != "none")

    def autocast(self):
        return torch.autocast(**self.autocast_kwargs)

    def backward(self, loss: torch.Tensor):
        self.scaler.scale(loss).backward()

    def step(self, optimizer, params, clip: float) -> tuple[torch.Tensor, bool]:
        """Unscale, clip to `clip`, step; returns (the gradient norm before clipping, whether the optimizer
        stepped). fp16: a non-finite gradient skips the step (counted) and lowers the scale. bf16 / none: a
        non-finite gradient does not step either (the caller decides what that means: train.py stops)."""
        self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        if not self.scaler.is_enabled():
            stepped = bool(torch.isfinite(grad_norm))
            if stepped:
                optimizer.step()
            return grad_norm, stepped
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # skipped when unscale_ found an inf / NaN
        self.scaler.update()  # halves the scale after a skipped step; grows it after growth_interval good ones
        stepped = self.scaler.get_scale() >= before
        self.skipped += not stepped
        return grad_norm, stepped

    @property
    def scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def metrics(self) -> dict:
        """What metrics.jsonl records per step: the loss scale and the skipped steps so far (fp16 only)."""
        return {"loss_scale": self.scale, "skipped_steps": self.skipped} if self.scaler.is_enabled() else {}

    def state_dict(self) -> dict:
        return {"mode": self.mode, "scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict | None):
        """Restore a checkpoint's scale and count. A checkpoint of another mode (or none) leaves the fresh
        state: a run that switches --amp starts the scaler anew."""
        if not state or state.get("mode") != self.mode:
            return
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = state["skipped"]
