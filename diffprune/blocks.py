"""How diffprune's per-entry passes split a tensor into blocks: the gates (`diffprune.gates`), the bf16
AdamW step and the stochastic sums (`diffprune.optim`), the in-backward gradient norm (`diffprune.lean`).

On the CPU a block of `CPU_BLOCK` entries (512 KiB of fp32) keeps its dozen elementwise passes (noise,
logit, sigmoid, stretch, products; AdamW and the rounding back) in cache instead of streaming the whole
tensor through memory a dozen times (the bf16 AdamW step ran 1.6x faster than with 2^20). On an
accelerator every pass over a block is a kernel launch, so blocks are `DEVICE_BLOCK` entries: at 2^17 the
bf16 AdamW step alone would make ~16 launches per 131k entries, ~150k a step for Llama-3.2-1B's 1.24B
gate logits; there the block only bounds the temporaries (a 64 MiB AdamW workspace). Either way the only
full-size tensors allocated are the outputs. On the CPU the random streams (`diffprune.noise`) do not depend
on the split, so the block size changes the speed only (tested); on an accelerator torch's generator draws
the random words, and the split changes which (equally random) words an entry gets: the block size is a
constant there, so a resumed run draws what it would have.
"""

from __future__ import annotations

import torch

CPU_BLOCK = 1 << 17
DEVICE_BLOCK = 1 << 22


def size(device: torch.device, n: int | None = None) -> int:
    """Entries per block on `device` (for a tensor of n entries: at most n, at least 1)."""
    block = CPU_BLOCK if torch.device(device).type == "cpu" else DEVICE_BLOCK
    return block if n is None else max(1, min(n, block))
