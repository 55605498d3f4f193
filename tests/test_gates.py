import math

import pytest
import torch

from diffprune import blocks, gates

L, R = -1.5, 1.5


def test_monte_carlo_nonzero_probability_matches_closed_form():
    alpha = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 5.0], dtype=torch.float64)
    n = 200_000
    z = gates.sample_gate(alpha.expand(n, -1).contiguous(), L, R, seed=123)
    mc = (z != 0).double().mean(0)
    closed = gates.prob_nonzero(alpha, L, R)
    assert torch.allclose(mc, closed, atol=4e-3), (mc, closed)
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    # exact zeros and ones both occur (the stretch makes them reachable)
    assert bool((z == 0).any()) and bool((z == 1).any())


def test_closed_form_uses_stretch_ratio():
    alpha = torch.tensor([0.3])
    assert torch.allclose(gates.prob_nonzero(alpha, -1.0, 2.0), torch.sigmoid(alpha - math.log(0.5)))


def test_deterministic_gate_values():
    alpha = torch.tensor([-10.0, 0.0, 10.0])
    assert gates.deterministic_gate(alpha, L, R).tolist() == [0.0, 0.0, 1.0]


def test_same_seed_same_sample_different_seed_different():
    alpha = torch.zeros(1000)
    a, b, c = (gates.sample_gate(alpha, L, R, s) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _well_inside(alpha, seed, eps=1e-3):
    s = gates._concrete(alpha, L, R, seed)
    s_bar = s * (R - L) + L
    return not bool(((s_bar.abs() < eps) | ((s_bar - 1).abs() < eps)).any())


@pytest.mark.parametrize("structured", [False, True])
def test_gated_diff_gradients_match_finite_differences(structured):
    torch.manual_seed(0)
    seed = 11
    while True:  # pick logits whose gates are not within eps of a clamp kink (where FD is undefined)
        alpha = (torch.randn(5, 4, dtype=torch.float64) * 1.5).requires_grad_()
        if _well_inside(alpha.detach(), seed):
            break
    theta = torch.randn(5, 4, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    group = torch.tensor(0.4, dtype=torch.float64, requires_grad=True) if structured else None
    if structured:
        assert _well_inside(group.detach(), seed + 1_000_003)
    inputs = (w, alpha) + ((group,) if structured else ())

    def f(*args):
        return gates.gated_diff(theta, args[0], args[1], args[2] if structured else None, seed, L, R)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_gated_diff_matches_plain_autograd():
    """The memory-lean backward equals autograd through the plain formula, sample for sample."""
    torch.manual_seed(1)
    theta = torch.randn(50, 30)
    w = torch.randn(50, 30, requires_grad=True)
    alpha = torch.randn(50, 30, requires_grad=True)
    group = torch.tensor(1.0, requires_grad=True)
    out = gates.gated_diff(theta, w, alpha, group, 5, L, R)
    g = torch.randn_like(out)
    out.backward(g)
    got = (w.grad.clone(), alpha.grad.clone(), group.grad.clone())
    for p in (w, alpha, group):
        p.grad = None
    u = gates._uniform(alpha.shape, 5, alpha.device, alpha.dtype)
    ug = gates._uniform(group.shape, 5 + 1_000_003, group.device, group.dtype)
    z = (torch.sigmoid(torch.logit(u) + alpha) * (R - L) + L).clamp(0, 1)
    zg = (torch.sigmoid(torch.logit(ug) + group) * (R - L) + L).clamp(0, 1)
    ref = theta + z * zg * w
    assert torch.allclose(ref, out.detach(), atol=1e-6)
    ref.backward(g)
    for a, b in zip(got, (w.grad, alpha.grad, group.grad)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_expected_nonzeros_value_and_gradient():
    alpha = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    group = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    got = gates.expected_nonzeros(alpha, group, L, R)
    assert torch.allclose(got, torch.sigmoid(alpha).sum() * torch.sigmoid(group))
    assert torch.autograd.gradcheck(lambda a, g: gates.expected_nonzeros(a, g, L, R), (alpha, group))


# ---- the blocked, fused path (gates.gated_diff_and_l0) against plain autograd ------------------------
def _plain_gated_diff_and_l0(theta, w, alpha, group, seed):
    """theta + z * z_g * w and sum_i P(z_i != 0) * P(z_g != 0) through ordinary autograd ops."""
    u = gates._uniform(alpha.shape, seed, alpha.device, alpha.dtype)
    z = (torch.sigmoid(torch.logit(u) + alpha) * (R - L) + L).clamp(0, 1)
    d = z * w
    expected = torch.sigmoid(alpha - math.log(-L / R)).sum()
    if group is not None:
        ug = gates._uniform(group.shape, seed + 1_000_003, group.device, group.dtype)
        d = d * (torch.sigmoid(torch.logit(ug) + group) * (R - L) + L).clamp(0, 1)
        expected = expected * torch.sigmoid(group - math.log(-L / R))
    return theta + d.to(theta.dtype), expected


def _leaves(shape, dtype, structured, gen):
    w = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1).to(dtype).requires_grad_()
    alpha = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_()
    group = torch.tensor(0.3, dtype=dtype, requires_grad=True) if structured else None
    return w, alpha, group


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [7, 1 << 17])  # many blocks with a ragged last one; one block
def test_blocked_fused_path_matches_plain_autograd(structured, dtype, block, monkeypatch):
    """Values and gradients (w, alpha, alpha_group; task loss and L0 term together) equal plain autograd."""
    monkeypatch.setattr(blocks, "CPU_BLOCK", block)
    gen = torch.Generator().manual_seed(3)
    shape = (9, 5)
    theta = torch.randn(shape, generator=gen, dtype=dtype)
    upstream = torch.randn(shape, generator=gen, dtype=dtype)
    lam = 0.37
    results = []
    for fn in (gates.gated_diff_and_l0, lambda *a: _plain_gated_diff_and_l0(*a[:5])):
        w, alpha, group = _leaves(shape, dtype, structured, torch.Generator().manual_seed(4))
        out, expected = fn(theta, w, alpha, group, 21, L, R)
        ((out * upstream).sum() + lam * expected).backward()
        results.append((out.detach(), expected.detach(), w.grad, alpha.grad, group.grad if structured else None))
    (out, e, gw, ga, gg), (ref_out, ref_e, ref_gw, ref_ga, ref_gg) = results
    assert torch.equal(out, ref_out)  # the forward is bit-identical: same noise, same ops
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert torch.allclose(e, ref_e, **tol)
    assert torch.allclose(gw, ref_gw, **tol)
    assert torch.allclose(ga, ref_ga, **tol)
    if structured:
        assert torch.allclose(gg, ref_gg, **tol)
    # all three gate regimes occur (z == 0, 0 < z < 1, z == 1), so every branch is exercised
    alpha = _leaves(shape, dtype, structured, torch.Generator().manual_seed(4))[1].detach()
    z = gates.sample_gate(alpha, L, R, 21)
    assert bool((z == 0).any()) and bool(((z > 0) & (z < 1)).any()) and bool((z == 1).any())


@pytest.mark.parametrize("use", ["output", "l0"])
def test_fused_path_with_one_output_unused(use, monkeypatch):
    monkeypatch.setattr(blocks, "CPU_BLOCK", 8)
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(6, 7, generator=gen)
    grads = []
    for fn in (gates.gated_diff_and_l0, lambda *a: _plain_gated_diff_and_l0(*a[:5])):
        w, alpha, group = _leaves((6, 7), torch.float32, True, torch.Generator().manual_seed(6))
        out, expected = fn(theta, w, alpha, group, 3, L, R)
        (out.sum() if use == "output" else expected).backward()
        grads.append((w.grad, alpha.grad, group.grad))
    for a, b in zip(*grads):
        assert (a is None) == (b is None)  # through the L0 term alone no gradient reaches w
        if b is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_path_low_precision_theta_matches_plain(monkeypatch):
    """theta in bfloat16, diff state in float32: theta + delta.to(bf16), gradients in float32."""
    monkeypatch.setattr(blocks, "CPU_BLOCK", 16)
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(8, 5, generator=gen).to(torch.bfloat16)
    upstream = torch.randn(8, 5, generator=gen).to(torch.bfloat16)
    res = []
    for fn in (gates.gated_diff_and_l0, lambda *a: _plain_gated_diff_and_l0(*a[:5])):
        w, alpha, group = _leaves((8, 5), torch.float32, False, torch.Generator().manual_seed(8))
        out, expected = fn(theta, w, alpha, group, 9, L, R)
        assert out.dtype == torch.bfloat16
        ((out * upstream).float().sum() + 0.1 * expected).backward()
        res.append((out.detach(), w.grad, alpha.grad))
    assert torch.equal(res[0][0], res[1][0])
    for a, b in zip(res[0][1:], res[1][1:]):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_l0_term_equals_expected_nonzeros():
    gen = torch.Generator().manual_seed(9)
    alpha = torch.randn(300, 70, generator=gen) * 3
    group = torch.tensor(-0.4)
    _, e = gates.gated_diff_and_l0(torch.zeros(300, 70), torch.zeros(300, 70), alpha, group, 1, L, R)
    assert torch.allclose(e, gates.expected_nonzeros(alpha, group, L, R), rtol=1e-6)


def test_gated_diff_and_l0_gradcheck(monkeypatch):
    monkeypatch.setattr(blocks, "CPU_BLOCK", 5)
    torch.manual_seed(0)
    seed = 11
    while True:
        alpha = (torch.randn(4, 3, dtype=torch.float64) * 1.5).requires_grad_()
        if _well_inside(alpha.detach(), seed):
            break
    theta = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def f(w, alpha):
        out, e = gates.gated_diff_and_l0(theta, w, alpha, None, seed, L, R)
        return out, e

    assert torch.autograd.gradcheck(f, (w, alpha), eps=1e-6, atol=1e-7)
