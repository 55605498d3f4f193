"""Adam with a factored second moment (`--moments-dtype factored`): the L0 stage's moments in 2 bytes per entry.

AdamW keeps two moments per trainable entry: for the L0 stage's w and alpha, 8 (fp32) or 4 (bf16) bytes per
diffed parameter each, the largest part of `--memory lean`'s state. Adafactor (Shazeer & Stern 2018,
"Adafactor: Adaptive Learning Rates with Sublinear Memory Cost") keeps, for a matrix of R x C entries,
only the running means of the squared gradient over its rows (R numbers) and over its columns (C numbers)
and estimates the second moment of entry (i, j) as ``row_i * col_j / mean(row)``. Here that estimate
replaces Adam's ``v``, with everything else Adam's: the first moment per entry (bf16, rounded to nearest as
`diffprune.optim` rounds bf16 first moments), both bias corrections, the update ``m_hat / (sqrt(v_hat) +
eps)``, the group's lr / betas / eps / weight decay, so a run keeps its learning rates (and where g**2 is an
outer product the estimate is exact and the step is Adam's, tested). As Adafactor does, a tensor's update is
scaled down to an RMS of at most 1 ("update clipping"): a factored estimate can be far below one entry's own
g**2, where Adam's per-entry v cannot.

A tensor of more than one dimension is viewed as (entries / last dimension, last dimension); vectors and
scalars (biases, LayerNorm, structured group logits) have nothing to factor and keep bf16 moments
(`optim.AdamW`'s bf16 path). A bf16 parameter (`--alpha-dtype bf16`, `--w-dtype bf16`) is stepped in fp32
and rounded back stochastically, as there. Three passes over the gradient, row block by row block (no
full-size temporary): the mean squares, the first moment and the update's RMS, the step.
"""

from __future__ import annotations

import math

import torch

from . import blocks

EPS1 = 1e-30  # added to g**2 (Adafactor's epsilon_1): a row or column with no gradient stays > 0
CLIP = 1.0  # Adafactor's update clipping threshold d: RMS(u) <= 1


def factorable(p: torch.Tensor) -> bool:
    """Whether `p` has a matrix to factor (two dimensions or more, not a DTensor shard)."""
    return p.dim() >= 2 and not hasattr(p, "to_local")


def shape2d(p: torch.Tensor) -> tuple[int, int]:
    cols = p.shape[-1]
    return p.numel() // cols, cols


def init_state(p: torch.Tensor) -> dict:
    rows, cols = shape2d(p)
    return {"step": torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format),
            "exp_avg_sq_row": torch.zeros(rows, dtype=torch.float32, device=p.device),
            "exp_avg_sq_col": torch.zeros(cols, dtype=torch.float32, device=p.device)}


@torch.no_grad()
def step_(p: torch.Tensor, state: dict, group: dict, round_bf16) -> None:
    """One step of `p` (its ``.grad`` read, not changed). `round_bf16(dst, src)` writes the fp32 chunk `src`
    (consumed) to the bf16 chunk `dst` with stochastic rounding, drawing the next random bits of the
    tensor's stream (the chunks come in order)."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    state["step"] += 1
    t = int(state["step"].item())
    rows, cols = shape2d(p)
    P, G, M = p.view(rows, cols), p.grad.reshape(rows, cols), state["exp_avg"].view(rows, cols)
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    block = max(1, blocks.size(p.device) // cols)
    spans = [(r, min(r + block, rows)) for r in range(0, rows, block)]

    # 1. running means of g**2 over each row and each column
    row_mean = torch.empty(rows, dtype=torch.float32, device=p.device)
    col_sum = torch.zeros(cols, dtype=torch.float32, device=p.device)
    for a, b in spans:
        sq = G[a:b].to(torch.float32, copy=True).square_()
        torch.mean(sq, dim=1, out=row_mean[a:b])
        col_sum += sq.sum(dim=0)
    row.mul_(beta2).add_(row_mean.add_(EPS1), alpha=1 - beta2)
    col.mul_(beta2).add_(col_sum.div_(rows).add_(EPS1), alpha=1 - beta2)

    # sqrt(v_hat_ij) = sqrt(row_i / mean(row) / (1 - beta2**t)) * sqrt(col_j)
    r = (row / row.mean() / (1 - beta2 ** t)).sqrt_()
    c = col.sqrt()

    def denominator(a: int, b: int) -> torch.Tensor:
        return torch.outer(r[a:b], c).add_(eps)

    # 2. the first moment (bf16, to nearest), and the RMS of this step's update m_hat / (sqrt(v_hat) + eps)
    sumsq = torch.zeros((), dtype=torch.float32, device=p.device)  # (read once per tensor: one device sync)
    for a, b in spans:
        m = M[a:b].to(torch.float32, copy=True).mul_(beta1).add_(G[a:b], alpha=1 - beta1)
        M[a:b].copy_(m)
        sumsq += m.div_(denominator(a, b)).square_().sum()
    bc1 = 1 - beta1 ** t
    scale = 1.0 / max(1.0, math.sqrt(float(sumsq) / p.numel()) / bc1 / CLIP)

    # 3. the step (decoupled weight decay), from the stored first moment
    step_size = lr * scale / bc1
    for a, b in spans:
        x = P[a:b].to(torch.float32, copy=True)
        if wd:
            x.mul_(1 - lr * wd)
        x.addcdiv_(M[a:b].float(), denominator(a, b), value=-step_size)
        if P.dtype == torch.float32:
            P[a:b].copy_(x)
        else:
            round_bf16(P[a:b].view(-1), x.view(-1))
