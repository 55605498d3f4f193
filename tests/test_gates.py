import math

import pytest
import torch

from diffprune import gates

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
