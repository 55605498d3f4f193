"""The one place a sparse diff is added to weights: theta[idx] = theta[idx] + delta.

Every path that applies a diff goes through here, so they all compute the same float
additions and produce bit-identical weights:

* `SparseDiff.apply_` / `revert_` (`apply_diff_`, `revert_diff_`),
* `DiffModel.merge_and_unload` (`add_`), and, out of place and differentiable,
  `DiffModel.effective` in the fixed-mask stage (`add`, per layer, see `diffprune.layers`),
* the server's in-place task switch (`diffprune.serving.multitask._Patch`: `gather` + `merged`
  once when a task is added, then pure writes of the stored values).

Memory: positions are decoded one tensor at a time (a loaded v2 diff keeps them coded, see
`diff_file.PositionMap`), and no full-size temporary is made: beyond the model, a diff
application holds one tensor's int64 positions and the backup of the overwritten values (needed
for a bit-exact revert: 4 bytes per nonzero for float32 weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch


def merged(base: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """base + delta at the diff's positions: the single float addition every path performs."""
    return base + values.to(device=base.device, dtype=base.dtype)


def gather(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A copy of flat[idx] (idx: int64 or int32 positions on flat's device)."""
    return flat.index_select(0, idx)


def position_dtype(numel: int) -> torch.dtype:
    """The narrowest index dtype for flat positions in a tensor of `numel` entries: int32 below 2^31
    entries (every tensor of today's models), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def put(flat: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Out of place and differentiable w.r.t. `values`: flat with `values` written at idx (int32 or int64
    positions; the candidate L0 stage writes theta + delta at its candidates with it)."""
    return flat.index_put((idx,), values)


def add(flat: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Out of place and differentiable w.r.t. `values` (and `flat`): flat with delta added at idx.

    Same float result per entry as `merged` (one addition of the same two numbers)."""
    return flat.index_add(0, idx, values.to(flat.dtype))


_NUMPY_DTYPES = (torch.float32, torch.float64)


def _numpy_ok(flat: torch.Tensor) -> bool:
    # On CPU a numpy gather/scatter has no dispatcher overhead: ~2x faster than index_select /
    # index_copy_ at these sizes; the float addition is the same IEEE operation either way.
    return flat.device.type == "cpu" and flat.dtype in _NUMPY_DTYPES and not flat.requires_grad


@torch.no_grad()
def add_(flat: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, backup: bool = True) -> torch.Tensor | None:
    """In place: flat[idx] = flat[idx] + values; returns the overwritten values if `backup`."""
    if _numpy_ok(flat) and idx.device.type == "cpu" and values.device.type == "cpu":
        f, i = flat.numpy(), idx.numpy()
        base = f[i]
        f[i] = base + values.detach().to(flat.dtype).numpy()
        return torch.from_numpy(base) if backup else None
    idx = idx.to(device=flat.device, dtype=torch.int64)
    base = gather(flat, idx)
    flat.index_copy_(0, idx, merged(base, values))
    return base if backup else None


@torch.no_grad()
def write_(flat: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """In place: flat[idx] = values (e.g. restoring a backup)."""
    if _numpy_ok(flat) and idx.device.type == "cpu" and values.device.type == "cpu" and values.dtype == flat.dtype:
        flat.numpy()[idx.numpy()] = values.numpy()
        return
    flat.index_copy_(0, idx.to(device=flat.device, dtype=torch.int64), values.to(device=flat.device, dtype=flat.dtype))


def flat_view(param: torch.Tensor) -> torch.Tensor:
    data = param.data if isinstance(param, torch.nn.Parameter) else param.detach()
    return data.view(-1)


def iter_positions(diff, names=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, int64 positions) of `names` (default: every tensor with nonzeros), decoded lazily: one
    tensor at a time, small coded tensors in batches no larger than the largest tensor."""
    if names is None:
        names = [n for n in diff.indices if diff.nnz_of(n)]
    if hasattr(diff.indices, "iter_decoded"):
        yield from diff.indices.iter_decoded(names)
    else:
        for name in names:
            yield name, diff.indices[name]


def iter_diff(diff) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, int64 positions, float32 values) of each tensor with nonzeros (see `iter_positions`)."""
    for name, idx in iter_positions(diff):
        yield name, idx, diff.values[name]


@torch.no_grad()
def apply_diff_(params: Mapping[str, torch.Tensor], diff) -> dict[str, dict[str, torch.Tensor]]:
    """theta += delta in place for every diffed tensor, and the head tensors set; returns the backup
    `revert_diff_` needs: {"diff": overwritten values per tensor, "head": the previous head tensors}."""
    backup: dict[str, dict[str, torch.Tensor]] = {"diff": {}, "head": {}}
    try:
        for name, idx, values in iter_diff(diff):
            backup["diff"][name] = add_(flat_view(params[name]), idx, values)
        for name, t in diff.head.items():
            backup["head"][name] = params[name].data.clone()
            params[name].data.copy_(t)
    except BaseException:
        revert_diff_(params, diff, backup)  # leave the model as it was
        raise
    return backup


@torch.no_grad()
def revert_diff_(params: Mapping[str, torch.Tensor], diff, backup: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write back the exact base values `apply_diff_` saved (bit-exact)."""
    for name, saved in backup["head"].items():
        params[name].data.copy_(saved)
    for name, idx in iter_positions(diff, list(backup["diff"])):
        write_(flat_view(params[name]), idx, backup["diff"][name])
