"""Stretched hard-concrete gates (Louizos et al. 2018) as used by diff pruning.

    u ~ U(0,1);  s = sigmoid(logit(u) + alpha);  s_bar = s (r - l) + l;  z = clamp(s_bar, 0, 1)

`GatedDiff` computes ``theta + z * z_group * w`` for one parameter tensor and, in the same pass,
the tensor's expected number of nonzero gates (the L0 penalty term). Its backward pass regenerates
the uniform noise from the seed used in forward and folds the penalty's gradient into the gates'
gradient, so the only full-size tensors it allocates are its output (which the model needs as its
weight anyway) and the two gradients: no noise, gate, slope or product tensors are kept or
materialised, and the penalty costs no separate full-size pass or gradient tensor. `GatedSegments` does
the same for many tensors' candidate entries at once (the candidate L0 stage, one pass a step), and
`GatedRows` for an embedding's looked-up rows (the dense L0 stage on CPU). The three differ only in which
entries they visit and where the noise comes from: the formulas on a block of entries (the sample s, the
delta, dL/dw, the gates' and the penalty's parts of dL/dalpha) are written once, in the helpers below.
"""

from __future__ import annotations

import math

import torch

from . import blocks
from .config import GROUP_PENALTIES
from .noise import Noise

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
    return Noise(seed, device).uniform_(torch.empty(shape, device=device, dtype=dtype)).clamp_(_EPS, 1.0 - _EPS)


# ---- the gate formulas, one home: every autograd Function below runs these on blocks of entries ----
def _concrete_(u: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """u (uniform noise) <- s = sigmoid(logit(u) + alpha), in place."""
    return u.logit_(_EPS).add_(alpha).sigmoid_()


def _stretch_clamp_(s: torch.Tensor, l: float, r: float) -> torch.Tensor:
    """s <- z = clamp(s (r - l) + l, 0, 1), in place."""
    return s.mul_(r - l).add_(l).clamp_(0.0, 1.0)


def _open_range(l: float, r: float) -> tuple[float, float]:
    """(lo, hi): 0 < z < 1 exactly where lo < s < hi; there dz/dalpha = (r - l) s (1 - s), elsewhere 0."""
    return -l / (r - l), (1.0 - l) / (r - l)


def _slope(s: torch.Tensor, l: float, r: float) -> torch.Tensor:
    """dz/dalpha for the concrete sample s (a new tensor)."""
    lo, hi = _open_range(l, r)
    return (1 - s).mul_(s).mul_(r - l).mul_((s > lo) & (s < hi))


def _delta_(s: torch.Tensor, w: torch.Tensor, z_g, l: float, r: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """z * z_g * w for the concrete sample s, into `out` (s kept) or in place of s; `z_g` the group gate
    (0-dim or per entry) or None."""
    d = s.mul_(r - l) if out is None else torch.mul(s, r - l, out=out)
    d.add_(l).clamp_(0.0, 1.0).mul_(w)
    return d if z_g is None else d.mul_(z_g)


# The backward of a block of gates, from its concrete sample s, the upstream gradient g (of theta + delta)
# and the values w, all in the compute dtype; z_g the group gate (0-dim or per entry) or None.
def _grad_gz(s: torch.Tensor, g: torch.Tensor, l: float, r: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """g * z: dL/dw is g * z * z_g, and dL/dz_g is sum(g * z * w)."""
    return torch.mul(s, r - l, out=out).add_(l).clamp_(0.0, 1.0).mul_(g)


def _grad_alpha_gates(s: torch.Tensor, g: torch.Tensor, w: torch.Tensor, z_g, l: float, r: float,
                      scratch: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The gates' part of dL/dalpha: g * w * z_g * dz/dalpha (into `out` when given)."""
    scale = r - l if z_g is None else z_g * (r - l)
    t = torch.addcmul(s, s, s, value=-1.0, out=scratch).mul_(g).mul_(w).mul_(scale)
    lo, hi = _open_range(l, r)
    if out is None:
        return torch.ops.aten.hardtanh_backward(t, s, lo, hi)
    return torch.ops.aten.hardtanh_backward.grad_input(t, s, lo, hi, grad_input=out)


def _prob_nonzero_into_(buf: torch.Tensor, alpha: torch.Tensor, c: float) -> torch.Tensor:
    """buf <- P(z != 0) = sigmoid(alpha - c)."""
    if c == 0.0:
        return torch.sigmoid(alpha, out=buf)
    return torch.sub(alpha, c, out=buf).sigmoid_()


def _prob_sum(fused, buf: torch.Tensor, alpha: torch.Tensor, c: float) -> torch.Tensor:
    """sum of P(z != 0) over a block of logits: by the compiled kernel when there is one that runs."""
    total = fused.prob_sum(alpha) if fused is not None else None
    return total if total is not None else _prob_nonzero_into_(buf, alpha, c).sum()


def _add_penalty_grad_(ga: torch.Tensor, alpha: torch.Tensor, c: float, weight, buf: torch.Tensor) -> torch.Tensor:
    """ga += weight * d/dalpha of sum_i sigmoid(alpha_i - c) = weight * p (1 - p); `buf`: scratch for p."""
    p = _prob_nonzero_into_(buf, alpha, c)
    return ga.addcmul_(torch.addcmul(p, p, p, value=-1.0, out=p), weight)


def _concrete(alpha: torch.Tensor, l: float, r: float, seed: int) -> torch.Tensor:
    """s = sigmoid(logit(u) + alpha) for the noise of `seed`, computed in one buffer."""
    return _concrete_(_uniform(alpha.shape, seed, alpha.device, alpha.dtype), alpha)


def sample_gate(alpha: torch.Tensor, l: float, r: float, seed: int) -> torch.Tensor:
    """A hard-concrete sample z for logits alpha, drawn from the noise of `seed` (no autograd)."""
    return _stretch_clamp_(_concrete(alpha, l, r, seed), l, r)


def _gate_and_slope(alpha, l, r, seed):
    """z and dz/dalpha for the noise of `seed`."""
    s = _concrete(alpha, l, r, seed)
    slope = _slope(s, l, r)
    return _stretch_clamp_(s, l, r), slope


# ---- the same block arithmetic fused: one compiled pass instead of a dozen (`FusedGates`) ----------
# With e = exp(-alpha): s = sigmoid(logit(u) + alpha) = u / (u + (1 - u) e) and P(z != 0) = sigmoid(alpha - c)
# = 1 / (1 + (-l / r) e), so one exp per entry serves the sample and the penalty where the eager passes
# take a log and two exps (on this CPU the transcendentals are most of an in-cache pass's cost).
class FusedGates:
    """The dense gates' block arithmetic as `torch.compile`d kernels (`--compile-gates`): a block's
    sample, delta, theta + delta and penalty sum in one pass forward, its dL/dw, dL/dalpha (gates and
    penalty) and group-gate sum in one pass backward. Values equal the eager helpers' up to float
    rounding (a few ulps: tested), not bit for bit. Only tensors of at least `min_entries` entries take
    them (a bias or LayerNorm vector is not worth a kernel call). The first call of each dtype
    combination compiles (seconds; inductor caches it on disk) and loads torch's compiler stack into the
    process (MiniLM 8 x 64 on this CPU: +48 MiB peak resident memory, benchmarks/results/train_cost.md); a
    kernel that fails to compile is reported once and the eager passes run instead."""

    min_entries = 1 << 16

    def __init__(self, l: float, r: float):
        lo, hi = _open_range(l, r)
        ec = -l / r  # exp(log_ratio(l, r))

        def sample(u, e):
            x = u.clamp(_EPS, 1.0 - _EPS)
            return x / (x + (1.0 - x) * e)

        def forward(u, alpha, w, theta, z_g, out, s_out):
            e = torch.exp(-alpha.to(u.dtype))
            s = sample(u, e)
            if s_out is not None:
                s_out.copy_(s)
            out.copy_(theta.to(u.dtype) + (s * (r - l) + l).clamp(0.0, 1.0) * w.to(u.dtype) * z_g)
            return (1.0 / (1.0 + ec * e)).sum()

        def backward(x, from_noise: bool, alpha, g, w, z_g, pen, grad_w, grad_alpha):
            e = torch.exp(-alpha.to(x.dtype))
            s = sample(x, e) if from_noise else x
            g, w = g.to(x.dtype), w.to(x.dtype)
            gz = (s * (r - l) + l).clamp(0.0, 1.0) * g
            grad_w.copy_(gz * z_g)
            from_gates = torch.where((s > lo) & (s < hi), g * w * (z_g * (r - l)) * (s - s * s), 0.0)
            p = 1.0 / (1.0 + ec * e)
            grad_alpha.copy_(from_gates + pen * (p - p * p))
            return (gz * w).sum()

        def prob_sum(alpha):  # (in alpha's dtype widened to fp32 at least, as `compute_dtype` does for w)
            return (1.0 / (1.0 + ec * torch.exp(-alpha.to(compute_dtype(alpha))))).sum()

        def penalty_grad(alpha, pen, grad_alpha):
            p = 1.0 / (1.0 + ec * torch.exp(-alpha.to(compute_dtype(alpha))))
            grad_alpha.copy_(pen * (p - p * p))

        self._kernels = {name: torch.compile(fn, dynamic=True, fullgraph=True) for name, fn in
                         (("forward", forward), ("backward", backward), ("prob_sum", prob_sum),
                          ("penalty_grad", penalty_grad))}
        self.error: str | None = None

    def usable(self, n: int) -> bool:
        return self.error is None and n >= self.min_entries

    def _run(self, name: str, *args):
        """The kernel's result, or None (outputs untouched) when it cannot compile or run here."""
        if self.error is not None:
            return None
        # detached: a block is a view of a larger tensor, and torch.compile would guard on (and recompile
        # for) the sizes of each view's base; a detached tensor shares the storage without being a view
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        try:
            with torch.no_grad():
                out = self._kernels[name](*args)
            return True if out is None else out
        except Exception as exc:  # a missing compiler, an unsupported backend: the eager passes still work
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            import warnings

            warnings.warn(f"--compile-gates: the fused gate kernels are off for this run ({self.error}); "
                          "the eager passes give the same values, slower", RuntimeWarning, stacklevel=3)
            return None

    @staticmethod
    def group_gate(z_g, dtype, device) -> torch.Tensor:
        """The kernels' z_g: the group gate as a 0-dim tensor of `dtype`, 1 for a tensor without one."""
        return z_g.to(dtype) if z_g is not None else torch.ones((), dtype=dtype, device=device)

    def forward(self, u, alpha, w, theta, z_g, out, s_out):
        """out <- theta + z * z_g * w for the uniforms u (s_out <- the sample s, when given); the block's
        sum of P(z != 0). z_g: a 0-dim tensor (`group_gate`)."""
        return self._run("forward", u, alpha, w, theta, z_g, out, s_out)

    def backward(self, x, from_noise: bool, alpha, g, w, z_g, pen, grad_w, grad_alpha):
        """grad_w, grad_alpha <- the block's dL/dw and dL/dalpha (pen: the penalty's weight, 0-dim) from the
        upstream gradient g and the sample s = x (or the uniforms x, `from_noise`); returns sum(g * z * w)."""
        return self._run("backward", x, from_noise, alpha, g, w, z_g, pen, grad_w, grad_alpha)

    def prob_sum(self, alpha):
        """sum of P(z != 0) over a block of logits."""
        return self._run("prob_sum", alpha)

    def penalty_grad(self, alpha, pen, grad_alpha):
        """grad_alpha <- pen * d/dalpha of sigmoid(alpha - c)."""
        return self._run("penalty_grad", alpha, pen, grad_alpha)


_FUSED: dict[tuple[float, float], FusedGates] = {}


def fused_gates(l: float, r: float) -> FusedGates:
    """The compiled kernels of the stretch (l, r), one set per process: models built one after another
    share them (each new set would compile again, and torch.compile stops compiling a function after a
    few variants)."""
    if (l, r) not in _FUSED:
        _FUSED[(l, r)] = FusedGates(l, r)
    return _FUSED[(l, r)]


# The elementwise work runs block by block over the flattened tensors (`diffprune.blocks`): the only
# full-size tensors allocated are the outputs, and on the CPU the blocked gates are exactly the unblocked ones.
def _block_size(n: int, device: torch.device) -> int:
    return blocks.size(device, n)


def compute_dtype(w: torch.Tensor) -> torch.dtype:
    """The dtype the gate arithmetic of `w` runs in: float32 for a bf16 / fp16 w (`--w-dtype bf16`),
    else w's own."""
    return torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype


def _concrete_into_(buf: torch.Tensor, alpha: torch.Tensor, gen: Noise) -> torch.Tensor:
    """buf <- s = sigmoid(logit(u) + alpha), u drawn from `gen` (bit-identical to `_concrete`)."""
    return _concrete_(gen.uniform_(buf), alpha)


class ConcreteCache:
    """Hands one tensor's concrete sample s = sigmoid(logit(u) + alpha) from the recompute of its
    effective weight (`DiffModel.recompute_weights`) to its gates' backward, which runs right after
    that layer's backward and then reads s instead of drawing the noise and computing s again: one of
    a lean step's three passes of noise, logit and sigmoid over every entry.

    One slot, keyed by the sample's seed (one per tensor and step) and size: a backward that finds
    another key (a tied weight recomputed twice, activation checkpointing, no recompute) draws its
    noise again, so the cache changes the speed only, never a value. A tensor of more than
    `max_entries` entries is not cached: its s (4 bytes an entry, alive from the recompute to the
    gates' backward) would add the most to the step's transient peak."""

    max_entries = 1 << 25  # 128 MiB of fp32: every tensor of bert-base, all but the embeddings of Llama-3.2-1B

    def __init__(self):
        self.key, self.s = None, None

    def put(self, key: tuple, s: torch.Tensor) -> None:
        self.key, self.s = key, s

    def take(self, key: tuple) -> torch.Tensor | None:
        """The cached s for `key` (emptying the slot), or None."""
        if self.key != key:
            return None
        s, self.key, self.s = self.s, None, None
        return s


class GatedDiff(torch.autograd.Function):
    """(theta + z(alpha, seed) * z_g(alpha_group, seed) * w,  sum_i P(z_i != 0)).

    Gradients for w, alpha and alpha_group. The second output (the tensor's expected number of
    nonzero gates, before the group factor) is only computed when ``with_l0`` is true; its
    gradient is folded into the same backward pass as the gate's, so the L0 penalty allocates no
    full-size tensor of its own. Nothing full-size is saved for backward: the noise is drawn again
    from `seed` (w, alpha are parameters, saved by reference).
    """

    @staticmethod
    def forward(ctx, theta, w, alpha, alpha_group, seed: int, l: float, r: float, with_l0: bool = False,
                cache: ConcreteCache | None = None, fill: bool = False, fused: FusedGates | None = None):
        device, n = w.device, w.numel()
        z_g = sample_gate(alpha_group, l, r, seed + 1_000_003) if alpha_group is not None else None
        cdt = compute_dtype(w)
        same = theta.dtype == cdt
        out = torch.empty(theta.shape, dtype=theta.dtype, device=device)
        of, tf, wf, af = out.view(-1), theta.reshape(-1), w.reshape(-1), alpha.reshape(-1)
        bs = _block_size(n, device)
        tmp = None if same else torch.empty(bs, dtype=cdt, device=device)
        scratch = torch.empty(bs, dtype=cdt, device=device) if with_l0 else None
        sums = torch.empty(-(-n // bs), dtype=cdt, device=device) if with_l0 else None
        c = log_ratio(l, r)
        gen = Noise(seed, device)
        keep = torch.empty(n, dtype=cdt, device=device) if fill and cache is not None and n <= cache.max_entries else None
        if fused is not None and fused.usable(n):
            u_buf = torch.empty(bs, dtype=cdt, device=device)
            zg_t = FusedGates.group_gate(z_g, cdt, device)
        else:
            fused = None
        for k, i in enumerate(range(0, n, bs)):
            j = min(i + bs, n)
            a = af[i:j]
            d = of[i:j] if same else tmp[: j - i]
            if fused is not None:  # one compiled pass; its uniforms stay in u_buf if it cannot run
                u = gen.uniform_(u_buf[: j - i])
                total = fused.forward(u, a, wf[i:j], tf[i:j], zg_t, of[i:j], None if keep is None else keep[i:j])
                if total is not None:
                    if with_l0:
                        sums[k] = total
                    continue
                _delta_(_concrete_((d if keep is None else keep[i:j]).copy_(u), a), wf[i:j], z_g, l, r,
                        out=None if keep is None else d)
            elif keep is None:
                _delta_(_concrete_into_(d, a, gen), wf[i:j], z_g, l, r)
            else:  # s kept for the backward that follows this recompute
                _delta_(_concrete_into_(keep[i:j], a, gen), wf[i:j], z_g, l, r, out=d)
            if same:
                d.add_(tf[i:j])  # == theta + delta
            else:
                of[i:j].copy_(d).add_(tf[i:j])  # == theta + delta.to(theta.dtype)
            if with_l0:
                sums[k] = _prob_nonzero_into_(scratch[: j - i], a, c).sum()
        if keep is not None:
            cache.put((seed, n), keep)
        ctx.save_for_backward(w, alpha, alpha_group)
        ctx.seed, ctx.l, ctx.r, ctx.cache, ctx.fused = seed, l, r, cache, fused
        ctx.set_materialize_grads(False)
        expected = sums.sum() if with_l0 else torch.zeros((), dtype=cdt, device=device)
        if not with_l0:
            ctx.mark_non_differentiable(expected)
        return out, expected

    @staticmethod
    def backward(ctx, grad_out, grad_expected):
        w, alpha, alpha_group = ctx.saved_tensors
        l, r, seed = ctx.l, ctx.r, ctx.seed
        device, n = w.device, w.numel()
        need_w, need_alpha, need_group = ctx.needs_input_grad[1:4]
        if grad_out is None and grad_expected is None:
            return (None,) * 11
        dense = grad_out is not None  # then every block of grad_w and grad_alpha is written below
        grad_w = torch.empty_like(w, memory_format=torch.contiguous_format) if need_w and dense else None
        grad_alpha = None
        if need_alpha:
            grad_alpha = (torch.empty_like if dense else torch.zeros_like)(alpha, memory_format=torch.contiguous_format)
        grad_group = None
        af, wf = alpha.reshape(-1), w.reshape(-1)
        bs = _block_size(n, device)
        cdt = compute_dtype(w)
        scratch = torch.empty(bs, dtype=cdt, device=device)
        c = log_ratio(l, r)
        gates_part = grad_out is not None and (need_w or need_alpha or need_group)
        l0_part = grad_expected is not None and need_alpha
        gen = Noise(seed, device)
        if gates_part:
            kept = ctx.cache.take((seed, n)) if ctx.cache is not None else None
            g = grad_out.to(cdt).contiguous().view(-1)
            s_buf = torch.empty(bs, dtype=cdt, device=device)
            z_buf = torch.empty(bs, dtype=cdt, device=device)
            if alpha_group is not None:
                z_g, slope_g = _gate_and_slope(alpha_group, l, r, seed + 1_000_003)
                gzw = torch.empty(-(-n // bs), dtype=cdt, device=device) if need_group else None
            else:
                z_g, gzw = None, None
        gwf = grad_w.view(-1) if grad_w is not None else None
        gaf = grad_alpha.view(-1) if grad_alpha is not None else None
        fused = ctx.fused if ctx.fused is not None and ctx.fused.usable(n) and need_w and need_alpha else None
        if fused is not None:
            zg_t = FusedGates.group_gate(z_g if gates_part else None, cdt, device)
            pen = grad_expected.to(cdt) if l0_part else torch.zeros((), dtype=cdt, device=device)
        for k, i in enumerate(range(0, n, bs)):
            j = min(i + bs, n)
            m = j - i
            ab = af[i:j]
            drawn = None
            if fused is not None:  # one compiled pass (or none: then the eager passes below)
                if gates_part:
                    x = kept[i:j] if kept is not None else gen.uniform_(s_buf[:m])
                    total = fused.backward(x, kept is None, ab, g[i:j], wf[i:j], zg_t, pen, gwf[i:j], gaf[i:j])
                    if total is not None:
                        if gzw is not None:
                            gzw[k] = total
                        continue
                    drawn = None if kept is not None else x  # the block's uniforms: the eager passes use them
                elif l0_part and fused.penalty_grad(ab, pen, gaf[i:j]) is not None:
                    continue
            if gates_part:
                gb, wb = g[i:j], wf[i:j]
                if kept is not None:
                    s = kept[i:j]
                else:
                    s = _concrete_(drawn, ab) if drawn is not None else _concrete_into_(s_buf[:m], ab, gen)
                gz = _grad_gz(s, gb, l, r, out=z_buf[:m])
                if gzw is not None:
                    gzw[k] = torch.dot(gz, wb if wb.dtype == cdt else wb.to(cdt))
                if need_w:
                    if z_g is not None:
                        torch.mul(gz, z_g, out=gwf[i:j])
                    else:
                        gwf[i:j].copy_(gz)
                if need_alpha:
                    _grad_alpha_gates(s, gb, wb, z_g, l, r, scratch=scratch[:m], out=gaf[i:j])
            if l0_part:
                _add_penalty_grad_(gaf[i:j], ab, c, grad_expected, scratch[:m])
        if gates_part and gzw is not None:
            grad_group = gzw.sum() * slope_g
        return None, grad_w, grad_alpha, grad_group, None, None, None, None, None, None, None


def gated_diff(theta, w, alpha, alpha_group, seed: int, l: float, r: float,
               cache: ConcreteCache | None = None, fill: bool = False, fused: FusedGates | None = None) -> torch.Tensor:
    """theta + z * z_g * w for the noise of `seed` (see `GatedDiff`); `fill`: keep s in `cache` for the
    backward of the graph that computed the same sample (a recompute, `ConcreteCache`); `fused`: the
    compiled kernels to run the blocks with (`FusedGates`)."""
    return GatedDiff.apply(theta, w, alpha, alpha_group, seed, l, r, False, cache, fill, fused)[0]


def with_group_term(total: torch.Tensor, alpha_group, l: float, r: float, group_penalty: str) -> torch.Tensor:
    """Add the group gate to a tensor's penalised count (see `DiffPruningConfig.group_penalty`).

    "expected_l0": sum_i P(z_i) * P(z_g), the expected number of nonzeros of the diff.
    "per_gate":    sum_i P(z_i) + P(z_g), every gate counted once.
    """
    if alpha_group is None:
        return total
    p_group = torch.sigmoid(alpha_group - log_ratio(l, r))
    if group_penalty == "expected_l0":
        return total * p_group
    if group_penalty == "per_gate":
        return total + p_group
    raise ValueError(f"group_penalty {group_penalty!r} is not one of {GROUP_PENALTIES}")


def gated_diff_and_l0(theta, w, alpha, alpha_group, seed: int, l: float, r: float, group_penalty: str = "expected_l0",
                      cache: ConcreteCache | None = None, fused: FusedGates | None = None):
    """(theta + z * z_g * w,  the tensor's penalised gate count), both differentiable, in one pass.

    The second value equals `expected_nonzeros(alpha, alpha_group, l, r, group_penalty)` up to
    float rounding. `cache`: where a recompute of this sample leaves s for the backward; `fused`: as `gated_diff`.
    """
    out, total = GatedDiff.apply(theta, w, alpha, alpha_group, seed, l, r, True, cache, False, fused)
    return out, with_group_term(total, alpha_group, l, r, group_penalty)


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


def expected_nonzeros(
    alpha: torch.Tensor, alpha_group: torch.Tensor | None, l: float, r: float, group_penalty: str = "expected_l0"
) -> torch.Tensor:
    """The penalised gate count of one tensor: sum_i P(z_i != 0), and when structured the group
    term of `group_penalty`. With the default, "expected_l0", this is E[||delta||_0] of the tensor.
    """
    return with_group_term(_SumProbNonzero.apply(alpha, log_ratio(l, r)), alpha_group, l, r, group_penalty)


# ---- many tensors' candidate entries in one pass ----------------------------------------------------
def _pieces(sizes: list[int], bs: int) -> list[list[tuple[int, int, int]]]:
    """The flat concatenation of segments of `sizes` cut into blocks of at most `bs` entries: per block,
    its pieces (segment, start, end within the segment), in order."""
    blocks, cur, room = [], [], bs
    for k, size in enumerate(sizes):
        start = 0
        while start < size:
            take = min(room, size - start)
            cur.append((k, start, start + take))
            start += take
            room -= take
            if room == 0:
                blocks.append(cur)
                cur, room = [], bs
    if cur:
        blocks.append(cur)
    return blocks


def _segment_blocks(sizes: list[int], bs: int, device):
    """Per block of `_pieces`: (its first flat index, its entries, its pieces, each piece's length and
    segment as tensors)."""
    i = 0
    for pieces in _pieces(sizes, bs):
        counts = torch.tensor([b - a for _, a, b in pieces], device=device)
        segs = torch.tensor([kk for kk, _, _ in pieces], device=device)
        m = int(sum(b - a for _, a, b in pieces))
        yield i, m, pieces, counts, segs
        i += m


def _uniform_pieces_(buf: torch.Tensor, noises: list[Noise], pieces) -> torch.Tensor:
    """buf <- each piece's next uniforms from its segment's stream, one piece after another."""
    pos = 0
    for kk, a, b in pieces:
        noises[kk].uniform_(buf[pos:pos + b - a])
        pos += b - a
    return buf


def _joined(tensors: list[torch.Tensor], pieces) -> torch.Tensor:
    """The pieces' entries of the (flat) tensors, one after another (a view when one piece)."""
    parts = [tensors[k][a:b] for k, a, b in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _group_gates(groups: list[torch.Tensor], seeds: list[int], l: float, r: float, slope: bool = False):
    """The group gates z_g of many tensors (and with `slope` dz_g/dalpha_g): what `sample_gate` /
    `_gate_and_slope` give for each alone, as one vector (the group logits' dtype)."""
    a = torch.stack([g.detach().reshape(()) for g in groups])
    u = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    for i, seed in enumerate(seeds):
        Noise(seed + 1_000_003, a.device).uniform_(u[i:i + 1])
    s = _concrete_(u, a)
    if not slope:
        return _stretch_clamp_(s, l, r)
    d = _slope(s, l, r)
    return _stretch_clamp_(s, l, r), d


class GatedSegments(torch.autograd.Function):
    """`GatedDiff` for many tensors' candidate entries in one pass: the flat concatenation of
    theta_k[cand_k] + z(alpha_k, seed_k) * z_g(alpha_group_k) * w_k over tensors k, and, with `with_l0`,
    each tensor's sum_i P(z_i != 0). Each tensor draws its own noise stream (seed_k), so the values are
    those of `GatedDiff` per tensor (to the last bit of the vectorised elementwise ops). The candidate
    L0 stage has hundreds of small tensors (a bias or LayerNorm vector's candidates are a few dozen
    entries): one pass over blocks of up to 2^17 entries spanning many tensors replaces a dozen calls per
    tensor in forward and as many in backward. Nothing full-size is saved: the noise is drawn again.

    apply(meta, *ws, *alphas, *groups) with meta = (thetas (flat), candidate positions, seeds, l, r,
    with_l0); returns (values, sums)."""

    @staticmethod
    def forward(ctx, meta, *tensors):
        thetas, cands, seeds, l, r, with_l0 = meta
        k = len(thetas)
        ws, alphas, groups = tensors[:k], tensors[k:2 * k], list(tensors[2 * k:]) or None
        ws = [w.reshape(-1) for w in ws]
        alphas = [a.reshape(-1) for a in alphas]
        sizes = [int(c.numel()) for c in cands]
        device, cdt, n = ws[0].device, compute_dtype(ws[0]), sum(sizes)
        out = torch.empty(n, dtype=thetas[0].dtype, device=device)
        for t, c, piece in zip(thetas, cands, out.split(sizes)):
            torch.index_select(t, 0, c, out=piece)  # theta at the candidates (`apply.gather`)
        z_g = _group_gates(groups, seeds, l, r).to(cdt) if groups is not None else None
        sums = torch.zeros(k, dtype=cdt, device=device) if with_l0 else None
        c_l0 = log_ratio(l, r)
        bs = _block_size(n, device)
        buf = torch.empty(bs, dtype=cdt, device=device)
        noises = [Noise(seed, device) for seed in seeds]
        for i, m, pieces, counts, segs in _segment_blocks(sizes, bs, device):
            s = _uniform_pieces_(buf[:m], noises, pieces)
            ab = _joined(alphas, pieces)
            zg = torch.repeat_interleave(z_g.index_select(0, segs), counts) if z_g is not None else None
            d = _delta_(_concrete_(s, ab), _joined(ws, pieces), zg, l, r)
            o = out[i:i + m]
            o.add_(d if o.dtype == cdt else d.to(o.dtype))  # == theta + delta
            if with_l0:
                sums.index_add_(0, torch.repeat_interleave(segs, counts), _prob_nonzero_into_(torch.empty_like(s), ab, c_l0))
        ctx.save_for_backward(*ws, *alphas, *(groups or []))
        ctx.k, ctx.sizes, ctx.seeds, ctx.l, ctx.r, ctx.grouped = k, sizes, seeds, l, r, groups is not None
        ctx.set_materialize_grads(False)
        expected = sums if with_l0 else torch.zeros(k, dtype=cdt, device=device)
        if not with_l0:
            ctx.mark_non_differentiable(expected)
        return out, expected

    @staticmethod
    def backward(ctx, grad_out, grad_sums):
        saved = ctx.saved_tensors
        k, sizes, seeds, l, r = ctx.k, ctx.sizes, ctx.seeds, ctx.l, ctx.r
        ws, alphas = list(saved[:k]), list(saved[k:2 * k])
        groups = list(saved[2 * k:]) if ctx.grouped else None
        if grad_out is None and grad_sums is None:
            return (None,) * (1 + len(saved))
        device, cdt, n = ws[0].device, compute_dtype(ws[0]), sum(sizes)
        grad_w = [torch.empty_like(w) for w in ws] if grad_out is not None else None
        grad_a = [(torch.empty_like if grad_out is not None else torch.zeros_like)(a) for a in alphas]
        grad_g = None
        c_l0 = log_ratio(l, r)
        if groups is not None and grad_out is not None:
            z_g, slope_g = _group_gates(groups, seeds, l, r, slope=True)
            z_g, slope_g = z_g.to(cdt), slope_g.to(cdt)
            gzw = torch.zeros(k, dtype=cdt, device=device)
        else:
            z_g = gzw = None
        g = grad_out.to(cdt).contiguous() if grad_out is not None else None
        bs = _block_size(n, device)
        s_buf, t_buf = torch.empty(bs, dtype=cdt, device=device), torch.empty(bs, dtype=cdt, device=device)
        noises = [Noise(seed, device) for seed in seeds]
        for i, m, pieces, counts, segs in _segment_blocks(sizes, bs, device):
            ab = _joined(alphas, pieces)
            seg_ids = torch.repeat_interleave(segs, counts) if (z_g is not None or grad_sums is not None) else None
            ga = torch.zeros(m, dtype=cdt, device=device)
            if g is not None:
                s = _concrete_(_uniform_pieces_(s_buf[:m], noises, pieces), ab)
                gb, wb = g[i:i + m], _joined(ws, pieces)
                wb = wb if wb.dtype == cdt else wb.to(cdt)
                gz = _grad_gz(s, gb, l, r)  # dL/dw before the group gate
                zg = z_g.index_select(0, seg_ids) if z_g is not None else None
                if zg is not None:
                    gzw.index_add_(0, seg_ids, gz * wb)
                _grad_alpha_gates(s, gb, wb, zg, l, r, scratch=t_buf[:m], out=ga)
                if zg is not None:
                    gz.mul_(zg)
                torch._foreach_copy_([grad_w[kk].view(-1)[a:b] for kk, a, b in pieces], list(gz.split(counts.tolist())))
            if grad_sums is not None:
                _add_penalty_grad_(ga, ab, c_l0, grad_sums.to(cdt).index_select(0, seg_ids), t_buf[:m])
            torch._foreach_copy_([grad_a[kk].view(-1)[a:b] for kk, a, b in pieces], list(ga.split(counts.tolist())))
        if gzw is not None:
            grad_g = list((gzw * slope_g).to(groups[0].dtype).unbind(0))
            grad_g = [gg.reshape(gr.shape) for gg, gr in zip(grad_g, groups)]
        return (None, *(grad_w or [None] * k), *grad_a, *(grad_g or ([None] * k if groups is not None else [])))


def segments_gate_count(sums: torch.Tensor, groups: list[torch.Tensor] | None, l: float, r: float,
                        group_penalty: str) -> torch.Tensor:
    """The penalised gate count of many tensors (`GatedSegments`' per-tensor sums): the sum over them of
    what `with_group_term` gives each."""
    if groups is None:
        return sums.sum()
    p_group = torch.sigmoid(torch.stack([g.reshape(()) for g in groups]) - log_ratio(l, r))
    if group_penalty == "expected_l0":
        return (sums * p_group).sum()
    if group_penalty == "per_gate":
        return sums.sum() + p_group.sum()
    raise ValueError(f"group_penalty {group_penalty!r} is not one of {GROUP_PENALTIES}")


# ---- an embedding's looked-up rows (dense L0 stage) ----------------------------------------------------
def _row_uniforms(rows: list[int], dim: int, seed: int, device, dtype) -> torch.Tensor:
    """The uniforms `GatedDiff` draws for the entries of `rows` of a (n, dim) tensor (CPU: the stream is
    skipped to each row's first word)."""
    u = torch.empty(len(rows), dim, dtype=dtype, device=device)
    for i, row in enumerate(rows):
        Noise(seed, device).skip(row * dim).uniform_(u[i])
    return u


class GatedRows(torch.autograd.Function):
    """`GatedDiff` of a (n, dim) tensor looked up at a few `rows` (an nn.Embedding in the dense L0
    stage): theta[rows] + z * z_g * w at those rows only, drawn from the same noise (each row's words of
    the tensor's stream), and the whole tensor's sum_i P(z_i != 0). Backward gives w the gradient of
    those rows (the rest of the tensor gets none from the task, as the embedding's dense gradient is 0
    there) and alpha that gate part at those rows plus the penalty's part everywhere: one pass over
    the tensor for the penalty instead of two gate passes (noise, logit, sigmoid, products) over all
    of it. CPU only (the stream skips)."""

    @staticmethod
    def forward(ctx, theta_rows, w, alpha, alpha_group, rows, seed: int, l: float, r: float, with_l0: bool,
                fused: FusedGates | None = None):
        cdt, dim, device = compute_dtype(w), w.shape[1], w.device
        z_g = sample_gate(alpha_group, l, r, seed + 1_000_003) if alpha_group is not None else None
        row_list = rows.tolist()
        s = _concrete_(_row_uniforms(row_list, dim, seed, device, cdt), alpha.index_select(0, rows))
        d = _delta_(s, w.index_select(0, rows), z_g, l, r)
        out = d.add_(theta_rows) if theta_rows.dtype == cdt else d.to(theta_rows.dtype).add_(theta_rows)
        expected = torch.zeros((), dtype=cdt, device=device)
        if with_l0:
            af, c = alpha.reshape(-1), log_ratio(l, r)
            bs = _block_size(af.numel(), device)
            buf = torch.empty(bs, dtype=cdt, device=device)
            fused = fused if fused is not None and fused.usable(af.numel()) else None
            expected = sum(_prob_sum(fused, buf[: min(bs, af.numel() - i)], af[i:i + bs], c)
                           for i in range(0, af.numel(), bs))
        ctx.save_for_backward(w, alpha, alpha_group, rows)
        ctx.seed, ctx.l, ctx.r, ctx.rows, ctx.fused = seed, l, r, row_list, fused
        ctx.set_materialize_grads(False)
        if not with_l0:
            ctx.mark_non_differentiable(expected)
        return out, expected

    @staticmethod
    def backward(ctx, grad_out, grad_expected):
        w, alpha, alpha_group, rows = ctx.saved_tensors
        l, r, seed = ctx.l, ctx.r, ctx.seed
        cdt, dim, device = compute_dtype(w), w.shape[1], w.device
        grad_w = torch.zeros_like(w) if grad_out is not None else None
        grad_alpha = torch.zeros_like(alpha)
        grad_group = None
        if grad_expected is not None:  # d/dalpha of sum_i sigmoid(alpha_i - c) = p (1 - p), everywhere
            af, gaf, c = alpha.reshape(-1), grad_alpha.view(-1), log_ratio(l, r)
            bs = _block_size(af.numel(), device)
            buf = torch.empty(bs, dtype=cdt, device=device)
            fused = ctx.fused if ctx.fused is not None and ctx.fused.usable(af.numel()) else None
            pen = grad_expected.to(cdt)
            for i in range(0, af.numel(), bs):
                if fused is None or fused.penalty_grad(af[i:i + bs], pen, gaf[i:i + bs]) is None:
                    _add_penalty_grad_(gaf[i:i + bs], af[i:i + bs], c, grad_expected, buf[: min(bs, af.numel() - i)])
        if grad_out is not None:
            g = grad_out.to(cdt)
            s = _concrete_(_row_uniforms(ctx.rows, dim, seed, device, cdt), alpha.index_select(0, rows))
            wb = w.index_select(0, rows).to(cdt)
            gz = _grad_gz(s, g, l, r)
            z_g = None
            if alpha_group is not None:
                z_g, slope_g = _gate_and_slope(alpha_group, l, r, seed + 1_000_003)
                grad_group = torch.dot(gz.reshape(-1), wb.reshape(-1)) * slope_g
                gz.mul_(z_g)
            grad_w.index_copy_(0, rows, gz.to(w.dtype))
            gate = _grad_alpha_gates(s, g, wb, z_g, l, r)
            grad_alpha.index_copy_(0, rows, (grad_alpha.index_select(0, rows).to(cdt) + gate).to(alpha.dtype))
        return None, grad_w, grad_alpha, grad_group, None, None, None, None, None, None
