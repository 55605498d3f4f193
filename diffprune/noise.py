"""The random streams of diff pruning: the gates' uniform noise (`diffprune.gates`) and the random bits of
stochastic rounding (`diffprune.optim`), each a function of a key only, so a blocked, resumed or sharded
computation draws what the whole one draws.

On CPU numpy's PCG64 (its raw 64-bit outputs, 1.1 ns per 32-bit word here, made into float32
uniforms by `Noise.uniform_` faster than numpy's ``Generator.random`` and torch's Mersenne Twister
`uniform_`, and ~4x faster than torch's ``randint`` for random bits); elsewhere torch's generator of
the device, seeded from the same key.
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
        """buf <- the next numel(buf) uniforms in [0, 1).

        float32 on the CPU: numpy's own float32 recipe, (32-bit word >> 8) * 2**-24, applied to raw
        words in two vectorised passes; the words come in the order numpy's ``random`` draws them (low
        half of each 64-bit output, then high), so the values are bit for bit those of
        ``Generator.random(dtype=float32)`` (tested), and faster: 1.85 ns a value into a full-size tensor
        against its 2.47 on 2026-12-06, 1.74 against 1.86 in the 2026-12-07 run of
        benchmarks/results/gate_kernels.md (the two vary by ~0.3 ns run to run)."""
        if self.np is not None and buf.dtype == torch.float32 and buf.is_contiguous():
            words = self._words(buf.numel()).view(np.uint32)
            np.right_shift(words, 8, out=words)
            np.multiply(words, np.float32(2.0 ** -24), out=buf.numpy().reshape(-1), dtype=np.float32, casting="unsafe")
            return buf
        if self.np is not None and buf.dtype == torch.float64 and buf.is_contiguous():
            self.np.random(out=buf.numpy(), dtype=np.float64)
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
            return torch.from_numpy(self._words(n))
        return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device=self.device, generator=self.gen)

    def _words(self, n: int) -> np.ndarray:
        """The next n 32-bit words of the CPU stream (int32), each 64-bit output giving its low half, then
        its high half."""
        start = int(self._odd)
        self._odd = (start + n) % 2 == 1
        words = self.rng.random_raw((start + n + 1) // 2).view(np.int32)[start:start + n]
        if self._odd:  # the last raw draw's second word is the next call's first: step back one draw
            self.rng.advance(-1)
        return words
