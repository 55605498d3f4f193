"""The torchrun worker of tests/test_fsdp.py: `diffprune.training.train` in each process, with two test
hooks set from outside the library: stop the run right after its Nth checkpoint (as a killed run stops), and
write what this process holds once `diffprune.sharding.shard` has run.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py '{"output_dir": ..., "stop_after_checkpoints": 1, ...}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _local(t: torch.Tensor) -> int:
    from diffprune.sharding import is_dtensor

    return t.to_local().numel() if is_dtensor(t) else t.numel()


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    from diffprune import sharding
    from diffprune.training import TrainConfig, checkpoints, train

    report, stop = spec.pop("shard_report", None), spec.pop("stop_after_checkpoints", None)
    if report:
        real_shard = sharding.shard

        def shard_and_report(dm, mesh):
            blocks = real_shard(dm, mesh)
            diffed = set(dm.diff_names)
            theta = [p for n, p in dm.model.named_parameters() if n in diffed]
            slots = list(dm.slots.parameters())
            info = {"blocks": blocks, "theta_local": sum(map(_local, theta)), "theta_full": sum(p.numel() for p in theta),
                    "slots_local": sum(map(_local, slots)), "slots_full": sum(p.numel() for p in slots)}
            Path(report).mkdir(parents=True, exist_ok=True)
            (Path(report) / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(info))
            return blocks

        sharding.shard = shard_and_report
    if stop:
        real_write, written = checkpoints.write_checkpoint, []

        def write_then_stop(*args, **kwargs):
            real_write(*args, **kwargs)
            written.append(args[4].global_step)
            if len(written) == stop:
                raise SystemExit(3)

        checkpoints.write_checkpoint = write_then_stop
    train(TrainConfig(**spec))
    from diffprune.training.distributed import end_process

    end_process(0)  # as `diffprune train` ends a launched process (see end_process)


if __name__ == "__main__":
    main()
