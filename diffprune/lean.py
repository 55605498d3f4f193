"""Memory-lean training: the optimiser step fused into backward, and the settings of `--memory lean`.

`OptimizerInBackward` steps each trainable tensor with its own AdamW the moment its gradient is
complete (``Tensor.register_post_accumulate_grad_hook``) and drops the gradient, so no full-size
gradient outlives its tensor's backward: the L0 stage's two model-sized gradients (w and alpha)
become one tensor's at a time.

Gradient clipping cannot see the whole gradient before the first tensor is stepped, so it is done
with the norm of the *previous* step: each step's gradients are scaled by
``min(1, max_grad_norm / ||g_{t-1}||)`` (no clipping on the first step) and this step's global norm
is accumulated while the hooks run. `clipped_steps` counts the steps whose own norm exceeded
``max_grad_norm`` (where exact clipping would have scaled), so a run can say how often the one-step
lag mattered. It is not data-parallel: each process would step on its own unreduced gradient, so
training refuses it with more than one process.
"""

from __future__ import annotations

import math

import torch

from . import blocks, optim
from .errors import ConfigError

MEMORY_MODES = ("standard", "lean")
MOMENTS = ("fp32", "bf16", "factored")
"""How the L0 stage's AdamW moments are kept (`--moments-dtype`): fp32; bf16 (w's, stochastically rounded;
alpha's follow `--alpha-dtype`); factored (w's and alpha's: a bf16 first moment and Adafactor's factored
second moment per matrix, `diffprune.factored`)."""

LEAN = {"optimizer_in_backward": True, "alpha_dtype": "bf16", "recompute_weights": True, "theta_dtype": "fp32",
        "moments_dtype": "fp32", "w_dtype": "fp32"}
"""What ``--memory lean`` turns on (each is also its own option). An option becomes part of it once its
effect on the 5-task GLUE score is measured: the moments of w in bf16 (`--moments-dtype bf16`), w itself
in bf16 (`--w-dtype bf16`) and factored moments are measured and left out (each costs accuracy or has
not shown it keeps it); the frozen weights in bf16 under autocast (`--theta-dtype bf16`, accelerators
only: bf16 matmuls are ~300x slower on CPUs without AMX) are not measured yet, for want of a GPU, and
left out until they are. With candidates (`resolve(..., candidates=c)`) the optimiser step stays
after backward: the gradients are then those of the c * n candidates (6 bytes each with bf16 alpha; on
MiniLM at 8 x 64 the L0 steps' live peak is 177 MiB against 175 inside backward, both under the warm-up's),
the step is one multi-tensor AdamW call instead of one call per tensor (1.14x full finetuning's step time
against 1.23x there; benchmarks/results/train_cost.md, "optimizer after backward") and gradient clipping
is exact."""

STANDARD = {"optimizer_in_backward": False, "alpha_dtype": "fp32", "recompute_weights": False, "theta_dtype": "fp32",
            "moments_dtype": "fp32", "w_dtype": "fp32"}


def resolve(memory: str, overrides: dict, accelerator: bool, candidates: float | None = None) -> dict:
    """The memory options of a run: the preset of `memory` (for a candidate-restricted L0 stage, lean
    keeps the optimiser step after backward, see `LEAN`), then every option given explicitly."""
    if memory not in MEMORY_MODES:
        raise ConfigError(f"--memory {memory!r} is not one of {', '.join(MEMORY_MODES)}")
    opts = dict(LEAN if memory == "lean" else STANDARD)
    if memory == "lean" and candidates is not None:
        opts["optimizer_in_backward"] = False
    opts.update({k: v for k, v in overrides.items() if v is not None})
    if opts["theta_dtype"] not in ("fp32", "bf16"):
        raise ConfigError(f"--theta-dtype {opts['theta_dtype']!r} is not one of fp32, bf16")
    if opts["alpha_dtype"] not in ("fp32", "bf16"):
        raise ConfigError(f"--alpha-dtype {opts['alpha_dtype']!r} is not one of fp32, bf16")
    if opts["w_dtype"] not in ("fp32", "bf16"):
        raise ConfigError(f"--w-dtype {opts['w_dtype']!r} is not one of fp32, bf16")
    if opts["moments_dtype"] not in MOMENTS:
        raise ConfigError(f"--moments-dtype {opts['moments_dtype']!r} is not one of {', '.join(MOMENTS)}")
    if opts["moments_dtype"] == "factored" and candidates is not None:
        raise ConfigError("--moments-dtype factored factors the dense L0 stage's matrices; a candidate L0 stage trains "
                          "vectors of candidates: use --moments-dtype bf16 with --candidates")
    if opts["theta_dtype"] == "bf16" and not accelerator:
        raise ConfigError(
            "--theta-dtype bf16 keeps the frozen weights in bfloat16, and bfloat16 matmuls on this CPU are about "
            "300x slower than float32: use --theta-dtype fp32 here (--memory lean does), or train on a GPU"
        )
    return opts


def _squared_norm(g: torch.Tensor) -> torch.Tensor:
    """sum(g**2) in fp32, block by block: no full-size temporary (a bf16 gradient is not cast whole, and
    fp32 `vector_norm` over tens of millions of entries is off by ~0.3% on CPU), as accurate as
    ``g.float().pow(2).sum()``."""
    flat = g.reshape(-1)
    block = blocks.size(flat.device)
    if flat.numel() <= block:
        return flat.float().pow(2).sum()
    return torch.stack([b.float().pow(2).sum() for b in flat.split(block)]).sum()


class OptimizerInBackward:
    """AdamW on every trainable tensor, stepped inside backward (see the module docstring).

    Duck-types what the training loop uses of an optimiser: ``param_groups`` (with ``lr`` and
    ``initial_lr``, read when each tensor is stepped), ``step()`` (ends the step: the norm for the next
    step's clipping), ``zero_grad()``, ``state_dict()`` / ``load_state_dict()`` in torch's format.
    """

    def __init__(self, groups: list[dict], max_grad_norm: float | None, **adamw):
        self.param_groups = groups
        self.max_grad_norm = max_grad_norm
        self._opts: dict[int, tuple[torch.optim.Optimizer, dict]] = {}
        self._handles = []
        self._order: list[torch.Tensor] = []
        index = 0
        for g in groups:
            settings = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
            for p in g["params"]:
                index += 1
                if not p.requires_grad:  # e.g. a tensor that kept no position after projection
                    continue
                opt = optim.AdamW([{"params": [p], **settings}], first_index=index - 1, **adamw)
                self._opts[id(p)] = (opt, g)
                self._order.append(p)
                self._handles.append(p.register_post_accumulate_grad_hook(self._step_tensor))
        self._coef = 1.0
        self._sq = None
        self.last_norm: float | None = None
        self.clipped_steps = 0
        self.steps = 0

    @torch.no_grad()
    def _step_tensor(self, p: torch.Tensor) -> None:
        opt, group = self._opts[id(p)]
        g = p.grad
        sq = _squared_norm(g)
        self._sq = sq if self._sq is None else self._sq + sq
        if self._coef < 1.0:
            g.mul_(self._coef)
        opt.param_groups[0]["lr"] = group["lr"]
        opt.step()
        p.grad = None

    def step(self) -> None:
        """After backward: every tensor has been stepped; this step's norm sets the next step's clipping."""
        self.steps += 1
        if self._sq is None:
            return
        norm = math.sqrt(float(self._sq))
        self._sq = None
        self.last_norm = norm
        if self.max_grad_norm is not None:
            if norm > self.max_grad_norm:
                self.clipped_steps += 1
            self._coef = min(1.0, self.max_grad_norm / (norm + 1e-6))

    @property
    def state(self) -> dict:
        """AdamW state per tensor (as `torch.optim.Optimizer.state`)."""
        return {p: self._opts[id(p)][0].state[p] for p in self._order if p in self._opts[id(p)][0].state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._order:
            p.grad = None

    def close(self) -> None:
        """Remove the hooks (end of a phase: the next phase trains other tensors)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        state, groups, i = {}, [], 0
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                ids.append(i)
                st = self._opts[id(p)][0].state.get(p) if id(p) in self._opts else None
                if st:
                    state[i] = dict(st)
                i += 1
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups,
                "in_backward": {"coef": self._coef, "clipped_steps": self.clipped_steps, "steps": self.steps}}

    def load_state_dict(self, sd: dict) -> None:
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                st = sd["state"].get(i, sd["state"].get(str(i)))
                if st and id(p) in self._opts:
                    opt = self._opts[id(p)][0]
                    opt.load_state_dict({"state": {0: st}, "param_groups": [
                        {**{k: v for k, v in opt.param_groups[0].items() if k != "params"}, "params": [0]}]})
                i += 1
        extra = sd.get("in_backward") or {}
        self._coef = float(extra.get("coef", 1.0))
        self.clipped_steps = int(extra.get("clipped_steps", 0))
        self.steps = int(extra.get("steps", 0))
