"""Candidate-restricted L0: an importance warm-up picks the c * n entries the L0 stage may use.

    scores = importance(dm, batches)               # accumulated |dL/dtheta| per diffed entry
    dm.set_candidates(select(scores, 0.05))        # the top 5%: w and alpha only there

The warm-up runs the frozen model forward and backward over a few hundred batches with autograd on
the diffed weights, adding each tensor's |gradient| into a bfloat16 accumulator the moment that
gradient is complete (a post-accumulate-grad hook) and dropping the gradient: no optimiser state
for theta, one tensor's gradient at a time, and 2 bytes per diffed entry for the scores. The sum
is rounded back to bfloat16 stochastically (`diffprune.optim.add_stochastic_`): rounded to
nearest, each batch's term, ~1/200 of the running total after 200 batches, would be rounded to 0,
1 or 2 steps of an 8-bit mantissa, off by up to half of itself depending on where the total sits in
its binade. Ties at the cut are broken by position. The task head may train meanwhile (`head_optimizer`), so that the
gradients are those of a head that has started to learn the task rather than of a random one.

`select` ranks by the accumulated |gradient| itself (``importance="grad"``) or, with
``importance="grad_per_tensor"``, by each tensor's scores divided by their root mean square, so that
a tensor's rank reflects an entry's importance within its tensor rather than how close the tensor sits
to the loss (on CoLA with "grad" the pooler, 0.6% of the entries, takes 12.7% of the candidates;
benchmarks/results/candidate_overlap.md). It keeps exactly round(c * n) entries, globally, without concatenating the scores: a
histogram of the bfloat16 bit patterns (monotonic in the value for non-negative floats) finds the
cut, then each tensor keeps its entries above it and, in position order, as many at it as the
budget still needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from . import optim

_CHUNK = 1 << 22
IMPORTANCE = ("grad", "grad_per_tensor")


def importance(dm, batches: Iterable[dict], head_optimizer=None, on_step=None,
               autocast=contextlib.nullcontext, embedding_rows: bool = True) -> dict[str, torch.Tensor]:
    """sum over `batches` of |dL/dtheta| per diffed entry (bfloat16, the diffed tensors' shapes).

    `embedding_rows`: a diffed nn.Embedding weight on the CPU gets the gradient of the rows the batch
    looks up only (``sparse=True`` for the warm-up), added to those rows' scores with the random bits
    the dense gradient would use there, so the scores are the same while the (vocabulary, dim) dense
    gradient, 45 MiB a step for MiniLM's token embedding, is never formed."""
    if dm.stage != "warmup":
        raise ValueError("importance() runs before the candidates are set (DiffModel.stage == 'warmup')")
    theta = dm._theta()
    scores = {n: torch.zeros(t.shape, dtype=torch.bfloat16, device=t.device) for n, t in theta.items()}
    handles = []

    step = [0]

    def accumulate(name, index):
        def hook(p):
            g, key = p.grad, (step[0], index)
            if g.is_sparse:  # an embedding's looked-up rows (tied to no dense use)
                g = g.coalesce()
                optim.add_stochastic_rows_(scores[name], g.indices()[0], g.values().abs_(), key=key)
            else:
                optim.add_stochastic_(scores[name], g.abs_(), key=key)  # unbiased bf16 sum
            p.grad = None
        return hook

    for index, (name, t) in enumerate(theta.items()):
        t.requires_grad_(True)
        handles.append(t.register_post_accumulate_grad_hook(accumulate(name, index)))
    diffed = {id(t) for t in theta.values()}
    sparse = [m for m in dm.model.modules() if embedding_rows and type(m) is torch.nn.Embedding and not m.sparse
              and id(m.weight) in diffed and m.weight.device.type == "cpu" and m.max_norm is None]
    for m in sparse:
        m.sparse = True
    was_training = dm.training
    dm.train()
    try:
        for batch in batches:
            with autocast():
                loss = dm(**batch).loss
            loss.backward()
            step[0] += 1
            if head_optimizer is not None:
                head_optimizer.step()
                head_optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(float(loss.detach()))
    finally:
        for m in sparse:
            m.sparse = False
        for h in handles:
            h.remove()
        for t in theta.values():
            t.requires_grad_(False)
            t.grad = None
        dm.train(was_training)
    return scores


def _bits(chunk: torch.Tensor) -> torch.Tensor:
    """The bfloat16 bit pattern of non-negative scores as int64 (order-preserving)."""
    return chunk.contiguous().view(torch.int16).to(torch.int64)


def normalize_per_tensor_(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide each tensor's scores by their root mean square, in place (a tensor of zeros stays zero)."""
    for s in scores.values():
        flat = s.reshape(-1)
        sq = sum(float(flat[i:i + _CHUNK].double().square().sum()) for i in range(0, flat.numel(), _CHUNK))
        rms = (sq / max(flat.numel(), 1)) ** 0.5
        if rms > 0:  # select() refused non-finite scores before
            for i in range(0, flat.numel(), _CHUNK):
                flat[i:i + _CHUNK] = (flat[i:i + _CHUNK].float() / rms).to(s.dtype)
    return scores


def select(scores: dict[str, torch.Tensor], fraction: float, importance: str = "grad") -> dict[str, torch.Tensor]:
    """Sorted flat positions of the round(fraction * n) highest scores across all tensors (`importance`:
    one of `IMPORTANCE`; "grad_per_tensor" rescales `scores` in place first)."""
    if importance not in IMPORTANCE:
        raise ValueError(f"importance {importance!r} is not one of {IMPORTANCE}")
    n = sum(s.numel() for s in scores.values())
    k = round(fraction * n)
    if not 0 < k <= n:
        raise ValueError(f"fraction {fraction} keeps {k} of {n} entries")
    for s in scores.values():
        if not torch.isfinite(s).all():
            raise ValueError("the importance scores are not finite: the warm-up diverged (lower the learning rate)")
    if importance == "grad_per_tensor":
        normalize_per_tensor_(scores)
    hist = None
    for s in scores.values():
        flat = s.reshape(-1)
        for i in range(0, flat.numel(), _CHUNK):
            h = torch.bincount(_bits(flat[i:i + _CHUNK]).clamp_(min=0), minlength=1 << 15)
            hist = h if hist is None else hist + h
    # the cut: the largest bit pattern b with count(bits >= b) >= k
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[b] = count(bits >= b)
    cut = int(torch.nonzero(above >= k).max())
    need_at_cut = k - (int(above[cut + 1]) if cut + 1 < above.numel() else 0)
    out = {}
    for name, s in scores.items():
        flat = s.reshape(-1)
        keep = []
        for i in range(0, flat.numel(), _CHUNK):
            b = _bits(flat[i:i + _CHUNK])
            pos = torch.nonzero(b > cut).squeeze(1)
            if need_at_cut > 0:
                tie = torch.nonzero(b == cut).squeeze(1)[:need_at_cut]
                need_at_cut -= int(tie.numel())
                pos = torch.cat([pos, tie])
            keep.append(pos.add_(i))
        out[name] = torch.sort(torch.cat(keep)).values if keep else torch.zeros(0, dtype=torch.int64)
    return out
