"""Several processes (``torchrun --nproc_per_node N -m diffprune train ...``, through accelerate): who
is main, waiting for each other, exchanging Python objects, and which examples each process takes."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch

from ..errors import TrainError


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


def _env_count(name: str) -> int:
    try:
        return max(1, int(os.environ.get(name, "1")))
    except ValueError:
        return 1


def local_processes() -> int:
    """The processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 when not launched)."""
    return _env_count("LOCAL_WORLD_SIZE")


def launched_processes() -> int:
    """The processes of this launch (torchrun's WORLD_SIZE; 1 when not launched by it)."""
    return _env_count("WORLD_SIZE")


def end_process(code: int) -> NoReturn:
    """End this process of a multi-process launch now, with exit status `code`, skipping the interpreter's
    teardown (standard streams and logging flushed first; every file of the run is already written).

    Why: torch 2.13 keeps a gloo process group that DTensor / functional collectives have used (every
    ``--fsdp`` run) alive after ``destroy_process_group`` -- its worker and transport threads keep running
    (DTensor's caches hold its device mesh, and with those cleared the functional collectives' C++ side still
    holds the group) -- and tearing the interpreter down around them aborts the process ("terminate called
    without an active exception", SIGABRT) in some runs, after all the work is done; torchrun then reports
    the run as failed. Measured on this 2-core CPU: the FSDP test's two-rank run aborted once in 5 and then
    not in 72 runs; a 10-line DTensor script whose two ranks end 1-10 ms apart aborted in 6 of 24 runs, and
    in none of 40 when it ended through here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def refuse_accelerate_fsdp() -> None:
    """accelerate's FSDP plugin (`accelerate launch --use_fsdp`, or `distributed_type: FSDP` in its config)
    would wrap the model in a second FSDP of its own (and on a CPU it fails inside `Accelerator()`): refused
    before anything starts, naming the launch that works."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        raise TrainError(
            "accelerate's FSDP plugin (--use_fsdp / distributed_type: FSDP) is not how diffprune shards: launch "
            "with a plain multi-process config (accelerate launch --multi_gpu --num_processes N, distributed_type: "
            "MULTI_GPU, or torchrun --nproc_per_node N) and pass --fsdp to 'diffprune train', which applies FSDP2 "
            "per block itself and shards the diff state with it"
        )


def step_noise_seed(seed: int, global_step: int) -> int:
    """The gate-noise seed of global step `global_step` under --fsdp: the same on every process, and a
    function of the position only, so a resumed run draws what the uninterrupted one drew."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7 + global_step * 2_654_435_761 % (2**61))
    return int(torch.randint(0, 2**62, (1,), generator=g).item())


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
