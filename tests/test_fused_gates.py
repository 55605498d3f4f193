"""--compile-gates: the dense gates' block arithmetic as torch.compile'd kernels (`gates.FusedGates`).

The kernels compile on first use (a few seconds per dtype combination); the tests lower `min_entries` so
that tiny tensors take them, and share one set of kernels per stretch (`gates.fused_gates`)."""

import pytest
import torch

from diffprune import blocks, gates
from diffprune.config import DiffPruningConfig
from diffprune.model import DiffModel
from tests.test_gates import L, R, _leaves, _plain_gated_diff_and_l0
from tests.test_layers import _apply_setting, _assert_same_in_setting, _loss_and_grads, _model, _randomise


@pytest.fixture(scope="module")
def compiler():
    """torch.compile builds CPU kernels with a C++ compiler: without one these tests cannot run (the
    library then warns and runs the eager passes, tested below without it)."""
    try:
        torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(3))
    except Exception as exc:  # no compiler / unsupported platform
        pytest.skip(f"torch.compile cannot build kernels here: {type(exc).__name__}")


@pytest.fixture
def fused(monkeypatch, compiler):
    f = gates.fused_gates(L, R)
    monkeypatch.setattr(f, "min_entries", 0)
    monkeypatch.setattr(blocks, "CPU_BLOCK", 16)  # several blocks, a ragged last one
    return f


def _run(fn, theta, upstream, dtype, structured, recompute, fused_kernels):
    w, alpha, group = _leaves(theta.shape, dtype, structured, torch.Generator().manual_seed(4))
    cache = gates.ConcreteCache() if recompute else None
    if recompute:  # the recompute keeps its sample for the backward (`ConcreteCache`)
        with torch.no_grad():
            gates.gated_diff(theta, w, alpha, group, 21, L, R, cache, fill=True, fused=fused_kernels)
    out, expected = fn(theta, w, alpha, group, 21, L, R, "expected_l0", cache, fused_kernels)
    ((out.float() * upstream).sum() + 0.37 * expected).backward()
    return out.detach(), expected.detach(), w.grad, alpha.grad, group.grad if structured else None


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_gates_match_plain_autograd(structured, recompute, fused):
    """Values and gradients (w, alpha, the group logit; task loss and L0 term together) of the compiled
    forward and backward equal plain autograd's up to float rounding, from the noise or the kept sample."""
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(9, 7, generator=gen)
    upstream = torch.randn(9, 7, generator=gen)
    calls = {"forward": 0, "backward": 0}
    real = fused._run

    def counting(name, *args):
        calls[name] = calls.get(name, 0) + 1
        return real(name, *args)

    fused._run = counting
    try:
        got = _run(gates.gated_diff_and_l0, theta, upstream, torch.float32, structured, recompute, fused)
    finally:
        del fused._run
    ref = _run(lambda *a: _plain_gated_diff_and_l0(*a[:5]), theta, upstream, torch.float32, structured, False, None)
    assert calls["forward"] == (8 if recompute else 4) and calls["backward"] == 4  # 63 entries: 4 blocks
    assert fused.error is None
    for a, b in zip(got, ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_compiled_gates_bf16_state_and_theta(fused):
    """bf16 w and alpha (`--w-dtype bf16`, `--alpha-dtype bf16`) and a bf16 theta: outputs within a bf16
    step of plain autograd's, gradients in the parameters' dtype."""
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(8, 9, generator=gen).bfloat16()
    upstream = torch.randn(8, 9, generator=gen)
    got = _run(gates.gated_diff_and_l0, theta, upstream, torch.bfloat16, True, True, fused)
    ref = _run(gates.gated_diff_and_l0, theta, upstream, torch.bfloat16, True, True, None)  # the eager passes
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert fused.error is None
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * float(b.float().abs().max()))


def test_compiled_gates_extreme_logits_stay_finite(fused):
    """alpha far beyond exp's range (e^-alpha overflows or underflows in fp32): gates 0 or 1, P(z != 0) 0 or
    1, every value and gradient finite, as the eager passes give."""
    alpha = torch.tensor([-200.0, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0] * 3)
    res = []
    for kernels in (fused, None):
        a = alpha.clone().requires_grad_()
        w = torch.full_like(alpha, 0.5).requires_grad_()
        out, e = gates.gated_diff_and_l0(torch.zeros_like(alpha), w, a, None, 5, L, R, fused=kernels)
        (out.sum() + e).backward()
        res.append((out.detach(), e.detach(), w.grad, a.grad))
    for a, b in zip(*res):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    out = res[0][0].view(3, 7)
    assert (out[:, :3] == 0).all() and (out[:, 4:] == 0.5).all()  # closed gates; open ones times w = 0.5


def test_a_kernel_that_cannot_compile_falls_back_once_with_the_same_values(monkeypatch):
    """No compiler (or a backend torch.compile does not support): one warning naming the option, then the
    eager passes, bit for bit what a run without --compile-gates gives."""
    monkeypatch.setattr(blocks, "CPU_BLOCK", 16)

    def broken(*args):
        raise RuntimeError("InductorError: no C++ compiler found\nmore lines")

    f = gates.FusedGates(L, R)
    f.min_entries = 0
    f._kernels = {k: broken for k in f._kernels}
    gen = torch.Generator().manual_seed(3)
    theta, upstream = torch.randn(9, 7, generator=gen), torch.randn(9, 7, generator=gen)
    with pytest.warns(RuntimeWarning, match=r"--compile-gates.*no C\+\+ compiler found") as record:
        got = _run(gates.gated_diff_and_l0, theta, upstream, torch.float32, True, True, f)
    assert len(record) == 1 and f.error.startswith("RuntimeError") and not f.usable(1 << 20)
    ref = _run(gates.gated_diff_and_l0, theta, upstream, torch.float32, True, True, None)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("setting", ["plain", "recompute", "checkpointing", "bf16 alpha, expected_l0"])
def test_diff_model_with_compiled_gates_equals_eager(setting, monkeypatch, compiler):
    """A tiny BERT's dense L0 step (its embedding's looked-up rows and whole-tensor penalty included):
    the same loss and gradients with compile_gates as without, and the kernels did run."""
    monkeypatch.setattr(blocks, "CPU_BLOCK", 64)
    results = {}
    for compiled in (False, True):
        model, batch = _model("bert")
        dm = DiffModel(model, DiffPruningConfig(l0_lambda=1e-3, structured=True)).train()
        _randomise(dm)
        _apply_setting(dm, setting)
        dm.compile_gates = compiled
        assert dm.compile_gates == compiled
        if compiled:
            monkeypatch.setattr(dm._fused_gates, "min_entries", 0)
            calls = []
            real = dm._fused_gates._run
            monkeypatch.setattr(dm._fused_gates, "_run", lambda name, *a: calls.append(name) or real(name, *a))
        torch.manual_seed(7)
        results[compiled] = _loss_and_grads(dm, lambda: dm(**batch).loss)
    assert {"forward", "backward", "prob_sum", "penalty_grad"} <= set(calls)
    assert dm._fused_gates.error is None
    if not setting.startswith("bf16"):
        _assert_same_in_setting(results[True], results[False], setting)
        return
    # bf16 logits: within a bf16 step of each tensor's largest gradient, or 1e-9 (a key bias's gradient is
    # zero up to float noise, ~1e-13, whatever computes it)
    (loss_a, ga), (loss_b, gb) = results[True], results[False]
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and set(ga) == set(gb)
    for n in ga:
        tol = max(1e-2 * float(gb[n].float().abs().max()), 1e-9)
        torch.testing.assert_close(ga[n].float(), gb[n].float(), rtol=1e-2, atol=tol, msg=n)


def test_train_config_and_cli_turn_it_on():
    from diffprune.cli import build_parser
    from diffprune.methods import get_method
    from diffprune.training.config import TrainConfig
    from tests.tiny_models import tiny_bert

    args = build_parser().parse_args(["train", "--task", "sst2", "--output-dir", "x", "--compile-gates"])
    assert args.compile_gates is True
    cfg = TrainConfig(task="sst2", output_dir="x", compile_gates=True)
    for name, on in (("diff", True), ("structured", True), ("magnitude", False), ("bitfit", False)):
        dm = get_method(name).build(tiny_bert(), [], cfg)
        assert dm.compile_gates is on, name  # (no gates: nothing to compile)
    assert get_method("diff").build(tiny_bert(), [], TrainConfig(task="sst2", output_dir="x")).compile_gates is False


def test_penalty_kernels_keep_float64_logits_in_float64(fused):
    """An embedding's whole-tensor penalty (`GatedRows`) in float64: the kernels compute in alpha's dtype
    widened to fp32 at least, as the eager passes do, not in fp32 (which would be off by ~1e-7 relative)."""
    alpha = torch.randn(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    c = gates.log_ratio(L, R)
    ref = torch.sigmoid(alpha - c)
    assert abs(float(fused.prob_sum(alpha)) - float(ref.sum())) < 1e-10 * float(ref.sum())
    grad = torch.empty_like(alpha)
    pen = torch.tensor(0.37, dtype=torch.float64)
    fused.penalty_grad(alpha, pen, grad)
    torch.testing.assert_close(grad, 0.37 * ref * (1 - ref), rtol=1e-12, atol=1e-15)
