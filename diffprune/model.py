"""`DiffModel`: wraps any PyTorch / transformers model, freezes it, and learns a sparse diff.

Stages (``DiffModel.stage``):

* ``"l0"``    — dense w and gate logits alpha per diffed tensor; delta = z * w with hard-concrete
                gates z (times a group gate when structured); training adds lambda * E[||delta||_0]
                to the model's loss. With ``use_gates=False`` delta = w (the dense, non-adaptive
                baseline) and no penalty is added.
* ``"fixed"`` — after `project()`: only the kept positions are stored (int64 positions and a
                value vector per tensor), so the optimiser holds state for the nonzeros alone
                and the other entries are exactly zero by construction.

With ``config.candidates = c`` the L0 stage is restricted to c * n candidate entries chosen by an
importance warm-up (`set_candidates`): w and alpha exist only there (indices and values, memory
O(c * n)), and projection picks the budget among them.

Each module that owns a diffed tensor computes theta + delta when it runs (`diffprune.layers`), so
the effective weight of a layer lives only as long as that layer's activations (or, with
``recompute_weights``, only while its forward and backward run), activation checkpointing works,
and `generate` sees the diff. The model's own weights are never modified until
`merge_and_unload()`.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from torch import nn
from . import apply as engine
from . import gates
from . import layers
from .config import DiffPruningConfig
from .diff_file import SparseDiff
from .errors import BaseModelMismatchError, ConfigError, DiffFileError, DiffModeError
from .fingerprint import model_fingerprint
from .projection import global_topk_positions
from .sharding import assign, full, new_state, whole

_SUBCLASSES: dict[type, type] = {}


def _slot_key(name: str) -> str:
    # Module names may not contain dots.
    return name.replace(".", "-")


def _wrapped_class(model_cls: type) -> type:
    """A DiffModel subclass whose `forward` advertises the wrapped class's signature.

    The HF Trainer reads label and input names from ``type(model).forward``; this makes a
    DiffModel look like the model it wraps there, with no subclassing by the user.
    """
    sub = _SUBCLASSES.get(model_cls)
    if sub is None:
        name = "DiffModel_" + re.sub(r"\W", "_", model_cls.__qualname__)

        def forward(self, *args, **kwargs):
            return DiffModel.forward(self, *args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(model_cls.forward)
        except (TypeError, ValueError):
            pass
        forward.__doc__ = DiffModel.forward.__doc__
        sub = type(name, (DiffModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})
        _SUBCLASSES[model_cls] = sub
    return sub


def _checkpointing(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


ALPHA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tensor_seed(base_seed: int, i: int) -> int:
    """The gate-noise seed of the i-th diffed tensor in a step whose base seed is `base_seed`."""
    return (base_seed + i * 2_654_435_761) % (2**63 - 2_000_000)


def _fused_supported(params) -> bool:
    """Whether torch's fused Adam(W) step accepts every one of `params` (device and dtype)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError):
        return False
    ok_dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return bool(params) and all(p.device.type in devices and p.dtype in ok_dtypes for p in params)


class _L0Slot(nn.Module):
    """Trainable diff state of one tensor in the L0 stage."""

    def __init__(self, theta: torch.Tensor, config: DiffPruningConfig, shape=None):
        super().__init__()
        shape = theta.shape if shape is None else shape
        dtype = theta.dtype if theta.dtype in (torch.float32, torch.float64) else torch.float32
        a_dtype = ALPHA_DTYPES[config.alpha_dtype] if dtype == torch.float32 else dtype
        w_dtype = ALPHA_DTYPES[config.w_dtype] if dtype == torch.float32 and config.use_gates else dtype
        # (beside sharded weights, born sharded: `diffprune.sharding.new_state`)
        self.w = nn.Parameter(new_state(shape, 0.0, w_dtype, theta))
        if config.use_gates:
            self.alpha = nn.Parameter(new_state(shape, config.alpha_init, a_dtype, theta))
        else:
            self.register_parameter("alpha", None)
        if config.use_gates and config.structured:
            self.alpha_group = nn.Parameter(new_state((), config.alpha_init, a_dtype, theta))
        else:
            self.register_parameter("alpha_group", None)


class _CandidateSlot(_L0Slot):
    """L0 state on a tensor's candidate entries only: their flat positions (sorted) and w, alpha there.

    The positions are int32 wherever the tensor has fewer than 2^31 entries (every tensor of today's
    models; int64 beyond): 4 bytes a candidate, as much as its w, instead of 8. The ops that take them
    (`index_select`, `index_put`, the CSR of `csr`) accept int32; checkpoints written with int64
    positions load into either."""

    def __init__(self, theta: torch.Tensor, config: DiffPruningConfig, candidates: torch.Tensor):
        super().__init__(theta, config, shape=(int(candidates.numel()),))
        dtype = engine.position_dtype(theta.numel())
        self.register_buffer("candidates", candidates.to(device=theta.device, dtype=dtype))
        self._csr = None

    def csr(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates as (crow, col) of a CSR matrix of `shape`, rebuilt when the buffer changes (a
        move to another device, a checkpoint loaded in place)."""
        c = self.candidates
        key = (c.device, c.data_ptr(), c._version, shape)
        if self._csr is None or self._csr[0] != key:
            self._csr = (key, layers.csr_of(c, shape))
        return self._csr[1]


class _FixedSlot(nn.Module):
    """Kept positions (flat, sorted) and their trainable values, after projection."""

    def __init__(self, positions: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.register_buffer("positions", positions.to(torch.int64))
        self.values = nn.Parameter(values)


def _whole_or_none(t):
    return None if t is None else whole(t)


def budget(target_sparsity: float, n_diffed: int) -> int:
    """The number of entries projection keeps: round(t * n), which must be at least 1."""
    k = round(target_sparsity * n_diffed)
    if k < 1:
        raise ConfigError(
            f"target_sparsity={target_sparsity:g} keeps round({target_sparsity:g} * {n_diffed:,}) = 0 of the "
            f"{n_diffed:,} diffed entries: raise it to at least {1 / n_diffed:.3g} (--target-sparsity)"
        )
    return k


class DiffModel(nn.Module):
    """A frozen model plus a learned, sparse, task-specific diff.

    ``DiffModel(model, config)`` freezes `model`'s weights; its parameters are the diff state and
    the (densely trained) task head. ``forward`` takes the wrapped model's arguments.
    """

    def __new__(cls, model: nn.Module | None = None, *args, **kwargs):
        if cls is DiffModel and isinstance(model, nn.Module):
            cls = _wrapped_class(type(model))
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: DiffPruningConfig | None = None, *, _allocate: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"DiffModel wraps an nn.Module, got {type(model).__name__}")
        config = config if config is not None else DiffPruningConfig()
        config.validate()
        self.model = model
        self.config = config
        self.diff_names: list[str] = []
        self.head_names: list[str] = []
        for name, p in model.named_parameters():
            role = config.role_of(name)
            if role == "diff" and not p.is_floating_point():
                role = "frozen"
            if role == "diff":
                self.diff_names.append(name)
            elif role == "head":
                self.head_names.append(name)
            p.requires_grad_(role == "head")
        if not self.diff_names:
            raise ConfigError(
                f"no parameters left to diff in {type(model).__name__}: every parameter is head or frozen "
                f"(head_parameters={config.head_parameters}, frozen_parameters={config.frozen_parameters}, "
                f"diff_parameters={config.diff_parameters}); loosen those patterns"
            )
        self.base_fingerprint = model_fingerprint(model, config)
        params = dict(model.named_parameters())
        self.n_diffed = sum(params[n].numel() for n in self.diff_names)
        budget(config.target_sparsity, self.n_diffed)  # a budget of 0 entries fails here, not after the L0 stage
        self._unloaded = False
        self.slots = nn.ModuleDict()
        self._stage = "l0"
        if config.candidates is not None:
            # (config.validate() refused candidates < target_sparsity, so round(c n) >= the budget)
            self._stage = "warmup"  # no L0 state until `set_candidates`
        elif _allocate:
            self.allocate_l0_state()
        self._index = {n: i for i, n in enumerate(self.diff_names)}
        self._step: layers.Step | None = None
        self.step_seed: int | None = None  # the next training forward's gate-noise seed (else drawn; see _new_step)
        self.sharded = False  # `diffprune.sharding.shard` was applied
        self._wiring_checked = False
        self._injector = layers.Injector(self, model, self.diff_names)
        self._concrete_cache = gates.ConcreteCache()  # a recompute's gate sample, for its backward
        self._fused_gates = None  # `compile_gates`
        # the candidate L0 stage's gates in one pass per step (False: per tensor, the reference in tests)
        self.batched_gates = True

    def allocate_l0_state(self) -> None:
        """The L0 stage's w and alpha for every diffed tensor (the constructor does this unless told not to:
        `diffprune.sharding.shard` calls it once the weights are sharded, and the state is born sharded)."""
        if self._stage != "l0" or len(self.slots):
            raise DiffModeError(f"allocate_l0_state() builds a fresh L0 stage; this model is in stage {self._stage} "
                                f"with {len(self.slots)} tensors of diff state")
        params = dict(self.model.named_parameters())
        for name in self.diff_names:
            self.slots[_slot_key(name)] = _L0Slot(params[name], self.config)

    # ---- introspection ----------------------------------------------------------------------
    @property
    def stage(self) -> str:
        """"warmup" (candidates not chosen yet), "l0" or "fixed"."""
        return self._stage

    def _theta(self) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.diff_names}

    def _slot(self, name: str) -> nn.Module:
        return self.slots[_slot_key(name)]

    @property
    def config_json(self) -> str:
        return self.config.to_json()

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def recompute_weights(self) -> bool:
        """Recompute each layer's theta + delta in its backward instead of keeping it (`diffprune.layers`)."""
        return self._injector.recompute

    @recompute_weights.setter
    def recompute_weights(self, value: bool) -> None:
        self._injector.recompute = bool(value)

    @property
    def compile_gates(self) -> bool:
        """Run the dense L0 stage's gate arithmetic as compiled kernels (`gates.FusedGates`, `--compile-gates`):
        one pass per block forward and one backward instead of a dozen, the same values up to float rounding."""
        return self._fused_gates is not None

    @compile_gates.setter
    def compile_gates(self, value: bool) -> None:
        c = self.config
        self._fused_gates = gates.fused_gates(c.stretch_l, c.stretch_r) if value else None

    @property
    def sampled_candidate_grad(self) -> bool:
        """In the candidate L0 stage, give nn.Linear weights their gradient at the candidates only, by a
        sampled matmul (`layers.SampledWeightGrad`), rather than forming the dense weight gradient and
        gathering it: the same gradients up to float summation order. None (the default): on the CPU
        only, where it is measured faster (bert-base 8 x 128: the candidate step 0.81x the time)."""
        return self._injector.sampled_grad

    @sampled_candidate_grad.setter
    def sampled_candidate_grad(self, value: bool | None) -> None:
        self._injector.sampled_grad = None if value is None else bool(value)

    def checkpointing(self) -> bool:
        """Whether the wrapped model has activation checkpointing on."""
        return _checkpointing(self.model)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """The wrapped model's activation checkpointing (transformers), non-reentrant by default."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if not hasattr(self.model, "gradient_checkpointing_enable"):
            raise DiffModeError(
                f"{type(self.model).__name__} has no gradient_checkpointing_enable(): wrap its blocks in "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself"
            )
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ---- the diff ---------------------------------------------------------------------------
    def _gated_w(self, name: str, gate) -> torch.Tensor:
        """gate(alpha) * w, times gate(alpha_group) when structured; w itself without gates (over the
        tensor, or over its candidate entries)."""
        slot, c = self._slot(name), self.config
        if slot.alpha is None:
            return whole(slot.w)
        out = gate(whole(slot.alpha).float(), c.stretch_l, c.stretch_r) * whole(slot.w)
        if slot.alpha_group is not None:
            out = out * gate(whole(slot.alpha_group).float(), c.stretch_l, c.stretch_r)
        return out

    def _delta_l0_eval(self, name: str) -> torch.Tensor:
        """The L0 stage's deterministic delta of `name`, dense."""
        d = self._gated_w(name, gates.deterministic_gate)
        slot = self._slot(name)
        if isinstance(slot, _CandidateSlot):
            t = self._theta_of(name)
            return engine.put(torch.zeros(t.numel(), dtype=d.dtype, device=d.device), slot.candidates, d).view(t.shape)
        return d

    def _theta_of(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name)

    def current_step(self) -> layers.Step:
        """The step the hooks compute theta + delta for (the last forward's, or a deterministic one)."""
        if self._step is None:
            self._step = self._new_step(with_l0=False)
        return self._step

    def _new_step(self, with_l0: bool) -> layers.Step:
        sampling = self.training and self.config.use_gates and self._stage == "l0"
        seed = None
        if sampling:  # the seed the loop set for this step (the same on every process under FSDP), else drawn
            seed = self.step_seed if self.step_seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self.step_seed = None
        return layers.Step(seed=seed, with_l0=with_l0 and sampling)

    def effective(self, name: str, step: layers.Step, for_recompute: bool = False) -> torch.Tensor:
        """theta + delta of one diffed tensor for `step` (its module's hook calls this).

        Training (a step with a seed): hard-concrete gates drawn from the seed of this tensor in this
        step, and, the first time the tensor runs in the step with autograd on, its penalised gate
        count from the same fused pass (`gates.gated_diff_and_l0`). Otherwise deterministic gates,
        or after projection theta plus the kept values.
        """
        t = self._theta_of(name)
        if self._stage == "warmup":
            return t
        slot = self._slot(name)
        if self._stage == "fixed":
            if not slot.positions.numel():
                return t
            # differentiable w.r.t. the kept values (they train in this stage)
            return engine.add(t.reshape(-1), slot.positions, whole(slot.values)).view_as(t)
        cand = slot.candidates if isinstance(slot, _CandidateSlot) else None
        base = engine.gather(t.reshape(-1), cand) if cand is not None else t
        out = self._l0_values(name, step, slot, base, for_recompute)
        if cand is not None:
            out = engine.put(t.reshape(-1), cand, out).view_as(t)
        return out

    def sampled_effective(self, name: str, step: layers.Step) -> tuple | None:
        """For a candidate-restricted matrix in a training step of the L0 stage: (theta + delta as a
        plain tensor outside autograd, theta + delta at the candidates with its autograd graph, the
        candidates' flat positions, their (crow, col)); None in every other case. The module hook that asks for it
        (`layers`) computes the weight's gradient at the candidates only (a sampled matmul), instead
        of the dense gradient of the whole matrix that would then be gathered."""
        found = self._candidate_matrix(name, step)
        if found is None:
            return None
        t, slot, vals = found
        cand = slot.candidates
        with torch.no_grad():
            eff = engine.put(t.reshape(-1), cand, vals.detach().to(t.dtype)).view_as(t)
        return eff, vals, cand, slot.csr(tuple(t.shape))

    def _candidate_matrix(self, name: str, step: layers.Step) -> tuple | None:
        """(theta, slot, theta + delta at the candidates with its graph) of a candidate-restricted matrix
        in a training step of the L0 stage; None for anything else."""
        if self._stage != "l0" or step.seed is None:
            return None
        slot = self._slot(name)
        t = self._theta_of(name)
        if not isinstance(slot, _CandidateSlot) or t.dim() != 2:
            return None
        return t, slot, self._l0_values(name, step, slot, engine.gather(t.reshape(-1), slot.candidates), False)

    def sampled_rows(self, name: str, step: layers.Step, ids: torch.Tensor) -> tuple | None:
        """For a candidate-restricted matrix looked up by rows (an nn.Embedding, `ids` its input) in a
        training step of the L0 stage: theta + delta of the distinct ids' rows only, as a plain
        (rows, dim) tensor outside autograd; theta + delta at all the tensor's candidates with its
        autograd graph; which of those lie in the rows (their indices into the candidates, local row,
        column); the sorted distinct ids and each id's index among them. None in every other case. The
        module hook (`layers`) looks the batch up in these rows and passes the rows' gradient to the
        candidates in them (`SampledRowsGrad`): neither the full (vocabulary, dim) effective weight nor
        its dense gradient is formed."""
        if ids.is_floating_point() or ids.is_complex():
            return None
        found = self._candidate_matrix(name, step)
        if found is None:
            return None
        t, slot, vals = found
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        crow, col = slot.csr(tuple(t.shape))
        sel, local = layers.candidates_in_rows(crow, rows)
        col = col.index_select(0, sel).long()
        with torch.no_grad():
            eff = t.index_select(0, rows)
            eff[local, col] = vals.detach().index_select(0, sel).to(t.dtype)
        return eff, vals, sel, local, col, rows, inverse

    def gated_rows(self, name: str, step: layers.Step, ids: torch.Tensor) -> tuple | None:
        """For a matrix with dense L0 state looked up by rows (an nn.Embedding, `ids` its input) in a
        training step of the L0 stage on the CPU: (theta + delta of the distinct ids' rows, with its
        autograd graph, `gates.GatedRows`; the sorted distinct ids; each id's index among them), adding
        the tensor's L0 term as `effective` does; None in every other case. The module looks the batch
        up in these rows: the gates run at those rows only, not over the whole (vocabulary, dim) tensor
        twice a step."""
        if self._stage != "l0" or step.seed is None or self.sharded or ids.is_floating_point() or ids.is_complex():
            return None
        slot, t = self._slot(name), self._theta_of(name)
        if (not isinstance(slot, _L0Slot) or isinstance(slot, _CandidateSlot) or slot.alpha is None or t.dim() != 2
                or t.device.type != "cpu"):
            return None
        c = self.config
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        with_l0 = step.with_l0 and torch.is_grad_enabled()
        eff, e = gates.GatedRows.apply(t.index_select(0, rows), slot.w, slot.alpha, slot.alpha_group, rows,
                                       _tensor_seed(step.seed, self._index[name]), c.stretch_l, c.stretch_r, with_l0,
                                       self._fused_gates)
        if with_l0 and name not in step.penalised:
            step.add_l0(name, gates.with_group_term(e, slot.alpha_group, c.stretch_l, c.stretch_r, c.group_penalty))
        return eff, rows, inverse

    def _bankable(self) -> bool:
        """Whether this L0 stage's gates can run as one pass (`_candidate_bank`): candidates on every
        tensor, gates, one weight dtype, not sharded."""
        if self._stage != "l0" or not self.config.use_gates or self.sharded or not len(self.slots):
            return False
        if not all(isinstance(s, _CandidateSlot) for s in self.slots.values()):
            return False
        return len({self._theta_of(n).dtype for n in self.diff_names}) == 1

    def _candidate_bank(self, step: layers.Step) -> dict[str, torch.Tensor]:
        """theta + delta at every tensor's candidates for `step`, in one pass over all of them
        (`gates.GatedSegments`: values equal to the per-tensor ones), and with it the step's whole L0
        term; per tensor, a view of the one values tensor (4 bytes a candidate, for the step)."""
        c, names = self.config, self.diff_names
        slots = [self._slot(n) for n in names]
        meta = ([self._theta_of(n).reshape(-1) for n in names], [s.candidates for s in slots],
                [_tensor_seed(step.seed, self._index[n]) for n in names], c.stretch_l, c.stretch_r,
                step.with_l0)
        groups = [s.alpha_group for s in slots] if c.structured else []
        values, sums = gates.GatedSegments.apply(meta, *[s.w for s in slots], *[s.alpha for s in slots], *groups)
        if step.with_l0:
            step.l0 = gates.segments_gate_count(sums, groups or None, c.stretch_l, c.stretch_r, c.group_penalty)
            step.penalised.update(names)
        return dict(zip(names, values.split([int(s.candidates.numel()) for s in slots])))

    def _l0_values(self, name: str, step: layers.Step, slot, base: torch.Tensor, for_recompute: bool) -> torch.Tensor:
        """base + z * w over the slot's entries (the whole tensor or its candidates) for `step`, adding
        the tensor's L0 term to the step the first time it runs with autograd on."""
        c = self.config
        if step.bank is not None and name in step.bank:  # (its L0 term was counted with the bank)
            return step.bank[name]
        if step.seed is not None:
            seed = _tensor_seed(step.seed, self._index[name])
            # with recomputed weights, the recompute leaves its gate sample for the gates' backward
            cache = self._concrete_cache if self.recompute_weights else None
            if step.with_l0 and not for_recompute and torch.is_grad_enabled():
                # the same ops every time the tensor runs in the step (a checkpointed block's recompute
                # must save what its first run saved); the term is counted once
                out, e = gates.gated_diff_and_l0(base, whole(slot.w), whole(slot.alpha), _whole_or_none(slot.alpha_group),
                                                 seed, c.stretch_l, c.stretch_r, c.group_penalty, cache,
                                                 self._fused_gates)
                if name not in step.penalised:
                    step.add_l0(name, e)
            else:
                out = gates.gated_diff(base, whole(slot.w), whole(slot.alpha), _whole_or_none(slot.alpha_group), seed,
                                       c.stretch_l, c.stretch_r, cache, fill=for_recompute, fused=self._fused_gates)
        else:
            out = base + self._gated_w(name, gates.deterministic_gate).to(base.dtype)
        return out

    @torch.no_grad()
    def delta(self) -> dict[str, torch.Tensor]:
        """The current diff, dense, one tensor per diffed parameter (deterministic gates)."""
        theta = self._theta()
        if self._stage == "warmup":
            return {name: torch.zeros_like(t) for name, t in theta.items()}
        if self._stage == "fixed":
            out = {}
            for name, t in theta.items():
                slot = self._slot(name)
                d = torch.zeros(t.shape, dtype=slot.values.dtype, device=t.device)
                d.view(-1)[slot.positions] = full(slot.values)
                out[name] = d
            return out
        return {name: self._delta_l0_eval(name).detach().clone() for name in theta}

    def expected_l0(self) -> torch.Tensor:
        """E[||delta||_0], differentiable w.r.t. the gate logits (the count of entries in fixed stage)."""
        return self._gate_count("expected_l0")

    def _gate_count(self, group_penalty: str, names=None) -> torch.Tensor:
        device = next(iter(self._theta().values())).device
        if self._stage == "fixed":
            return torch.tensor(float(self.nnz()), device=device)
        if self._stage == "warmup":
            return torch.tensor(0.0, device=device)
        if not self.config.use_gates:
            return torch.tensor(float(self.n_diffed), device=device)
        c = self.config
        total = torch.zeros((), device=device)
        for name in self.diff_names if names is None else names:
            slot = self._slot(name)
            total = total + gates.expected_nonzeros(whole(slot.alpha).float(), None if slot.alpha_group is None
                                                    else whole(slot.alpha_group).float(), c.stretch_l, c.stretch_r,
                                                    group_penalty)
        return total

    def l0_penalty(self) -> torch.Tensor:
        """What training mode adds to the model's loss (0 without gates): l0_lambda * E[||delta||_0],
        or with ``group_penalty="per_gate"`` l0_lambda * (sum_i P(z_i) + sum_g P(z_g))."""
        if self._stage != "l0" or not self.config.use_gates:
            return torch.zeros((), device=next(iter(self._theta().values())).device)
        return self.config.l0_lambda * self._gate_count(self.config.group_penalty)

    @torch.no_grad()
    def expected_density(self) -> float:
        """E[||delta||_0] / number of diffed entries, as a float."""
        return float(self.expected_l0()) / self.n_diffed

    @torch.no_grad()
    def nnz(self) -> int:
        """Nonzero entries of delta now (fixed stage: the number of kept positions)."""
        if self._stage == "fixed":
            return sum(int(self._slot(n).positions.numel()) for n in self.diff_names)
        if self._stage == "warmup":
            return 0
        return sum(int((self._gated_w(n, gates.deterministic_gate) != 0).sum()) for n in self.diff_names)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the wrapped model on theta + delta; in training adds the L0 penalty to `loss`."""
        if self._unloaded:
            raise DiffModeError("merge_and_unload() was called: use the model it returned")
        c = self.config
        penalised = self.training and self._stage == "l0" and c.use_gates and c.l0_lambda > 0
        step = self._step = self._new_step(with_l0=penalised)
        if step.seed is not None and self.batched_gates and torch.is_grad_enabled() and self._bankable():
            step.bank = self._candidate_bank(step)
        outputs = self.model(*args, **kwargs)
        if penalised:
            loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
            if loss is not None:
                # == loss + self.l0_penalty(): tensors whose module ran with autograd on brought their
                # term from the gates' fused pass; the rest (a module that did not run, or ran under
                # no_grad inside a reentrant checkpoint) are counted here
                rest = [n for n in self.diff_names if n not in step.penalised]
                total = step.l0
                if rest:
                    extra = self._gate_count(c.group_penalty, rest)
                    total = extra if total is None else total + extra
                outputs["loss"] = loss + c.l0_lambda * total
            step.l0 = None  # the graph goes with the loss, not with the model
        if self.training and not self._wiring_checked:
            self._wiring_checked = True
            self._check_wiring(step)
        return outputs

    def _check_wiring(self, step: layers.Step) -> None:
        missing = [n for n in self.diff_names if n not in step.ran]
        if missing and self._stage != "warmup":
            import warnings

            warnings.warn(
                f"{len(missing)} diffed parameters' modules did not run in the first training forward "
                f"({missing[:3]}...): if the model uses them anyway (read directly, not by calling the module "
                "that owns them), their diff has no effect; freeze them (frozen_parameters) if they are unused",
                stacklevel=3,
            )

    def generate(self, *args, **kwargs):
        """The wrapped model's `generate` on theta + delta.

        In eval mode after projection the diff is added to the weights in place for the call (the
        apply engine, bit-exact revert afterwards), so every decoding step runs at the base model's
        speed; otherwise each step's modules compute theta + delta as in forward."""
        if self._unloaded:
            raise DiffModeError("merge_and_unload() was called: use the model it returned")
        if self.training or self._stage != "fixed" or self.sharded:
            self._step = self._new_step(with_l0=False)
            return self.model.generate(*args, **kwargs)
        with self.merged():
            return self.model.generate(*args, **kwargs)

    def merged(self):
        """Context manager: the diff added to the wrapped model's weights in place (fixed stage), hooks
        off, and the exact base weights restored on exit."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            if self._stage != "fixed":
                raise DiffModeError("merged() needs the fixed-mask stage: call project() first")
            if self.sharded:
                raise DiffModeError("merged() writes into the weights, which FSDP shards: load the saved diff "
                                    "(DiffModel.from_pretrained) on an unsharded base instead")
            theta = self._theta()
            backup = {}
            prev = self._injector.enabled
            try:
                for name, t in theta.items():
                    slot = self._slot(name)
                    if slot.positions.numel():
                        backup[name] = engine.add_(engine.flat_view(t), slot.positions, slot.values)
                self._injector.enabled = False
                yield self.model
            finally:
                self._injector.enabled = prev
                for name, saved in backup.items():
                    engine.write_(engine.flat_view(theta[name]), self._slot(name).positions, saved)

        return ctx()

    # ---- optimisation helpers ------------------------------------------------------------------
    def param_groups(
        self, lr: float = 1e-5, alpha_lr: float = 0.1, head_lr: float | None = None, fused: bool | None = None,
        moments_dtype: str = "fp32",
    ) -> list[dict]:
        """AdamW parameter groups with the paper's split: lr for w / values, alpha_lr for gate logits.

        ``fused`` (default: wherever torch has the kernel for every parameter's device and dtype)
        sets ``"fused": True`` in each group, which selects PyTorch's fused AdamW / Adam step: the
        same update up to float rounding, and on CPU about 8x faster than the default per-tensor
        loop, which matters here because the L0 stage has two trainable entries (w, alpha) per
        diffed entry. ``fused=False`` leaves the groups without the key (the optimiser's default).

        ``moments_dtype`` (the L0 stage's, `--moments-dtype`): "bf16" keeps w's AdamW moments in bf16,
        "factored" keeps w's and alpha's first moments in bf16 and their second moments factored per
        matrix (`diffprune.factored`); both need `diffprune.optim.AdamW` (`optimizer` builds it), which
        reads the groups' ``state_dtype``.
        """
        from .lean import MOMENTS

        if moments_dtype not in MOMENTS:
            raise ConfigError(f"moments_dtype {moments_dtype!r} is not one of {', '.join(MOMENTS)}")
        if moments_dtype != "fp32" and self._stage != "l0":
            raise ConfigError(f"moments_dtype={moments_dtype!r} is for the L0 stage's w and alpha; this model is in "
                              f"stage {self._stage!r}: use moments_dtype='fp32'")
        diff, alphas = [], []
        for slot in self.slots.values():
            for pname, p in slot.named_parameters():
                (alphas if pname.startswith("alpha") else diff).append(p)
        head = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": diff, "lr": lr, "weight_decay": 0.0}]
        if moments_dtype != "fp32":
            groups[0]["state_dtype"] = moments_dtype
        if alphas:
            groups.append({"params": alphas, "lr": alpha_lr, "weight_decay": 0.0})
            if moments_dtype == "factored":  # (with bf16 moments alpha's follow its own dtype, `alpha_dtype`)
                groups[-1]["state_dtype"] = "factored"
        if head:
            groups.append({"params": head, "lr": head_lr if head_lr is not None else lr})
        if fused is None:
            fused = _fused_supported(diff + alphas + head)
        if fused:
            for group in groups:
                group["fused"] = True
        return groups

    def optimizer(
        self, lr: float = 1e-5, alpha_lr: float = 0.1, head_lr: float | None = None, moments_dtype: str = "fp32",
        in_backward: bool = False, max_grad_norm: float | None = 1.0, **adamw,
    ):
        """The AdamW that `diffprune train` steps this model with, for a loop of your own: over
        `param_groups` (same arguments), bf16 tensors and moments stepped in fp32 and rounded back
        stochastically (`diffprune.optim.AdamW`), weight decay 0 unless given. ``in_backward=True``
        (`--optimizer-in-backward`, part of `--memory lean`) steps each tensor inside backward as soon as
        its gradient is complete and frees it (`diffprune.lean.OptimizerInBackward`: ``step()`` then ends
        the step, clipping with the previous step's norm at `max_grad_norm`); otherwise clip as usual
        before ``step()``. Build a new one after `project()` (the fixed-mask stage trains other tensors),
        and with ``in_backward`` call the old one's ``close()`` first."""
        from . import lean, optim

        groups = self.param_groups(lr=lr, alpha_lr=alpha_lr, head_lr=head_lr, moments_dtype=moments_dtype)
        adamw = {"weight_decay": 0.0, **adamw}
        if in_backward:
            return lean.OptimizerInBackward(groups, max_grad_norm, **adamw)
        return optim.AdamW(groups, lr=lr, **adamw)

    # ---- candidates and projection ------------------------------------------------------------
    @torch.no_grad()
    def set_candidates(self, candidates: dict[str, torch.Tensor]) -> "DiffModel":
        """Start the candidate-restricted L0 stage on the given flat positions per diffed tensor
        (sorted, unique; see `diffprune.candidates.select`): w = 0 and alpha = alpha_init there."""
        if self._stage != "warmup":
            raise DiffModeError("set_candidates() runs once, after the importance warm-up and before the L0 stage")
        missing = sorted(set(self.diff_names) - set(candidates))
        if missing:
            raise ConfigError(f"candidates are missing for {missing[:5]}")
        params = dict(self.model.named_parameters())
        for name in self.diff_names:
            self.slots[_slot_key(name)] = _CandidateSlot(params[name], self.config, candidates[name])
        self._stage = "l0"
        return self

    @torch.no_grad()
    def project(self, target_sparsity: float | None = None) -> "DiffModel":
        """Keep exactly round(t * n) entries of delta by magnitude and switch to the fixed-mask stage.

        After this, only kept values (and the head) are trainable: build a new optimiser over
        ``[p for p in dm.parameters() if p.requires_grad]``.
        """
        if self._stage != "l0":
            raise DiffModeError(
                "the diff is already projected; project() runs once, after the L0 stage" if self._stage == "fixed"
                else "the candidates are not chosen yet: run the importance warm-up (set_candidates) first"
            )
        t = self.config.target_sparsity if target_sparsity is None else target_sparsity
        DiffPruningConfig(target_sparsity=t)  # validates the range with the standard message
        k = budget(t, self.n_diffed)
        # scores over each tensor's trainable entries (the whole tensor, or its candidates), computed one
        # tensor at a time: no model-sized temporary (`projection`)
        with torch.no_grad():
            chosen = global_topk_positions(self.diff_names, lambda n: self._delta_for_projection(n).abs(), k,
                                           tiebreak=self._expected_magnitude if self.config.use_gates else None)
            new_slots = nn.ModuleDict()
            for name in self.diff_names:
                sel = chosen[name]
                slot = self._slot(name)
                pos = slot.candidates[sel].long() if isinstance(slot, _CandidateSlot) else sel
                new_slots[_slot_key(name)] = _FixedSlot(pos, self._delta_for_projection(name).reshape(-1)[sel].clone())
        self.slots = new_slots
        self._stage = "fixed"
        self.config.target_sparsity = t
        return self

    @torch.no_grad()
    def _delta_for_projection(self, name: str) -> torch.Tensor:
        """The L0 stage's deterministic delta over a tensor's trainable entries (all, or its candidates)."""
        return self._gated_w(name, gates.deterministic_gate).detach()

    @torch.no_grad()
    def _expected_magnitude(self, name: str) -> torch.Tensor:
        """|w| * P(gate open) per trainable entry: how projection fills the budget when the L0 stage left
        fewer nonzero entries than it keeps (its deterministic gates are then exactly 0 there)."""
        return self._gated_w(name, gates.prob_nonzero).abs()

    # ---- export -------------------------------------------------------------------------------
    def to_sparse_diff(self, extra: dict | None = None) -> SparseDiff:
        if self._stage != "fixed":
            raise DiffModeError(
                "the diff is still dense (L0 stage): call project() before saving it as a sparse diff; "
                "for a training checkpoint use trainable_state_dict()"
            )
        theta = self._theta()
        params = dict(self.model.named_parameters())
        return SparseDiff(
            indices={n: self._slot(n).positions.detach().cpu() for n in self.diff_names},
            values={n: full(self._slot(n).values).cpu().clone() for n in self.diff_names},
            shapes={n: tuple(theta[n].shape) for n in self.diff_names},
            head={n: full(params[n]).cpu().clone() for n in self.head_names},
            config=self.config,
            base_fingerprint=self.base_fingerprint,
            n_diffed=self.n_diffed,
            extra=dict(extra or {}),
        )

    def save_pretrained(self, save_directory: str | Path, extra: dict | None = None,
                        value_dtype: str = "fp32") -> SparseDiff:
        """Write the sparse diff and head (``diff.safetensors``, ``diff_config.json``) atomically.

        `value_dtype`: how the diff values are stored: "fp32" (exact, default), "bf16", "fp16" or
        "int8" (per-block absmax scales); they load back as float32 either way."""
        sparse = self.to_sparse_diff(extra)
        sparse.save(save_directory, value_dtype=value_dtype)
        return sparse

    @classmethod
    def from_sparse_diff(cls, base_model: nn.Module, diff: SparseDiff, allow_base_mismatch: bool = False) -> "DiffModel":
        try:
            dm = cls(base_model, diff.config, _allocate=False)
        except ConfigError as e:
            raise DiffFileError(f"the diff's config does not fit this model: {e}") from e
        if not allow_base_mismatch and dm.base_fingerprint != diff.base_fingerprint:
            diff.check_base(base_model)  # raises with the full explanation
        if sorted(dm.diff_names) != sorted(diff.shapes):
            raise BaseModelMismatchError(
                "the model's diffed parameters differ from the diff's: "
                f"{sorted(set(dm.diff_names) ^ set(diff.shapes))[:5]}"
            )
        params = dict(base_model.named_parameters())
        diff._check_layout(params)
        positions = dict(engine.iter_positions(diff, dm.diff_names))  # decoded (lazily) from a loaded file
        for name in dm.diff_names:
            t = params[name]
            vals = diff.values[name].to(device=t.device)
            dm.slots[_slot_key(name)] = _FixedSlot(positions.pop(name).to(t.device), vals)
        dm._stage = "fixed"
        with torch.no_grad():
            for name, t in diff.head.items():
                params[name].copy_(t)
        return dm.eval()

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | Path, allow_base_mismatch: bool = False) -> "DiffModel":
        """Load a diff saved by `save_pretrained` onto `base_model` (which must be its base)."""
        return cls.from_sparse_diff(base_model, SparseDiff.load(path), allow_base_mismatch)

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Write theta + delta into the wrapped model's weights and return it as a plain model."""
        if self._unloaded:
            raise DiffModeError("merge_and_unload() was already called")
        if self.sharded:
            raise DiffModeError("merge_and_unload() of a model FSDP shards: load the saved diff "
                                "(DiffModel.from_pretrained) on an unsharded base, then merge")
        theta = self._theta()
        if self._stage == "fixed":
            for name, t in theta.items():
                slot = self._slot(name)
                if slot.positions.numel():
                    engine.add_(t.data.view(-1), slot.positions, slot.values, backup=False)
        elif self._stage == "l0":  # dense diff: one tensor's delta at a time
            for name, t in theta.items():
                t.data.add_(self._delta_l0_eval(name).detach().to(t.dtype))
        self._injector.remove()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self._unloaded = True
        return self.model

    # ---- training checkpoints --------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything training changes (diff state of either stage, head), for checkpoints."""
        state = {f"slots.{k}": full(v) for k, v in self.slots.state_dict().items()}  # gathered when sharded
        params = dict(self.model.named_parameters())
        state.update({f"head.{n}": full(params[n]) for n in self.head_names})
        return {k: v.contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `trainable_state_dict()` output, switching to the stage it was saved in."""
        params = dict(self.model.named_parameters())

        def get(n, key):
            return state[f"slots.{_slot_key(n)}.{key}"].to(params[n].device)

        if any(k.endswith(".positions") for k in state):
            self.slots = nn.ModuleDict({_slot_key(n): _FixedSlot(get(n, "positions"), get(n, "values").clone())
                                        for n in self.diff_names})
            self._stage = "fixed"
        elif any(k.endswith(".candidates") for k in state):
            self.slots = nn.ModuleDict({_slot_key(n): _CandidateSlot(params[n], self.config, get(n, "candidates"))
                                        for n in self.diff_names})
            self._stage = "l0"
            slot_state = {k[len("slots."):]: v for k, v in state.items() if k.startswith("slots.")}
            self.slots.load_state_dict(slot_state)
        elif any(k.startswith("slots.") for k in state):
            if self._stage != "l0":
                raise DiffModeError("this checkpoint holds a dense L0 state; the model is in stage " + self._stage)
            slot_state = {k[len("slots."):]: v for k, v in state.items() if k.startswith("slots.")}
            if self.sharded:  # each process keeps its shard of the full tensors the checkpoint holds
                for key, p in self.slots.named_parameters():
                    assign(p, slot_state[key])
            else:
                self.slots.load_state_dict(slot_state)
        for n in self.head_names:
            assign(params[n], state[f"head.{n}"])
