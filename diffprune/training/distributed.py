"""Several processes (``torchrun --nproc_per_node N -m diffprune train ...``, through accelerate): who
is main, waiting for each other, exchanging Python objects, and which examples each process takes."""

from __future__ import annotations

import torch


def is_main(acc) -> bool:
    return acc.is_main_process


def barrier(acc) -> None:
    if acc.num_processes > 1:
        acc.wait_for_everyone()


def gather_objects(acc, obj) -> list:
    if acc.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * acc.num_processes
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(acc, obj):
    """The main process's `obj` on every process."""
    if acc.num_processes == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def permutation(seed: int, phase: int, epoch: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_007 + epoch)
    return torch.randperm(n, generator=g).tolist()


def local_indices(perm: list[int], step: int, batch_size: int, rank: int, world: int) -> list[int]:
    """This process's examples of global step `step` (a global batch is `batch_size * world` examples).

    With several processes the last, short global batch is topped up from the start of the epoch so that
    every process gets the same number of examples (as DistributedSampler pads)."""
    global_batch = batch_size * world
    idx = perm[step * global_batch : (step + 1) * global_batch]
    if world > 1 and len(idx) % world:
        idx = idx + perm[: world - len(idx) % world]
    return idx[rank::world]
