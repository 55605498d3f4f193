"""Stretched hard-concrete gates (Louizos et al. 2018) as used by diff pruning.

    u ~ U(0,1);  s = sigmoid(logit(u) + alpha);  s_bar = s (r - l) + l;  z = clamp(s_bar, 0, 1)

`GatedDiff` computes ``theta + z * z_group * w`` for one parameter tensor. Its backward pass
regenerates the uniform noise from the seed used in forward, so the only full-size tensor alive
between forward and backward is the output itself (which the model needs as its weight anyway):
no noise, gate or product tensors are kept.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-6


def log_ratio(l: float, r: float) -> float:
    """The shift in P(z != 0) = sigmoid(alpha - log(-l / r))."""
    return math.log(-l / r)


def prob_nonzero(alpha: torch.Tensor, l: float, r: float) -> torch.Tensor:
    """P(z != 0) for each gate logit, in closed form."""
    return torch.sigmoid(alpha - log_ratio(l, r))


def deterministic_gate(alpha: torch.Tensor, l: float, r: float) -> torch.Tensor:
    """The evaluation-time gate: clamp(sigmoid(alpha) (r - l) + l, 0, 1)."""
    return (torch.sigmoid(alpha) * (r - l) + l).clamp_(0.0, 1.0)


def _uniform(shape, seed: int, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device, dtype=dtype).clamp_(_EPS, 1.0 - _EPS)


def _concrete(alpha: torch.Tensor, l: float, r: float, seed: int) -> torch.Tensor:
    """s = sigmoid(logit(u) + alpha) for the noise of `seed`, computed in one buffer."""
    u = _uniform(alpha.shape, seed, alpha.device, alpha.dtype)
    return u.logit_().add_(alpha).sigmoid_()


def _stretch_clamp_(s: torch.Tensor, l: float, r: float) -> torch.Tensor:
    return s.mul_(r - l).add_(l).clamp_(0.0, 1.0)


def sample_gate(alpha: torch.Tensor, l: float, r: float, seed: int) -> torch.Tensor:
    """A hard-concrete sample z for logits alpha, drawn from the noise of `seed` (no autograd)."""
    return _stretch_clamp_(_concrete(alpha, l, r, seed), l, r)


def _gate_and_slope(alpha, l, r, seed):
    """z and dz/dalpha for the noise of `seed`."""
    s = _concrete(alpha, l, r, seed)
    # 0 < s (r - l) + l < 1  <=>  lo < s < hi; there dz/dalpha = (r - l) s (1 - s), elsewhere 0.
    lo, hi = -l / (r - l), (1.0 - l) / (r - l)
    slope = (1 - s).mul_(s).mul_(r - l).mul_((s > lo) & (s < hi))
    return _stretch_clamp_(s, l, r), slope


class GatedDiff(torch.autograd.Function):
    """theta + z(alpha, seed) * z_g(alpha_group, seed) * w, with gradients for w, alpha, alpha_group."""

    @staticmethod
    def forward(ctx, theta, w, alpha, alpha_group, seed: int, l: float, r: float):
        z = sample_gate(alpha, l, r, seed)
        delta = z.mul_(w)
        if alpha_group is not None:
            z_g = sample_gate(alpha_group, l, r, seed + 1_000_003)
            delta.mul_(z_g)
        ctx.save_for_backward(w, alpha, alpha_group)
        ctx.seed, ctx.l, ctx.r = seed, l, r
        ctx.theta_dtype = theta.dtype
        return theta + delta.to(theta.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        w, alpha, alpha_group = ctx.saved_tensors
        g = grad_out.to(w.dtype)
        z, slope = _gate_and_slope(alpha, ctx.l, ctx.r, ctx.seed)
        grad_w = grad_alpha = grad_group = None
        if alpha_group is not None:
            z_g, slope_g = _gate_and_slope(alpha_group, ctx.l, ctx.r, ctx.seed + 1_000_003)
            gzw = g * z
            # d/dz_g of sum(g * z * z_g * w) = sum(g * z * w)
            if ctx.needs_input_grad[3]:
                grad_group = (gzw * w).sum() * slope_g
            g = g * z_g
            if ctx.needs_input_grad[1]:
                grad_w = gzw.mul_(z_g)
        elif ctx.needs_input_grad[1]:
            grad_w = g * z
        if ctx.needs_input_grad[2]:
            grad_alpha = slope.mul_(g).mul_(w)
        return None, grad_w, grad_alpha, grad_group, None, None, None


def gated_diff(theta, w, alpha, alpha_group, seed: int, l: float, r: float) -> torch.Tensor:
    return GatedDiff.apply(theta, w, alpha, alpha_group, seed, l, r)


class _SumProbNonzero(torch.autograd.Function):
    """sum(sigmoid(alpha - c)) that keeps no full-size tensor for backward (it recomputes)."""

    @staticmethod
    def forward(ctx, alpha, c: float):
        ctx.save_for_backward(alpha)
        ctx.c = c
        return torch.sigmoid(alpha - c).sum()

    @staticmethod
    def backward(ctx, grad):
        (alpha,) = ctx.saved_tensors
        p = torch.sigmoid(alpha - ctx.c)
        return p.mul_(1 - p).mul_(grad), None


def expected_nonzeros(alpha: torch.Tensor, alpha_group: torch.Tensor | None, l: float, r: float) -> torch.Tensor:
    """E[||delta||_0] for one tensor: sum_i P(z_i != 0), times P(z_g != 0) when structured."""
    c = log_ratio(l, r)
    total = _SumProbNonzero.apply(alpha, c)
    if alpha_group is not None:
        total = total * torch.sigmoid(alpha_group - c)
    return total
