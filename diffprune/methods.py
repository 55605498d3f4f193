"""The registry of training methods: each says how it builds, trains, saves, loads and counts bytes.

    from diffprune.methods import METHODS, get_method
    m = get_method("structured")   # m.default_lr, m.phases(cfg), m.build(base, missing, cfg), ...

``diff``, ``structured`` and ``magnitude`` are `DiffMethod`s (a sparse diff; L0 or dense first phase,
projection, fixed-mask phase; ``diff.safetensors``); ``full`` saves a transformers checkpoint
(``model/``), ``lora`` a PEFT adapter (``adapter/``). Adding a method is one class and one entry in
`METHODS`; the training loop, the run directory, `load_run` and the model card ask the method.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, DiffPruneError

DIFF_FILE = "diff.safetensors"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"


class MethodError(DiffPruneError):
    """A method cannot be built or loaded (e.g. a missing optional package)."""


def _options(cfg) -> dict:
    """The memory options of a TrainConfig (`TrainConfig.memory_options`), standard ones without one."""
    from . import lean

    if cfg is None or not hasattr(cfg, "memory_options"):
        return dict(lean.STANDARD)
    return cfg.memory_options(accelerator=torch.cuda.is_available())


@dataclass
class Phase:
    name: str  # "l0" (first phase of the diff methods), "fixed" (after projection) or "train" (full / lora)
    epochs: int
    lr: float


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    """What the model card says the method is."""
    default_lr: float
    """Learning rate of the first phase when none is given (README, "Defaults that differ from the paper")."""
    artefact: str = ""
    """What the run directory holds: "diff" (diff.safetensors), "model" (model/) or "adapter" (adapter/)."""

    projects = False
    """Whether the method projects onto a budget between its phases (and so is scored after projection)."""

    def state_bytes_per_parameter(self, cfg=None) -> float:
        """Training state beyond the loaded fp32 model, per parameter: gradients and AdamW moments of
        what is trained (and for the diff methods w, the gate logits and the effective weights), with
        the memory options of `cfg` (a TrainConfig; None: the standard ones)."""
        opts = _options(cfg)
        return (0 if opts["optimizer_in_backward"] else 4) + 8  # full: a gradient and two moments per parameter

    # ---- training -----------------------------------------------------------------------------------
    def phases(self, cfg) -> list[Phase]:
        return [Phase("train", cfg.epochs, cfg.resolved_lr())]

    def build(self, base, missing: list[str], cfg, family=None):
        """The trainable model around a freshly loaded base (`missing`: its newly initialised parameters;
        `family`: the `diffprune.families.Family` of the run, None = classifier)."""
        raise NotImplementedError

    def param_groups(self, model, phase: Phase, cfg) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": phase.lr}]

    def optimizer(self, model, phase: Phase, cfg) -> torch.optim.Optimizer:
        groups = self.param_groups(model, phase, cfg)
        for g in groups:
            g["initial_lr"] = g["lr"]
        return torch.optim.AdamW(groups, lr=phase.lr, weight_decay=0.0)

    def start_phase(self, model, phase: Phase) -> None:
        """Called before a phase's optimiser is built."""

    # ---- the run directory -------------------------------------------------------------------------------
    def save(self, model, out: Path, tokenizer, extra: dict, cfg) -> dict:
        """Write the task's artefact into `out`; returns the counts the metrics report
        (nnz, trainable_parameters, task_parameters, total_parameters, and method-specific ones)."""
        raise NotImplementedError

    def stored_bytes(self, run_dir: Path) -> int:
        raise NotImplementedError

    def load(self, run_dir: Path, info: dict, allow_base_mismatch: bool = False):
        """(model, tokenizer) of a finished run, for eval, predict, merge and serving."""
        raise NotImplementedError


@dataclass(frozen=True)
class DiffMethod(Method):
    artefact: str = "diff"
    structured: bool = False
    use_gates: bool = True

    projects = True

    def phases(self, cfg) -> list[Phase]:
        return [Phase("l0", cfg.epochs, cfg.resolved_lr()), Phase("fixed", cfg.fixmask_epochs, cfg.fixmask_lr)]

    def state_bytes_per_parameter(self, cfg=None) -> float:
        # L0 stage: w and alpha, their gradients, four AdamW moments, and theta + delta while a step runs
        # (magnitude: no alpha). Lean options: no persistent gradients (optimizer in backward), alpha and
        # its moments in bf16, effective weights recomputed; candidates: that state (plus int64
        # positions) on the fraction c only, after a warm-up holding 2-byte scores for every entry.
        opts = _options(cfg)
        grads = 0 if opts["optimizer_in_backward"] else 1
        w = 4 * (1 + grads) + 8
        a = (2 if opts["alpha_dtype"] == "bf16" else 4) if self.use_gates else 0
        alpha = a * (1 + grads) + 2 * a
        effective = 0 if opts["recompute_weights"] else 4
        c = getattr(cfg, "candidates", None) if self.use_gates else None
        if c is None:
            return w + alpha + effective
        return max(2.0, c * (w + alpha + 8)) + effective

    def build(self, base, missing, cfg, family=None):
        from .config import DiffPruningConfig
        from .families import family_or_default
        from .model import DiffModel

        selection = family_or_default(family).selection(base, missing, cfg)
        opts = _options(cfg)
        config = DiffPruningConfig(
            target_sparsity=cfg.target_sparsity, l0_lambda=cfg.l0_lambda, structured=self.structured,
            group_penalty=cfg.group_penalty, use_gates=self.use_gates, **selection,
            alpha_dtype=opts["alpha_dtype"] if self.use_gates else "fp32",
            candidates=getattr(cfg, "candidates", None) if self.use_gates else None,
        )
        dm = DiffModel(base, config)
        dm.recompute_weights = opts["recompute_weights"]
        return dm

    def param_groups(self, model, phase, cfg):
        head_lr = (cfg.head_lr or phase.lr) if phase.name == "l0" else phase.lr
        return model.param_groups(lr=phase.lr, alpha_lr=cfg.alpha_lr, head_lr=head_lr)

    def start_phase(self, model, phase):
        if phase.name == "fixed":
            # Tensors that kept no position have nothing to train: out of the optimiser and of data-parallel
            # gradient reduction (which fails on parameters that never receive a gradient).
            for slot in model.slots.values():
                if slot.values.numel() == 0:
                    slot.values.requires_grad_(False)

    def save(self, model, out, tokenizer, extra, cfg):
        from .diff_file import CONFIG_FILE

        sparse = model.save_pretrained(out, extra=extra, value_dtype=cfg.value_dtype)
        written = json.loads((Path(out) / CONFIG_FILE).read_text(encoding="utf-8"))  # its summary, not a re-encoding
        head = sum(t.numel() for t in sparse.head.values())
        nnz, n, c = sparse.nnz, model.n_diffed, model.config
        # what the optimiser updated in the first phase: w (+ alpha, + one group logit per tensor) and the head
        trainable = n * (2 if c.use_gates else 1) + (len(model.diff_names) if c.use_gates and c.structured else 0) + head
        return {"nnz": nnz, "trainable_parameters": trainable, "task_parameters": nnz + head,
                "total_parameters": sum(p.numel() for p in model.model.parameters()),
                "n_diffed": n, "density": nnz / n, "target_sparsity": cfg.target_sparsity, "head_parameters": head,
                "base_fingerprint": model.base_fingerprint, "bytes_per_nonzero": written["bytes_per_nonzero"]}

    def stored_bytes(self, run_dir):
        return os.path.getsize(Path(run_dir) / DIFF_FILE)

    def load(self, run_dir, info, allow_base_mismatch=False):
        from .diff_file import SparseDiff
        from .model import DiffModel
        from .runs import load_run_base

        diff = SparseDiff.load(run_dir)
        base, tokenizer = load_run_base(info)
        return DiffModel.from_sparse_diff(base, diff, allow_base_mismatch=allow_base_mismatch), tokenizer


@dataclass(frozen=True)
class FullMethod(Method):
    artefact: str = "model"

    def build(self, base, missing, cfg, family=None):
        for p in base.parameters():
            p.requires_grad_(True)
        return base

    def save(self, model, out, tokenizer, extra, cfg):
        from .runs import hf_quiet

        with hf_quiet():
            model.save_pretrained(Path(out) / MODEL_DIR)
            tokenizer.save_pretrained(Path(out) / MODEL_DIR)
        total = sum(p.numel() for p in model.parameters())
        return {"nnz": total, "trainable_parameters": total, "task_parameters": total, "total_parameters": total}

    def stored_bytes(self, run_dir):
        return sum(os.path.getsize(p) for p in (Path(run_dir) / MODEL_DIR).glob("*.safetensors"))

    def load(self, run_dir, info, allow_base_mismatch=False):
        from .families import family_of_info
        from .runs import load_pretrained

        return load_pretrained(str((Path(run_dir) / MODEL_DIR).resolve()), family=family_of_info(info).name)


def _lora_targets(model) -> list[str] | None:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for q, v in (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj"), ("q", "v")):
        if q in names and v in names:
            return [q, v]
    return None  # let peft choose for this architecture


def _peft():
    try:
        import peft
    except ImportError as e:
        raise MethodError(
            "--method lora needs the peft package: pip install peft (or pip install 'diffprune[bench]')"
        ) from e
    return peft


@dataclass(frozen=True)
class LoraMethod(Method):
    artefact: str = "adapter"

    def state_bytes_per_parameter(self, cfg=None) -> float:
        return 0  # the adapters' state is a small fraction of the model at the ranks used here

    def build(self, base, missing, cfg, family=None):
        from .families import family_or_default

        peft = _peft()
        causal = not family_or_default(family).has_head
        heads = [] if causal else sorted({n.rsplit(".", 1)[0] for n in missing})
        lcfg = peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM if causal else peft.TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=_lora_targets(base), modules_to_save=heads or None,
        )
        try:
            return peft.get_peft_model(base, lcfg)
        except ValueError as e:
            raise MethodError(f"--method lora cannot wrap {type(base).__name__}: {e}") from e

    def save(self, model, out, tokenizer, extra, cfg):
        from .runs import hf_quiet

        with hf_quiet():
            model.save_pretrained(Path(out) / ADAPTER_DIR)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
        return {"nnz": trained, "trainable_parameters": trained, "task_parameters": trained, "total_parameters": total}

    def stored_bytes(self, run_dir):
        return os.path.getsize(Path(run_dir) / ADAPTER_DIR / "adapter_model.safetensors")

    def load(self, run_dir, info, allow_base_mismatch=False):
        from .runs import hf_quiet, load_run_base

        peft = _peft()
        base, tokenizer = load_run_base(info)
        with hf_quiet():
            return peft.PeftModel.from_pretrained(base, Path(run_dir) / ADAPTER_DIR), tokenizer


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        DiffMethod("diff", "diff pruning (L0-regularised sparse diff, projection, fixed-mask finetuning)", 5e-4),
        DiffMethod("structured", "structured diff pruning (per-tensor group gates, projection, fixed-mask finetuning)",
                   1e-4, structured=True),
        DiffMethod("magnitude", "non-adaptive diff pruning (full finetuning, keep the largest |diff|, fixed-mask "
                   "finetuning)", 5e-5, use_gates=False),
        FullMethod("full", "full finetuning", 5e-5),
        LoraMethod("lora", "LoRA (PEFT)", 1e-3),
    )
}
DIFF_METHODS = tuple(n for n, m in METHODS.items() if m.artefact == "diff")
ARTEFACTS = {"diff": DIFF_FILE, "adapter": ADAPTER_DIR, "model": MODEL_DIR}
"""What each kind of run directory holds, in the order `runs.run_method` looks for them."""


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"--method {name!r} is not one of {', '.join(METHODS)}") from None


def method_of_artefact(artefact: str) -> Method:
    """The first registered method that writes `artefact` (how a run directory is loaded)."""
    return next(m for m in METHODS.values() if m.artefact == artefact)
