"""Projection onto the L0 ball: keep exactly k entries of the diff, globally, by magnitude."""

from __future__ import annotations

from typing import Callable

import torch

from .errors import DiffPruneError


def global_topk_positions(
    scores: dict[str, torch.Tensor],
    k: int,
    tiebreak: Callable[[], dict[str, torch.Tensor] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Flat positions (sorted, int64) of the k largest scores across all tensors.

    Ties at the threshold are broken by the scores `tiebreak()` returns (same names and shapes;
    called only when there is a tie, since it may allocate a model-sized copy), largest first,
    then by position in the concatenation of the tensors in the order given, lowest first, so
    the result is deterministic and has exactly k entries. The tie that matters is at zero: when the
    L0 stage leaves fewer than k nonzero entries, the rest of the budget is filled from entries
    that are all exactly 0, and without a tiebreak they would be the first entries of the first
    tensor (typically the embedding rows of padding and unused tokens).
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be within [0, {n}]")
    if not torch.isfinite(flat).all():
        bad = [nm for nm in names if not torch.isfinite(scores[nm]).all()]
        raise DiffPruneError(
            f"the diff has NaN or infinite entries in {bad[:5]}: training diverged; "
            "lower the learning rate or check the loss"
        )
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k == n:
        keep[:] = True
    elif k > 0:
        threshold = torch.topk(flat, k, sorted=False).values.min()
        keep = flat > threshold
        missing = k - int(keep.sum())
        if missing > 0:
            ties = torch.nonzero(flat == threshold).squeeze(1)
            secondary = tiebreak() if tiebreak is not None else None
            if secondary is not None:
                secondary = torch.cat([secondary[nm].detach().reshape(-1).float() for nm in names])[ties]
                ties = ties[torch.argsort(secondary, descending=True, stable=True)]
            keep[ties[:missing]] = True
    out, offset = {}, 0
    for name in names:
        size = scores[name].numel()
        out[name] = torch.nonzero(keep[offset : offset + size]).squeeze(1)
        offset += size
    return out
