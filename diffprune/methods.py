"""The registry of training methods: each says how it builds, trains, saves, loads and counts bytes.

    from diffprune.methods import METHODS, get_method
    m = get_method("structured")   # m.default_lr, m.phases(cfg), m.build(base, missing, cfg), ...

``diff``, ``structured`` and ``magnitude`` are `DiffMethod`s (a sparse diff; L0 or dense first phase,
projection, fixed-mask phase; ``diff.safetensors``), and so is ``bitfit`` (BitFit: the bias terms and the
head only, one fixed-mask phase on every bias entry); ``full`` saves a transformers checkpoint
(``model/``), ``lora`` and ``shira`` are `PeftMethod`s (a PEFT adapter, ``adapter/``). Adding a method is
one class and one entry in `METHODS`; the training loop, the run directory, `load_run` and the model
card ask the method.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import optim
from .errors import ConfigError, MethodError

DIFF_FILE = "diff.safetensors"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"


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
    candidates_lr: float | None = None
    """The same with ``--candidates`` (None: `default_lr`): with Adam every trained entry moves about the
    learning rate per step whatever its gradient's size, so an L0 stage on 5% of the entries changes the
    model far less per step than the dense one at the same rate (`default_lr_for`)."""
    artefact: str = ""
    """What the run directory holds: "diff" (diff.safetensors), "model" (model/) or "adapter" (adapter/)."""

    projects = False
    """Whether the method projects onto a budget between its phases (and so is scored after projection)."""

    def default_lr_for(self, cfg) -> float:
        """The first phase's learning rate when `cfg` (a TrainConfig) gives none."""
        if getattr(cfg, "candidates", None) is not None and self.candidates_lr is not None:
            return self.candidates_lr
        return self.default_lr

    def state_bytes_per_parameter(self, cfg=None) -> float:
        """Training state beyond the loaded fp32 model, per parameter: gradients and AdamW moments of
        what is trained (and for the diff methods w, the gate logits and the effective weights), with
        the memory options of `cfg` (a TrainConfig; None: the standard ones)."""
        opts = _options(cfg)
        return (0 if opts["optimizer_in_backward"] else 4) + 8  # full: a gradient and two moments per parameter

    def gradient_bytes_per_parameter(self, cfg=None) -> float:
        """The part of `state_bytes_per_parameter` that is gradients: made in backward while the activations
        are freed and dropped before the next forward, so a step's peak holds the larger of the two, not
        both (`check_memory`; measured: full finetuning peaks when its forward ends)."""
        return min(self.state_bytes_per_parameter(cfg), 0 if _options(cfg)["optimizer_in_backward"] else 4)

    def training_state(self, base, missing: list[str], cfg, family=None) -> tuple[int, str]:
        """(bytes, how they add up): the training state beyond the loaded model that `check_memory` weighs
        against the memory available, with `cfg`'s memory options; every parameter at
        `state_bytes_per_parameter` unless a method knows better."""
        n = sum(p.numel() for p in base.parameters())
        per = self.state_bytes_per_parameter(cfg)
        return int(n * per), f"{per:g} bytes for each of the {n:,} parameters"

    def effective_bytes_per_parameter(self, cfg=None) -> float:
        """The part of `state_bytes_per_parameter` that is effective weights (theta + delta, diff methods
        without recomputation): each layer's lives from its forward to its backward, like the activations."""
        return 0

    def training_transients(self, base, missing: list[str], cfg, family=None) -> tuple[int, int]:
        """Bytes of `training_state` alive only around the forward's end (effective weights) and only around
        the backward's end (gradients): `check_memory` counts the larger side, not both."""
        n = sum(p.numel() for p in base.parameters())
        return int(n * self.effective_bytes_per_parameter(cfg)), int(n * self.gradient_bytes_per_parameter(cfg))

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
        return optim.AdamW(groups, lr=phase.lr, weight_decay=0.0)

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

    def recognises(self, run_dir: Path) -> bool:
        """Whether a run directory holding this method's artefact was written by this method rather than by
        another one with the same artefact (`method_of_artefact`); False: the artefact alone cannot tell."""
        return False


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
        # its moments in bf16, effective weights recomputed; candidates: that state (plus 12 bytes: the
        # int32 position, a matrix's int32 CSR column and theta + delta at the candidate kept for the step,
        # `DiffModel._candidate_bank`) on the fraction c only, after a warm-up holding 2-byte scores for
        # every entry (with --memory lean the gradients stay: `lean.LEAN`).
        opts = _options(cfg)
        grads = 0 if opts["optimizer_in_backward"] else 1
        wb, a = self._entry_bytes(opts)
        factored = opts["moments_dtype"] == "factored"  # a bf16 first moment (the factored sums: rows + columns)
        w = wb * (1 + grads) + (2 if factored else 4 if opts["moments_dtype"] == "bf16" or wb == 2 else 8)
        alpha = a * (1 + grads) + ((2 if a else 0) if factored else 2 * a)
        effective = self.effective_bytes_per_parameter(cfg)
        c = getattr(cfg, "candidates", None) if self.use_gates else None
        if c is None:
            return w + alpha + effective
        return max(2.0, c * (w + alpha + 12)) + effective

    def _entry_bytes(self, opts: dict) -> tuple[int, int]:
        """Bytes of one entry of w and of alpha (0: no gates) under the memory options `opts`."""
        wb = 2 if opts["w_dtype"] == "bf16" and self.use_gates else 4
        return wb, (2 if opts["alpha_dtype"] == "bf16" else 4) if self.use_gates else 0

    def gradient_bytes_per_parameter(self, cfg=None) -> float:
        opts = _options(cfg)
        if opts["optimizer_in_backward"]:
            return 0
        wb, a = self._entry_bytes(opts)
        c = getattr(cfg, "candidates", None) if self.use_gates else None
        if c is None:
            return wb + a
        # (the warm-up holds one tensor's gradient at a time)
        return c * (wb + a) if self.state_bytes_per_parameter(cfg) - self.effective_bytes_per_parameter(cfg) > 2.0 else 0

    def _counts(self, base, missing, cfg, family) -> dict:
        """Entries diffed and in the head: only what is diffed carries diff state (the family's frozen tensors,
        a causal LM's embeddings and LM head, 21-28% of a 0.5-1B model, carry none), and the head trains
        densely (a gradient and two moments)."""
        from .config import DiffPruningConfig

        roles = DiffPruningConfig(**self.selection(base, missing, cfg, family))
        counts = {"diff": 0, "head": 0}
        for name, p in base.named_parameters():  # tied weights once
            role = roles.role_of(name)
            if role == "diff" and not p.is_floating_point():
                role = "frozen"
            if role in counts:
                counts[role] += p.numel()
        return counts

    def training_state(self, base, missing, cfg, family=None):
        counts = self._counts(base, missing, cfg, family)
        per = self.state_bytes_per_parameter(cfg)
        head = (0 if _options(cfg)["optimizer_in_backward"] else 4) + 8
        text = f"{per:g} bytes for each of the {counts['diff']:,} diffed parameters"
        if counts["head"]:
            text += f", {head} for each of the {counts['head']:,} head parameters"
        return int(counts["diff"] * per + counts["head"] * head), text

    def effective_bytes_per_parameter(self, cfg=None) -> float:
        return 0 if _options(cfg)["recompute_weights"] else 4

    def training_transients(self, base, missing, cfg, family=None):
        counts = self._counts(base, missing, cfg, family)
        head = 0 if _options(cfg)["optimizer_in_backward"] else 4
        return (int(counts["diff"] * self.effective_bytes_per_parameter(cfg)),
                int(counts["diff"] * self.gradient_bytes_per_parameter(cfg) + counts["head"] * head))

    def selection(self, base, missing, cfg, family=None) -> dict:
        """`DiffPruningConfig` keyword arguments choosing what is diffed, head and frozen (the family's)."""
        from .families import family_or_default

        return family_or_default(family).selection(base, missing, cfg)

    def target_sparsity(self, cfg) -> float:
        """The fraction of the diffed entries projection keeps."""
        return cfg.target_sparsity

    def build(self, base, missing, cfg, family=None):
        from .config import DiffPruningConfig
        from .model import DiffModel

        selection = self.selection(base, missing, cfg, family)
        opts = _options(cfg)
        config = DiffPruningConfig(
            target_sparsity=self.target_sparsity(cfg), l0_lambda=cfg.l0_lambda, structured=self.structured,
            group_penalty=cfg.group_penalty, use_gates=self.use_gates, **selection,
            alpha_dtype=opts["alpha_dtype"] if self.use_gates else "fp32",
            w_dtype=opts["w_dtype"] if self.use_gates else "fp32",
            candidates=getattr(cfg, "candidates", None) if self.use_gates else None,
        )
        # --fsdp: no L0 state yet; `sharding.setup` allocates it once the weights are sharded
        dm = DiffModel(base, config, _allocate=not getattr(cfg, "fsdp", False))
        dm.recompute_weights = opts["recompute_weights"]
        dm.compile_gates = bool(getattr(cfg, "compile_gates", False)) and self.use_gates
        return dm

    def param_groups(self, model, phase, cfg):
        head_lr = (cfg.head_lr or phase.lr) if phase.name == "l0" else phase.lr
        moments = _options(cfg)["moments_dtype"] if phase.name == "l0" else "fp32"
        return model.param_groups(lr=phase.lr, alpha_lr=cfg.alpha_lr, head_lr=head_lr, moments_dtype=moments)

    def start_phase(self, model, phase):
        if phase.name == "fixed":
            # Tensors that kept no position have nothing to train: out of the optimiser and of data-parallel
            # gradient reduction (which fails on parameters that never receive a gradient).
            for slot in model.slots.values():
                if slot.values.numel() == 0:
                    slot.values.requires_grad_(False)

    def sparse_diff(self, model, extra: dict):
        """The `SparseDiff` the run directory stores (the trained model's, as it is)."""
        return model.to_sparse_diff(extra)

    def save(self, model, out, tokenizer, extra, cfg):
        from .diff_file import CONFIG_FILE

        sparse = self.sparse_diff(model, extra)
        sparse.save(out, value_dtype=cfg.value_dtype)
        written = json.loads((Path(out) / CONFIG_FILE).read_text(encoding="utf-8"))  # its summary, not a re-encoding
        head = sum(t.numel() for t in sparse.head.values())
        nnz, n, c = sparse.nnz, model.n_diffed, model.config
        # what the optimiser updated in the first phase: w (+ alpha, + one group logit per tensor) and the head
        trainable = n * (2 if c.use_gates else 1) + (len(model.diff_names) if c.use_gates and c.structured else 0) + head
        return {"nnz": nnz, "trainable_parameters": trainable, "task_parameters": nnz + head,
                "total_parameters": sum(p.numel() for p in model.model.parameters()),
                "n_diffed": n, "density": nnz / n, "target_sparsity": c.target_sparsity, "head_parameters": head,
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


def bias_parameters(model) -> list[str]:
    """The names (as ``named_parameters()`` gives them) of every parameter a module registers under the
    name ``bias``: linear, convolution, LayerNorm and any other module's, found generically (a module's
    own ``_parameters``), tied ones once."""
    ids = {id(b) for _, m in model.named_modules() if (b := m._parameters.get("bias")) is not None}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@dataclass(frozen=True)
class BitFitMethod(DiffMethod):
    """BitFit (Ben Zaken et al. 2022): only the bias terms (and the new task head) train, everything else
    is frozen. A `DiffMethod` whose diff is restricted to the biases and keeps every one of their entries:
    one phase, "fixed", in which the loop projects once onto all the bias entries (target_sparsity 1.0 of
    the diffed entries, whatever --target-sparsity says) and then trains their values. The run directory
    holds a sparse diff (``diff.safetensors``) of the bias entries that changed, so eval, predict, merge,
    inspect and serving work as for diff pruning."""

    use_gates: bool = False

    projects = False  # no budget is chosen: every bias entry is kept (the loop's projection only switches stage)

    def phases(self, cfg) -> list[Phase]:
        return [Phase("fixed", cfg.epochs, cfg.resolved_lr())]

    def state_bytes_per_parameter(self, cfg=None) -> float:
        return 0  # w, values, their gradients and moments exist for the bias entries only (~0.1% of a model)

    def gradient_bytes_per_parameter(self, cfg=None) -> float:
        return 0

    def effective_bytes_per_parameter(self, cfg=None) -> float:
        return 0

    def selection(self, base, missing, cfg, family=None) -> dict:
        from .config import DiffPruningConfig

        selection = super().selection(base, missing, cfg, family)
        roles = DiffPruningConfig(**selection)  # the family's head and frozen parameters (and --target-modules)
        biases = [n for n in bias_parameters(base) if roles.role_of(n) == "diff"]
        if not biases:
            raise MethodError(f"--method {self.name}: {type(base).__name__} has no bias parameters outside the task "
                              "head (and --target-modules) to train")
        selection["diff_parameters"] = ["^" + re.escape(n) + "$" for n in biases]
        return selection

    def target_sparsity(self, cfg) -> float:
        return 1.0

    def param_groups(self, model, phase, cfg):
        # the one phase is the first: the head takes --head-lr as in diff pruning's first phase
        return model.param_groups(lr=phase.lr, alpha_lr=cfg.alpha_lr, head_lr=cfg.head_lr or phase.lr)

    def sparse_diff(self, model, extra):
        """The diff of the bias entries that changed: the kept entries still exactly 0 are not stored."""
        sparse = model.to_sparse_diff(extra)
        for name in list(sparse.indices):
            changed = sparse.values[name] != 0
            if not bool(changed.all()):
                sparse.indices[name] = sparse.indices[name][changed]
                sparse.values[name] = sparse.values[name][changed]
        return sparse

    def save(self, model, out, tokenizer, extra, cfg):
        counts = super().save(model, out, tokenizer, extra, cfg)
        counts["bias_parameters"] = model.n_diffed
        return counts


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


def _peft(method: str = "lora"):
    try:
        import peft
    except ImportError as e:
        raise MethodError(
            f"--method {method} needs the peft package: pip install peft (or pip install 'diffprune[bench]')"
        ) from e
    return peft


ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class PeftMethod(Method):
    """A PEFT adapter (``adapter/``: its weights and the task head as modules_to_save). Subclasses give the
    adapter's config (`peft_config`) and its PEFT type (``peft_type`` in adapter_config.json, which is how a
    run directory's adapter is told apart from another method's)."""

    artefact: str = "adapter"
    peft_type: str = ""
    """PEFT's name of the adapter type ("LORA", "SHIRA")."""

    def state_bytes_per_parameter(self, cfg=None) -> float:
        return 0  # the adapters' state is a small fraction of the model at the ranks used here

    def peft_config(self, base, cfg, heads: list[str] | None, causal: bool):
        """The PEFT config wrapping `base` (`heads`: the task head's modules to save, None for causal LMs)."""
        raise NotImplementedError

    def task_type(self, causal: bool):
        peft = _peft(self.name)
        return peft.TaskType.CAUSAL_LM if causal else peft.TaskType.SEQ_CLS

    def build(self, base, missing, cfg, family=None):
        from .families import family_or_default

        peft = _peft(self.name)
        causal = not family_or_default(family).has_head
        heads = [] if causal else sorted({n.rsplit(".", 1)[0] for n in missing})
        pcfg = self.peft_config(base, cfg, heads or None, causal)
        try:
            return peft.get_peft_model(base, pcfg)
        except (ValueError, TypeError) as e:
            raise MethodError(f"--method {self.name} cannot wrap {type(base).__name__}: {e}") from e

    def adapter_prefix(self, model) -> str:
        """The prefix of the adapter's own parameter names (PEFT's tuner prefix: "lora_", "shira_")."""
        return getattr(model.base_model, "prefix", "") or f"{self.name}_"

    def save(self, model, out, tokenizer, extra, cfg):
        from .runs import hf_quiet

        with hf_quiet():
            model.save_pretrained(Path(out) / ADAPTER_DIR)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        prefix = self.adapter_prefix(model)
        total = sum(p.numel() for n, p in model.named_parameters() if prefix not in n and "modules_to_save" not in n)
        return {"nnz": trained, "trainable_parameters": trained, "task_parameters": trained, "total_parameters": total}

    def stored_bytes(self, run_dir):
        return os.path.getsize(Path(run_dir) / ADAPTER_DIR / "adapter_model.safetensors")

    def load(self, run_dir, info, allow_base_mismatch=False):
        from .runs import hf_quiet, load_run_base

        peft = _peft(self.name)
        base, tokenizer = load_run_base(info)
        with hf_quiet():
            return peft.PeftModel.from_pretrained(base, Path(run_dir) / ADAPTER_DIR), tokenizer

    def recognises(self, run_dir):
        path = Path(run_dir) / ADAPTER_DIR / ADAPTER_CONFIG
        try:
            peft_type = json.loads(path.read_text(encoding="utf-8")).get("peft_type")
        except (OSError, ValueError, AttributeError):
            return False
        return str(peft_type).upper() == self.peft_type


@dataclass(frozen=True)
class LoraMethod(PeftMethod):
    peft_type: str = "LORA"

    def peft_config(self, base, cfg, heads, causal):
        peft = _peft(self.name)
        return peft.LoraConfig(
            task_type=self.task_type(causal), r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=_lora_targets(base), modules_to_save=heads,
        )


def _module_targets(model, targets: list[str]) -> list[tuple[str, torch.nn.Module]]:
    """The modules PEFT matches with a list of `target_modules` names (the name or its last components)."""
    return [(n, m) for n, m in model.named_modules()
            if any(n == t or n.endswith("." + t) for t in targets)]


def shira_targets(base) -> tuple[list[str], list[torch.nn.Linear]]:
    """(target_modules, the linear layers they match) of SHiRA on `base`: LoRA's (`_lora_targets`), or PEFT's
    default SHiRA targets for the architecture when LoRA lets PEFT choose."""
    targets = _lora_targets(base)
    if targets is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_SHIRA_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(getattr(base, "config", None), "model_type", None)
        targets = list(defaults.get(model_type) or [])
        if not targets:
            raise MethodError(f"--method shira: no default target modules for {type(base).__name__} "
                              f"(model type {model_type!r}) and no query/value projection pair found")
    layers = [m for _, m in _module_targets(base, targets) if isinstance(m, torch.nn.Linear)]
    if not layers:
        raise MethodError(f"--method shira: the target modules {targets} of {type(base).__name__} hold no "
                          "torch.nn.Linear layer (SHiRA adapts linear layers only)")
    return targets, layers


def shira_rank(target_sparsity: float, total_parameters: int, layers) -> tuple[int, int]:
    """(r used, r of the budget) of SHiRA: r(m + n) trainable entries per m x n target, r chosen so the
    adapter's entries match the diff methods' budget, target_sparsity x the base's parameters:
    max(1, round(t * total / sum(m + n))). The r used is capped where a target layer would need more
    entries than it has (r(m + n) <= m n)."""
    wanted = max(1, round(target_sparsity * total_parameters / sum(m.in_features + m.out_features for m in layers)))
    cap = min((m.in_features * m.out_features) // (m.in_features + m.out_features) for m in layers)
    return max(1, min(wanted, cap)), wanted


@dataclass(frozen=True)
class ShiraMethod(PeftMethod):
    """PEFT's SHiRA: a fixed random sparse mask (seeded by --seed) on the LoRA targets' linear layers, whose
    r(m + n) entries per m x n target train; r from --target-sparsity (`shira_rank`)."""

    peft_type: str = "SHIRA"

    def peft_config(self, base, cfg, heads, causal):
        peft = _peft(self.name)
        targets, layers = shira_targets(base)
        r, wanted = shira_rank(cfg.target_sparsity, sum(p.numel() for p in base.parameters()), layers)
        if r < wanted:
            print(f"--method shira: --target-sparsity {cfg.target_sparsity:g} asks for r={wanted}, more entries "
                  f"than the smallest target layer has; r={r} is used", file=sys.stderr)
        return peft.ShiraConfig(task_type=self.task_type(causal), r=r, mask_type="random", random_seed=cfg.seed,
                                target_modules=targets, modules_to_save=heads)

    def save(self, model, out, tokenizer, extra, cfg):
        counts = super().save(model, out, tokenizer, extra, cfg)
        pcfg = model.peft_config[model.active_adapter]
        layers = [m for m in model.modules() if hasattr(m, "shira_weight")]
        _, wanted = shira_rank(cfg.target_sparsity, counts["total_parameters"],
                               [m.get_base_layer() for m in layers])
        adapter = sum(p.numel() for n, p in model.named_parameters() if "shira_" in n)
        counts.update({"shira_r": int(pcfg.r), "shira_r_budget": wanted, "shira_parameters": adapter,
                       "head_parameters": counts["trainable_parameters"] - adapter,
                       "target_sparsity": cfg.target_sparsity})
        return counts


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        DiffMethod("diff", "diff pruning (L0-regularised sparse diff, projection, fixed-mask finetuning)", 5e-4),
        DiffMethod("structured", "structured diff pruning (per-tensor group gates, projection, fixed-mask finetuning)",
                   1e-4, candidates_lr=5e-4, structured=True),
        DiffMethod("magnitude", "non-adaptive diff pruning (full finetuning, keep the largest |diff|, fixed-mask "
                   "finetuning)", 5e-5, use_gates=False),
        FullMethod("full", "full finetuning", 5e-5),
        LoraMethod("lora", "LoRA (PEFT)", 1e-3),
        BitFitMethod("bitfit", "BitFit (only the bias terms and the task head train; stored as a sparse diff of the "
                     "biases)", 1e-3),
        ShiraMethod("shira", "SHiRA (PEFT: a fixed random sparse mask on the attention projections, r sized to "
                    "the diff budget)", 1e-3),
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


def method_of_artefact(artefact: str, run_dir: str | os.PathLike | None = None) -> Method:
    """The method that loads `artefact` (how a run directory is loaded): among those that write it, the one
    that `recognises` the run directory (a PEFT adapter by its adapter_config.json's ``peft_type``: lora,
    shira), else the first registered (the diff methods all load as ``diff``)."""
    writers = [m for m in METHODS.values() if m.artefact == artefact]
    if run_dir is not None:
        for m in writers:
            if m.recognises(Path(run_dir)):
                return m
    return writers[0]
