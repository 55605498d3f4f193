"""A fast fingerprint of a base model: which checkpoint a diff was trained on top of.

It hashes every shared (non-head) parameter's name, shape and dtype and the exact bits of a fixed
strided sample of its values (at most 65,536 per tensor, as float32). That takes milliseconds
even for large models and tells apart different checkpoints, architectures, or a model loaded
in another dtype. It is not a cryptographic proof of every bit: a change confined to entries
outside the sample goes unseen.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

SAMPLES_PER_TENSOR = 1 << 16
_PREFIX = "sampled-blake2b-v1:"


def tensor_sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    step = max(1, -(-flat.numel() // SAMPLES_PER_TENSOR))
    return flat[::step].to(device="cpu", dtype=torch.float32).contiguous()


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(tensor_sample(t).numpy().tobytes())
    return _PREFIX + h.hexdigest()


def model_fingerprint(model: torch.nn.Module, config) -> str:
    """Fingerprint of the parameters `config` does not treat as the task head."""
    return fingerprint((n, p) for n, p in model.named_parameters() if config.role_of(n) != "head")
