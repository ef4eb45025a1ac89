"""The precision object train.py calls: float16 loss scaling (an inf gradient skips the step and halves
the scale, gradients reach the optimizer unscaled), --amp auto's choice, and a resumed fp16 run that
continues with the checkpoint's scale."""
import json

import pytest
import torch

from paligemma.captioning import precision as precision_module
from paligemma.captioning.precision import Precision
from tests.helpers import Crash, crash_after


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def backward(net, prec, x):
    with prec.autocast():
        loss = net(x).float().pow(2).mean()
    prec.backward(loss)
    return loss


def test_inf_gradient_skips_the_step_and_halves_the_scale():
    net, prec = tiny_net(), Precision("fp16", "cpu")
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=1.0)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    assert prec.scale == 65536.0  # GradScaler's initial 2^16
    backward(net, prec, x)
    params[0].grad[0, 0] = float("inf")  # what an overflowing float16 backward leaves
    before = [p.detach().clone() for p in params]
    norm, stepped = prec.step(opt, params, clip=1e9)
    assert not stepped and not torch.isfinite(norm)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # the weights did not move
    assert prec.scale == 32768.0 and prec.skipped == 1
    assert prec.metrics() == {"loss_scale": 32768.0, "skipped_steps": 1}
    opt.zero_grad()


def test_gradients_reach_the_optimizer_unscaled_and_clipped():
    """SGD with lr 1 moves each weight by minus its gradient: the float16-autocast gradient, scaled by
    65536 in backward, must arrive divided by it (compared with the same backward unscaled, in float32
    from the float16 graph) and clipped to the norm asked for."""
    net, prec = tiny_net(), Precision("fp16", "cpu")
    params = list(net.parameters())
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = net(x).float().pow(2).mean()
    want = torch.autograd.grad(loss, params)  # unscaled
    want_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in want]))
    before = [p.detach().clone() for p in params]
    backward(net, prec, x)
    norm, stepped = prec.step(torch.optim.SGD(params, lr=1.0), params, clip=0.5 * want_norm.item())
    assert stepped and prec.skipped == 0
    torch.testing.assert_close(norm, want_norm, rtol=1e-3, atol=0)
    for p, b, g in zip(params, before, want):
        torch.testing.assert_close(b - p, g * 0.5, rtol=2e-3, atol=1e-6)  # clipped to half the norm


def test_bf16_and_none_step_unless_the_gradient_is_non_finite():
    for mode in ("bf16", "none"):
        net, prec = tiny_net(), Precision(mode, "cpu")
        params = list(net.parameters())
        backward(net, prec, torch.randn(4, 8))
        params[1].grad[0] = float("nan")
        norm, stepped = prec.step(torch.optim.SGD(params, lr=1.0), params, clip=1.0)
        assert not stepped and prec.metrics() == {} and prec.scale is None


def test_auto_picks_bf16_where_supported_and_says_which(monkeypatch):
    monkeypatch.setattr(precision_module, "bf16_supported", lambda device: True)
    prec = Precision("auto", "cpu")
    assert prec.mode == "bf16" and prec.dtype == torch.bfloat16 and "bf16" in prec.note
    monkeypatch.setattr(precision_module, "bf16_supported", lambda device: False)
    prec = Precision("auto", "cpu")  # an AVX2-only CPU: emulated bf16 was 10x slower than float32
    assert prec.mode == "none" and prec.dtype == torch.float32 and not prec.scaler.is_enabled()
    assert "float32" in prec.note
    with pytest.warns(UserWarning):  # no CUDA here: the scaler says so and disables itself
        prec = Precision("auto", "cuda")  # a T4, say
    assert prec.mode == "fp16" and prec.dtype == torch.float16 and "float16" in prec.note
    with pytest.raises(ValueError, match="--amp 'fp8'"):
        Precision("fp8", "cpu")


def test_state_round_trip():
    prec = Precision("fp16", "cpu")
    net = tiny_net()
    params = list(net.parameters())
    backward(net, prec, torch.randn(4, 8))
    params[0].grad.fill_(float("inf"))
    prec.step(torch.optim.SGD(params, lr=1.0), params, clip=1.0)
    state = json.loads(json.dumps(prec.state_dict()))  # plain values: torch.load(weights_only=True) reads them
    again = Precision("fp16", "cpu")
    again.load_state_dict(state)
    assert again.scale == 32768.0 and again.skipped == 1
    other = Precision("bf16", "cpu")
    other.load_state_dict(state)  # another --amp: a fresh state, not an error
    assert other.scale is None and other.skipped == 0


def test_fp16_resume_restores_the_scale(tiny_run, tmp_path, monkeypatch):
    """train.py --amp fp16: step 2's gradient is made inf, so the scale halves and one step is skipped
    before the step-3 checkpoint; the resumed run must log the same scale and count as an
    uninterrupted one and end with the same weights."""
    import train
    model, data = tiny_run
    original, poison = Precision.step, {"calls": 0, "at": 2}

    def step(self, optimizer, params, clip):
        poison["calls"] += 1
        if poison["calls"] == poison["at"]:
            params[0].grad.fill_(float("inf"))
        return original(self, optimizer, params, clip)
    monkeypatch.setattr(Precision, "step", step)
    args = ["--model", model, "--data", data, "--batch-size", "8", "--eval-every", "100", "--eval-samples", "1",
            "--save-every", "3", "--lr", "1e-3", "--warmup", "2", "--steps", "5", "--amp", "fp16",
            "--finetune", "lora", "--lora", "all", "--lora-r", "4"]
    a = train.main(args + ["--out", str(tmp_path / "a")])
    poison["calls"] = 0
    with crash_after(train, 3), pytest.raises(Crash):
        train.main(args + ["--out", str(tmp_path / "b")])
    poison["calls"], poison["at"] = 0, None  # the resumed run starts at step 4: nothing injected
    b = train.main(args + ["--out", str(tmp_path / "b"), "--resume"])

    def logged(out):
        return [(r["step"], r["loss_scale"], r["skipped_steps"]) for r in map(json.loads, open(out / "metrics.jsonl"))
                if "loss" in r]
    la = logged(tmp_path / "a")
    assert la[1][1:] == (la[0][1] / 2, la[0][2] + 1)  # the injected step: skipped, scale halved
    assert logged(tmp_path / "b") == la
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
