"""`DiffModel`: wraps any PyTorch / transformers model, freezes it, and learns a sparse diff.

Stages (``DiffModel.stage``):

* ``"l0"``    — dense w and gate logits alpha per diffed tensor; delta = z * w with hard-concrete
                gates z (times a group gate when structured); training adds lambda * E[||delta||_0]
                to the model's loss. With ``use_gates=False`` delta = w (the dense, non-adaptive
                baseline) and no penalty is added.
* ``"fixed"`` — after `project()`: only the kept positions are stored (int64 positions and a
                value vector per tensor), so the optimiser holds state for the nonzeros alone
                and the other entries are exactly zero by construction.

The wrapped model is called with ``torch.func.functional_call`` on theta + delta, so its own
modules and weights are never modified until `merge_and_unload()`.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from . import apply as engine
from . import gates
from .config import DiffPruningConfig
from .diff_file import SparseDiff
from .errors import BaseModelMismatchError, ConfigError, DiffFileError, DiffModeError
from .fingerprint import model_fingerprint
from .projection import global_topk_positions

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

    def __init__(self, theta: torch.Tensor, config: DiffPruningConfig):
        super().__init__()
        dtype = theta.dtype if theta.dtype in (torch.float32, torch.float64) else torch.float32
        self.w = nn.Parameter(torch.zeros(theta.shape, dtype=dtype, device=theta.device))
        if config.use_gates:
            self.alpha = nn.Parameter(torch.full(theta.shape, config.alpha_init, dtype=dtype, device=theta.device))
        else:
            self.register_parameter("alpha", None)
        if config.use_gates and config.structured:
            self.alpha_group = nn.Parameter(torch.tensor(config.alpha_init, dtype=dtype, device=theta.device))
        else:
            self.register_parameter("alpha_group", None)


class _FixedSlot(nn.Module):
    """Kept positions (flat, sorted) and their trainable values, after projection."""

    def __init__(self, positions: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.register_buffer("positions", positions.to(torch.int64))
        self.values = nn.Parameter(values)


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
        if _allocate:
            for name in self.diff_names:
                self.slots[_slot_key(name)] = _L0Slot(params[name], config)

    # ---- introspection ----------------------------------------------------------------------
    @property
    def stage(self) -> str:
        if not self.slots:
            return "fixed"
        return "fixed" if isinstance(next(iter(self.slots.values())), _FixedSlot) else "l0"

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

    # ---- the diff ---------------------------------------------------------------------------
    def _gated_w(self, name: str, gate) -> torch.Tensor:
        """gate(alpha) * w, times gate(alpha_group) when structured; w itself without gates."""
        slot, c = self._slot(name), self.config
        if slot.alpha is None:
            return slot.w
        out = gate(slot.alpha, c.stretch_l, c.stretch_r) * slot.w
        if slot.alpha_group is not None:
            out = out * gate(slot.alpha_group, c.stretch_l, c.stretch_r)
        return out

    def _delta_l0_eval(self, name: str) -> torch.Tensor:
        return self._gated_w(name, gates.deterministic_gate)

    def _effective_parameters(self, with_l0: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """theta + delta per diffed name, and (with_l0, L0 stage with gates) the penalised gate count
        (E[||delta||_0] unless ``group_penalty="per_gate"``, see `l0_penalty`).

        In training the expected L0 comes out of the same fused pass as the sampled gates
        (`gates.gated_diff_and_l0`), so the penalty costs no separate full-size pass or tensor.
        """
        c = self.config
        theta = self._theta()
        out = {}
        if self.stage == "fixed":
            for name, t in theta.items():
                slot = self._slot(name)
                if slot.positions.numel():
                    # differentiable w.r.t. the kept values (they train in this stage)
                    out[name] = engine.add(t.reshape(-1), slot.positions, slot.values).view_as(t)
            return out, None
        sampling = self.training and c.use_gates
        with_l0 = with_l0 and sampling
        base_seed = int(torch.randint(0, 2**62, (1,)).item()) if sampling else 0
        total = None
        for i, (name, t) in enumerate(theta.items()):
            slot = self._slot(name)
            if sampling:
                seed = _tensor_seed(base_seed, i)
                if with_l0:
                    out[name], e = gates.gated_diff_and_l0(
                        t, slot.w, slot.alpha, slot.alpha_group, seed, c.stretch_l, c.stretch_r, c.group_penalty
                    )
                    total = e if total is None else total + e
                else:
                    out[name] = gates.gated_diff(t, slot.w, slot.alpha, slot.alpha_group, seed, c.stretch_l, c.stretch_r)
            else:
                out[name] = t + self._delta_l0_eval(name).to(t.dtype)
        return out, total

    @torch.no_grad()
    def delta(self) -> dict[str, torch.Tensor]:
        """The current diff, dense, one tensor per diffed parameter (deterministic gates)."""
        theta = self._theta()
        if self.stage == "fixed":
            out = {}
            for name, t in theta.items():
                slot = self._slot(name)
                d = torch.zeros(t.shape, dtype=slot.values.dtype, device=t.device)
                d.view(-1)[slot.positions] = slot.values
                out[name] = d
            return out
        return {name: self._delta_l0_eval(name).detach().clone() for name in theta}

    def expected_l0(self) -> torch.Tensor:
        """E[||delta||_0], differentiable w.r.t. the gate logits (the count of entries in fixed stage)."""
        return self._gate_count("expected_l0")

    def _gate_count(self, group_penalty: str) -> torch.Tensor:
        device = next(iter(self._theta().values())).device
        if self.stage == "fixed":
            return torch.tensor(float(self.nnz()), device=device)
        if not self.config.use_gates:
            return torch.tensor(float(self.n_diffed), device=device)
        c = self.config
        total = torch.zeros((), device=device)
        for name in self.diff_names:
            slot = self._slot(name)
            total = total + gates.expected_nonzeros(slot.alpha, slot.alpha_group, c.stretch_l, c.stretch_r, group_penalty)
        return total

    def l0_penalty(self) -> torch.Tensor:
        """What training mode adds to the model's loss (0 without gates): l0_lambda * E[||delta||_0],
        or with ``group_penalty="per_gate"`` l0_lambda * (sum_i P(z_i) + sum_g P(z_g))."""
        if self.stage == "fixed" or not self.config.use_gates:
            return torch.zeros((), device=next(iter(self._theta().values())).device)
        return self.config.l0_lambda * self._gate_count(self.config.group_penalty)

    @torch.no_grad()
    def expected_density(self) -> float:
        """E[||delta||_0] / number of diffed entries, as a float."""
        return float(self.expected_l0()) / self.n_diffed

    @torch.no_grad()
    def nnz(self) -> int:
        """Nonzero entries of delta now (fixed stage: the number of kept positions)."""
        if self.stage == "fixed":
            return sum(int(self._slot(n).positions.numel()) for n in self.diff_names)
        return sum(int((d != 0).sum()) for d in self.delta().values())

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the wrapped model on theta + delta; in training adds the L0 penalty to `loss`."""
        if self._unloaded:
            raise DiffModeError("merge_and_unload() was called: use the model it returned")
        if self.training and _checkpointing(self.model):
            raise DiffModeError(
                "gradient checkpointing recomputes activations outside DiffModel's forward, with the base "
                "weights instead of theta + delta; disable it (model.gradient_checkpointing_disable())"
            )
        c = self.config
        penalised = self.training and self.stage == "l0" and c.use_gates and c.l0_lambda > 0
        params, gate_count = self._effective_parameters(with_l0=penalised)
        outputs = functional_call(self.model, params, args, kwargs, tie_weights=True, strict=False)
        if penalised:
            loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
            if loss is not None:
                # == loss + self.l0_penalty(), its value and gradient computed in the gates' pass
                outputs["loss"] = loss + c.l0_lambda * gate_count
        return outputs

    # ---- optimisation helpers ------------------------------------------------------------------
    def param_groups(
        self, lr: float = 1e-5, alpha_lr: float = 0.1, head_lr: float | None = None, fused: bool | None = None
    ) -> list[dict]:
        """AdamW parameter groups with the paper's split: lr for w / values, alpha_lr for gate logits.

        ``fused`` (default: wherever torch has the kernel for every parameter's device and dtype)
        sets ``"fused": True`` in each group, which selects PyTorch's fused AdamW / Adam step: the
        same update up to float rounding, and on CPU about 8x faster than the default per-tensor
        loop, which matters here because the L0 stage has two trainable entries (w, alpha) per
        diffed entry. ``fused=False`` leaves the groups without the key (the optimiser's default).
        """
        diff, alphas = [], []
        for slot in self.slots.values():
            for pname, p in slot.named_parameters():
                (alphas if pname.startswith("alpha") else diff).append(p)
        head = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": diff, "lr": lr, "weight_decay": 0.0}]
        if alphas:
            groups.append({"params": alphas, "lr": alpha_lr, "weight_decay": 0.0})
        if head:
            groups.append({"params": head, "lr": head_lr if head_lr is not None else lr})
        if fused is None:
            fused = _fused_supported(diff + alphas + head)
        if fused:
            for group in groups:
                group["fused"] = True
        return groups

    # ---- projection ---------------------------------------------------------------------------
    @torch.no_grad()
    def project(self, target_sparsity: float | None = None) -> "DiffModel":
        """Keep exactly round(t * n) entries of delta by magnitude and switch to the fixed-mask stage.

        After this, only kept values (and the head) are trainable: build a new optimiser over
        ``[p for p in dm.parameters() if p.requires_grad]``.
        """
        if self.stage == "fixed":
            raise DiffModeError("the diff is already projected; project() runs once, after the L0 stage")
        t = self.config.target_sparsity if target_sparsity is None else target_sparsity
        DiffPruningConfig(target_sparsity=t)  # validates the range with the standard message
        k = budget(t, self.n_diffed)
        deltas = self.delta()
        positions = global_topk_positions(
            {n: d.abs() for n, d in deltas.items()}, k, tiebreak=self._expected_magnitudes
        )
        new_slots = nn.ModuleDict()
        for name in self.diff_names:
            pos = positions[name]
            new_slots[_slot_key(name)] = _FixedSlot(pos, deltas[name].reshape(-1)[pos].clone())
        self.slots = new_slots
        self.config.target_sparsity = t
        return self

    @torch.no_grad()
    def _expected_magnitudes(self) -> dict[str, torch.Tensor] | None:
        """|w| * P(gate open) per entry: how projection fills the budget when the L0 stage left
        fewer nonzero entries than it keeps (its deterministic gates are then exactly 0 there)."""
        if not self.config.use_gates:
            return None
        return {name: self._gated_w(name, gates.prob_nonzero).abs() for name in self.diff_names}

    # ---- export -------------------------------------------------------------------------------
    def to_sparse_diff(self, extra: dict | None = None) -> SparseDiff:
        if self.stage != "fixed":
            raise DiffModeError(
                "the diff is still dense (L0 stage): call project() before saving it as a sparse diff; "
                "for a training checkpoint use trainable_state_dict()"
            )
        theta = self._theta()
        params = dict(self.model.named_parameters())
        return SparseDiff(
            indices={n: self._slot(n).positions.detach().cpu() for n in self.diff_names},
            values={n: self._slot(n).values.detach().cpu().clone() for n in self.diff_names},
            shapes={n: tuple(theta[n].shape) for n in self.diff_names},
            head={n: params[n].detach().cpu().clone() for n in self.head_names},
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
        theta = self._theta()
        if self.stage == "fixed":
            for name, t in theta.items():
                slot = self._slot(name)
                if slot.positions.numel():
                    engine.add_(t.data.view(-1), slot.positions, slot.values, backup=False)
        else:  # dense diff: one tensor's delta at a time
            for name, t in theta.items():
                t.data.add_(self._delta_l0_eval(name).detach().to(t.dtype))
        for p in self.model.parameters():
            p.requires_grad_(True)
        self._unloaded = True
        return self.model

    # ---- training checkpoints --------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything training changes (diff state of either stage, head), for checkpoints."""
        state = {f"slots.{k}": v for k, v in self.slots.state_dict().items()}
        params = dict(self.model.named_parameters())
        state.update({f"head.{n}": params[n].detach() for n in self.head_names})
        return {k: v.detach().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `trainable_state_dict()` output, switching to the fixed stage if it was saved there."""
        fixed = any(k.endswith(".positions") for k in state)
        if fixed and self.stage != "fixed":
            params = dict(self.model.named_parameters())
            self.slots = nn.ModuleDict(
                {
                    _slot_key(n): _FixedSlot(
                        torch.zeros(0, dtype=torch.int64, device=params[n].device),
                        torch.zeros(0, device=params[n].device),
                    )
                    for n in self.diff_names
                }
            )
            for n in self.diff_names:
                slot = self._slot(n)
                slot.positions = state[f"slots.{_slot_key(n)}.positions"].to(params[n].device)
                slot.values = nn.Parameter(state[f"slots.{_slot_key(n)}.values"].to(params[n].device).clone())
        else:
            slot_state = {k[len("slots."):]: v for k, v in state.items() if k.startswith("slots.")}
            self.slots.load_state_dict(slot_state)
        params = dict(self.model.named_parameters())
        for n in self.head_names:
            params[n].copy_(state[f"head.{n}"])
