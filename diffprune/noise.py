"""The random streams of diff pruning: the gates' uniform noise (`diffprune.gates`) and the random bits of
stochastic rounding (`diffprune.optim`), each a function of a key only, so a blocked, resumed or sharded
computation draws what the whole one draws.

On CPU numpy's PCG64 (`Generator.random` into a buffer: 1.8 ns per float32 here against 3.6 for torch's
Mersenne Twister `uniform_`; ``random_raw``: ~4x faster than torch's ``randint``); elsewhere torch's
generator of the device, seeded from the same key.
"""

from __future__ import annotations

import numpy as np
import torch


class Noise:
    """One stream, keyed by an int or a tuple of ints. Consecutive draws continue it, so how a tensor is
    split into blocks does not change what it draws."""

    def __init__(self, key, device):
        self.device = torch.device(device)
        seq = np.random.SeedSequence(key)
        if self.device.type == "cpu":
            self.rng = np.random.PCG64(seq)
            self.np = np.random.Generator(self.rng)
        else:
            self.np = None
            self.gen = torch.Generator(device=self.device)
            self.gen.manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))
        self._odd = False

    def uniform_(self, buf: torch.Tensor) -> torch.Tensor:
        """buf <- the next numel(buf) uniforms in [0, 1)."""
        if self.np is not None and buf.dtype in (torch.float32, torch.float64) and buf.is_contiguous():
            self.np.random(out=buf.numpy(), dtype=np.float32 if buf.dtype == torch.float32 else np.float64)
            return buf
        if self.np is not None:  # other dtypes on CPU: through float32
            return buf.copy_(self.uniform_(torch.empty(buf.shape, dtype=torch.float32)))
        return buf.uniform_(generator=self.gen)

    def skip(self, n: int) -> "Noise":
        """Start at word n of the int32 stream (CPU): the words a shard of a tensor draws are then the
        ones the whole tensor draws at its positions (FSDP runs step as one process does)."""
        if n and self.np is not None:
            self.rng.advance(n // 2)
            self._odd = bool(n % 2)
        return self

    def int32(self, n: int) -> torch.Tensor:
        """The next n uniform int32 words."""
        if self.np is not None:
            start = int(self._odd)
            self._odd = (start + n) % 2 == 1
            words = self.rng.random_raw((start + n + 1) // 2).view(np.int32)[start:start + n]
            if self._odd:  # the last raw draw's second word is the next call's first: step back one draw
                self.rng.advance(-1)
            return torch.from_numpy(words)
        return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device=self.device, generator=self.gen)
