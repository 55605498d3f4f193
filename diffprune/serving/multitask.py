"""`MultiTaskModel`: one base model in memory serving many tasks, each a sparse diff plus a head.

Two model families (`diffprune.families`): a classifier base (``AutoModelForSequenceClassification``)
serves classification / regression tasks (`predict`); a causal-LM base (``AutoModelForCausalLM``,
no head: a task is its diff alone) serves generation tasks (`generate`). A `MultiTaskModel` holds one
base of one family; `diffprune.serving.router.TaskRouter` puts several side by side.

How a batch for task t runs
---------------------------
The base model's weights are edited in place: t's diff is applied (theta[idx] = theta[idx] + delta,
computed by `diffprune.apply` once when the task is added, so a switch is a pure scatter of stored values), t's head
parameters are swapped in (the head ``Parameter`` objects are replaced on their modules, so heads of
any shape work), the forward runs, and t stays applied until another task needs the model. Switching
from t to u writes the stored base values back over t's positions (bit-exact: they are the values
read before t was first applied) and then writes u's merged values. Its cost is proportional to
nnz(t) + nnz(u), not to the model size.

A single lock covers "switch + forward", so every forward for t runs with t's diff and head
applied and no other task's; callers that batch requests per task (the server does) make switches
rare. The weights a forward sees are bit-identical to ``DiffModel.merge_and_unload()``'s for that
task (same float32 addition), so predictions equal the merged model's.

Generation (`generate`) holds the same lock for "switch + ``model.generate``" (KV cache on). Prompts
are token ids and are never padded: a call with prompts of several lengths runs one ``generate`` per
length, so each greedy answer equals the merged model's greedy answer for that prompt alone.

The fingerprint of the base is computed once per head-parameter pattern set (with no task
applied) and compared with every diff when it is added; a diff trained on another base is
refused with `BaseModelMismatchError`. The hot path never fingerprints.

Memory: one copy of the base, plus per task its positions (int32), its merged values and the base
values at those positions (float32 each: 12 bytes per nonzero) and its head tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import apply as engine
from ..diff_file import DIFF_FILE, SparseDiff
from ..errors import (
    BaseModelMismatchError, DiffFileError, DiffPruneError, InputError, PromptTooLongError, TaskError,
    TaskExistsError, TaskTypeError, UnknownTaskError,
)
from ..families import CAUSAL_LM, CLASSIFIER, GENERATION, family_of_info, get_family
from ..fingerprint import model_fingerprint

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
TASK_TYPES = ("classification", "regression")
FAMILY_TASK_TYPES = {CLASSIFIER: TASK_TYPES, CAUSAL_LM: (GENERATION,)}
"""The task types a base of each family serves."""


# ---- per-task state ------------------------------------------------------------------------------
class _Scratch:
    """A reusable int64 buffer: positions are stored as int32 (4 bytes per nonzero instead of 8) and
    widened here before a scatter, since numpy scatters with int64 indices ~3x faster."""

    def __init__(self):
        self.buf = np.empty(0, dtype=np.int64)

    def widen(self, idx: np.ndarray) -> np.ndarray:
        if idx.dtype == np.int64:
            return idx
        n = idx.shape[0]
        if self.buf.shape[0] < n:
            self.buf = np.empty(n, dtype=np.int64)
        out = self.buf[:n]
        np.copyto(out, idx)
        return out


class _Patch:
    """The positions of one diffed tensor of one task, with the merged and the base values there.

    Memory: 12 bytes per nonzero on CPU (int32 position, float32 merged and base values)."""

    __slots__ = ("flat", "idx", "merged", "base", "use_numpy", "scratch")

    def __init__(self, param: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, scratch: _Scratch):
        data = param.detach()
        if not data.is_contiguous():
            raise DiffPruneError("MultiTaskModel needs contiguous parameters (call .contiguous() on the base)")
        flat = data.view(-1)
        idx = idx.to(device=flat.device, dtype=torch.int64).contiguous()
        base = engine.gather(flat, idx)
        merged = engine.merged(base, values)  # the same op as merge_and_unload and SparseDiff.apply_
        # On CPU a numpy scatter is single-threaded and has no dispatcher overhead: ~2x faster
        # than index_copy_ for these sizes, and it does not wake the intra-op thread pool.
        self.use_numpy = flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64, torch.float16)
        self.scratch = scratch
        if self.use_numpy:
            narrow = flat.numel() < 2**31
            self.idx = idx.numpy().astype(np.int32) if narrow else idx.numpy()
            self.flat, self.base, self.merged = flat.numpy(), base.numpy(), merged.numpy()
        else:
            self.flat, self.idx, self.base, self.merged = flat, idx, base, merged

    def apply(self) -> None:
        if self.use_numpy:
            self.flat[self.scratch.widen(self.idx)] = self.merged
        else:
            engine.write_(self.flat, self.idx, self.merged)

    def revert(self) -> None:
        if self.use_numpy:
            self.flat[self.scratch.widen(self.idx)] = self.base
        else:
            engine.write_(self.flat, self.idx, self.base)

    @property
    def nbytes(self) -> int:
        n = 0
        for a in (self.idx, self.base, self.merged):
            n += a.nbytes if self.use_numpy else a.numel() * a.element_size()
        return n


@dataclass
class _Task:
    name: str
    info: dict
    patches: list[_Patch]
    heads: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]]  # module, attribute, task's, base's
    task_type: str
    labels: list[str]
    n_texts: int | None
    max_seq_length: int

    @property
    def generates(self) -> bool:
        return self.task_type == GENERATION


@dataclass
class Stats:
    switches: int = 0
    switch_seconds: float = 0.0
    forwards: int = 0
    forward_seconds: float = 0.0
    inputs: int = 0
    per_task: dict = field(default_factory=dict)
    generate_calls: int = 0
    generate_seconds: float = 0.0
    prompts: int = 0
    generated_tokens: int = 0

    def to_dict(self) -> dict:
        return {
            "switches": self.switches,
            "switch_seconds": self.switch_seconds,
            "mean_switch_ms": 1e3 * self.switch_seconds / self.switches if self.switches else None,
            "forwards": self.forwards,
            "forward_seconds": self.forward_seconds,
            "mean_forward_ms": 1e3 * self.forward_seconds / self.forwards if self.forwards else None,
            "inputs": self.inputs,
            "mean_batch_size": self.inputs / self.forwards if self.forwards else None,
            "per_task_inputs": dict(self.per_task),
            "generate_calls": self.generate_calls,
            "generate_seconds": self.generate_seconds,
            "prompts": self.prompts,
            "mean_prompts_per_generate": self.prompts / self.generate_calls if self.generate_calls else None,
            "generated_tokens": self.generated_tokens,
        }

    def add(self, other: "Stats") -> "Stats":
        """The sum of two models' counters (the router's totals)."""
        out = Stats()
        for f in ("switches", "switch_seconds", "forwards", "forward_seconds", "inputs", "generate_calls",
                  "generate_seconds", "prompts", "generated_tokens"):
            setattr(out, f, getattr(self, f) + getattr(other, f))
        out.per_task = {**self.per_task, **other.per_task}
        return out


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """torch's RNG seeded with `seed` for the block and restored afterwards (nothing when None)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else "cuda"):
        torch.manual_seed(int(seed))
        yield


def _resolve_param(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        module = None
    if module is None or attr not in module._parameters or module._parameters[attr] is None:
        raise BaseModelMismatchError(
            f"the base model has no parameter {name!r} that this diff's head sets; is it the right architecture?"
        )
    return module, attr


def read_run_metadata(run_dir: str | Path) -> dict:
    """``metrics.json`` of a run directory as {"metrics": final validation metrics or None, ...}."""
    path = Path(run_dir) / METRICS_FILE
    out: dict[str, Any] = {"metrics": None, "stored_bytes": None}
    if not path.is_file():
        return out
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return out
    if isinstance(data, dict):
        final = data.get("final")
        out["metrics"] = final if isinstance(final, dict) else None
        if isinstance(data.get("stored_bytes"), int):
            out["stored_bytes"] = data["stored_bytes"]
    return out


def default_task_name(diff: SparseDiff, run_dir: str | Path | None) -> str:
    name = diff.extra.get("task") if isinstance(diff.extra.get("task"), str) else None
    if not name and run_dir is not None:
        name = Path(run_dir).resolve().name
    if not name:
        raise TaskError("the diff names no task (extra['task']) and has no run directory: pass a task name")
    return name


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME_RE.match(name):
        raise TaskError(
            f"invalid task name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def load_base_model(base_model: str | os.PathLike, dtype: torch.dtype = torch.float32, family: str = CLASSIFIER):
    """The base checkpoint with its family's Auto class (``AutoModelForSequenceClassification``, or
    ``AutoModelForCausalLM`` for "causal-lm"), in eval mode, and its tokenizer (`runs.load_pretrained`:
    a model that cannot be found or read is a `RunError` with the fix; no pad token: pad = eos)."""
    from ..runs import load_pretrained

    model, tokenizer = load_pretrained(base_model, dtype=dtype, family=family)
    return model.eval(), tokenizer


def module_family(model: nn.Module) -> str:
    """The family of an already built model: causal-lm for ``*ForCausalLM`` / ``*LMHeadModel``."""
    return CAUSAL_LM if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) else CLASSIFIER


def diff_family(diff: SparseDiff) -> str:
    """The family a diff was trained in (its ``extra['family']``; absent: classifier)."""
    try:
        return family_of_info(diff.extra).name
    except DiffPruneError as e:
        raise DiffFileError(f"diff metadata: {e}") from None


class MultiTaskModel:
    """One base model in memory, many tasks (sparse diff + head each), any task per call.

    ``MultiTaskModel(base_model, {name: SparseDiff | run_dir, ...}, tokenizer=None, family=None)`` where
    `base_model` is an ``nn.Module`` or a checkpoint path / hub id (loaded once in float32 with the
    family's Auto class, with its tokenizer). `family` ("classifier" or "causal-lm") defaults to the
    first task's (its diff's ``extra['family']``), else the module's kind, else classifier. The model
    takes ownership of the base: its weights are edited in place while a task is active, and restored
    bit-exactly by `deactivate()`. All methods are thread-safe.
    """

    def __init__(
        self,
        base_model: nn.Module | str | os.PathLike,
        tasks: Mapping[str, SparseDiff | str | os.PathLike] | None = None,
        *,
        tokenizer=None,
        family: str | None = None,
        default_max_seq_length: int = 128,
        allow_base_mismatch: bool = False,
    ):
        tasks = dict(tasks or {})
        loaded: dict[str, tuple[SparseDiff, Any]] = {}  # name -> (diff, run dir or None)
        if family is None and tasks:
            name, first = next(iter(tasks.items()))
            if not isinstance(first, SparseDiff):
                loaded[name] = (SparseDiff.load(first), first)
            family = diff_family(loaded[name][0] if name in loaded else first)
        if family is not None:
            get_family(family)  # a ConfigError naming the families
        if isinstance(base_model, (str, os.PathLike)):
            self.base_model_id: str | None = str(base_model)
            family = family or CLASSIFIER
            model, loaded_tok = load_base_model(base_model, family=family)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        elif isinstance(base_model, nn.Module):
            model = base_model
            family = family or module_family(model)
            self.base_model_id = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        else:
            raise TypeError(f"base_model must be an nn.Module or a checkpoint path, got {type(base_model).__name__}")
        self.family: str = family
        """The base's model family: "classifier" (predict) or "causal-lm" (generate)."""
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.default_max_seq_length = default_max_seq_length
        self.allow_base_mismatch = allow_base_mismatch
        """Accept diffs whose base fingerprint differs from this base's (names and shapes are still checked)."""
        self._lock = threading.RLock()  # model weights: switch + forward
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to call from several threads
        self._tasks: dict[str, _Task] = {}
        self._active: str | None = None
        self._fingerprints: dict[tuple, str] = {}
        self._scratch = _Scratch()
        self.stats = Stats()
        for name, diff in tasks.items():
            if name in loaded:
                self.add_task(name, loaded[name][0], run_dir=loaded[name][1])
            else:
                self.add_task(name, diff)

    @classmethod
    def from_run_dirs(
        cls,
        runs: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
        base_model: nn.Module | str | os.PathLike | None = None,
        tokenizer=None,
        family: str | None = None,
    ) -> "MultiTaskModel":
        """Load run directories (``{name: dir}`` or ``[dir, ...]``) of one family; the base is the
        first diff's ``extra['base_model']`` unless given, the family the first diff's unless given.
        (Runs of several families: `diffprune.serving.router.TaskRouter.from_run_dirs`.)"""
        items = list(runs.items()) if isinstance(runs, Mapping) else [(None, r) for r in runs]
        if not items:
            raise TaskError("no run directories given")
        loaded = [(name, path, SparseDiff.load(path)) for name, path in items]
        if base_model is None:
            base_model = loaded[0][2].extra.get("base_model")
            if not base_model:
                raise TaskError(
                    f"{items[0][1]}: the diff does not name its base model (extra['base_model']); pass base_model"
                )
        model = cls(base_model, tokenizer=tokenizer, family=family or diff_family(loaded[0][2]))
        for name, path, diff in loaded:
            model.add_task(name or default_task_name(diff, path), diff, run_dir=path)
        return model

    # ---- task registry ------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        with self._lock:
            return list(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def task_info(self, name: str) -> dict:
        return dict(self._get(name).info)

    def describe(self) -> list[dict]:
        with self._lock:
            return [dict(t.info) for t in self._tasks.values()]

    @property
    def active_task(self) -> str | None:
        return self._active

    def _get(self, name: str) -> _Task:
        task = self._tasks.get(name)
        if task is None:
            raise UnknownTaskError(f"unknown task {name!r}; loaded tasks: {sorted(self._tasks)}")
        return task

    def _classifier_task(self, name: str) -> _Task:
        task = self._get(name)
        if task.generates:
            raise TaskTypeError(
                f"task {name!r} is a generation task (causal LM): it generates text and has no labels to predict; "
                "use MultiTaskModel.generate, or POST /v1/completions or /v1/chat/completions with model "
                f"{name!r}", task.task_type)
        return task

    def _generation_task(self, name: str) -> _Task:
        task = self._get(name)
        if not task.generates:
            raise TaskTypeError(
                f"task {name!r} is a {task.task_type} task (classifier): it cannot generate text; use "
                f"MultiTaskModel.predict, or POST /v1/tasks/{name}/predict", task.task_type)
        return task

    def generates(self, name: str) -> bool:
        """Whether task `name` is a generation task (else classification / regression)."""
        return self._get(name).generates

    def add_task(
        self,
        name: str | None,
        diff: SparseDiff | str | os.PathLike,
        *,
        run_dir: str | os.PathLike | None = None,
        metrics: dict | None = None,
        replace: bool = False,
    ) -> dict:
        """Add a task from a `SparseDiff` or a run directory; returns its info.

        Raises `BaseModelMismatchError` when the diff was trained on another base (fingerprint,
        parameter names or shapes), `TaskExistsError` when the name is taken and not `replace`.
        """
        if not isinstance(diff, SparseDiff):
            run_dir = diff if run_dir is None else run_dir
            diff = SparseDiff.load(diff)
        meta = read_run_metadata(run_dir) if run_dir is not None else {"metrics": None, "stored_bytes": None}
        if metrics is not None:
            meta["metrics"] = metrics
        name = check_task_name(name if name is not None else default_task_name(diff, run_dir))
        family = diff_family(diff)
        if family != self.family:
            raise TaskError(
                f"task {name!r} is a {family} run but this model's base is a {self.family} "
                f"({self.base_model_id or 'an unnamed model'}); serve it on a {family} base "
                "(`diffprune serve` loads one base per family)"
            )
        task_type, labels, n_texts, max_len = self._task_meta(diff)
        if meta["stored_bytes"] is None and run_dir is not None and (Path(run_dir) / DIFF_FILE).is_file():
            meta["stored_bytes"] = (Path(run_dir) / DIFF_FILE).stat().st_size
        with self._lock:
            if name in self._tasks and not replace:
                raise TaskExistsError(f"task {name!r} is already loaded (remove it first, or replace it)")
            self._deactivate_locked()  # fingerprint, layout and base values need the pristine base
            self._check_base(diff)
            params = dict(self.model.named_parameters())
            patches = []
            for pname, idx, values in engine.iter_diff(diff):  # positions decoded one tensor at a time
                p = params[pname]
                if int(idx.max()) >= p.numel() or int(idx.min()) < 0:
                    raise DiffFileError(f"diff positions of {pname!r} are out of range for its shape {tuple(p.shape)}")
                patches.append(_Patch(p, idx, values, self._scratch))
            heads = []
            for hname, tensor in diff.head.items():
                module, attr = _resolve_param(self.model, hname)
                original = module._parameters[attr]  # the base's own: no task is applied now
                if tensor.dim() != original.dim() or tuple(tensor.shape[1:]) != tuple(original.shape[1:]):
                    raise BaseModelMismatchError(
                        f"head parameter {hname!r} has shape {tuple(tensor.shape)} in the diff but "
                        f"{tuple(original.shape)} in the base; only the first (output) dimension may differ"
                    )
                # a fresh, aligned copy: a tensor read from a file may sit at an unaligned offset, and
                # kernels then take another path with other rounding than the merged model's
                data = torch.empty(tensor.shape, dtype=original.dtype, device=original.device).copy_(tensor)
                param = nn.Parameter(data, requires_grad=False)
                heads.append((module, attr, param, original))
            head_bytes = sum(p.numel() * p.element_size() for _, _, p, _ in heads)
            info = {
                "name": name,
                "task": diff.extra.get("task"),
                "family": self.family,
                "task_type": task_type,
                "labels": list(labels),
                "text_columns": list(diff.extra.get("text_columns") or []),
                "max_seq_length": max_len,
                "nnz": diff.nnz,
                "n_diffed": diff.n_diffed,
                "density": diff.density,
                "stored_bytes": meta["stored_bytes"],
                "memory_bytes": sum(p.nbytes for p in patches) + head_bytes,
                "metrics": meta["metrics"],
                "method": diff.extra.get("method"),
                "base_model": diff.extra.get("base_model"),
                "run_dir": str(Path(run_dir).resolve()) if run_dir is not None else None,
                "created": int(time.time()),
            }
            if task_type == GENERATION:
                info["data_format"] = diff.extra.get("data_format")
            self._tasks[name] = _Task(name, info, patches, heads, task_type, list(labels), n_texts, max_len)
            self.stats.per_task.setdefault(name, 0)
            return dict(info)

    def remove_task(self, name: str) -> dict:
        """Remove a task (waits for a running forward of it to finish); returns its info."""
        with self._lock:
            task = self._get(name)
            if self._active == name:
                self._deactivate_locked()
            del self._tasks[name]
            self.stats.per_task.pop(name, None)
            return dict(task.info)

    def _task_meta(self, diff: SparseDiff) -> tuple[str, list[str], int | None, int]:
        extra = diff.extra or {}
        allowed = FAMILY_TASK_TYPES[self.family]
        task_type = extra.get("task_type") or allowed[0]
        if task_type not in allowed:
            raise DiffFileError(
                f"diff metadata task_type={task_type!r} is not one of {allowed} (the task types of a {self.family} base)"
            )
        labels = extra.get("labels") or []
        if not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels):
            raise DiffFileError("diff metadata 'labels' must be a list of label names")
        cols = extra.get("text_columns")
        n_texts = len(cols) if isinstance(cols, list) and cols else None
        if n_texts is not None and n_texts not in (1, 2):
            raise DiffFileError(f"diff metadata text_columns={cols!r}: 1 or 2 text columns are supported")
        max_len = extra.get("max_seq_length") or self.default_max_seq_length
        if not isinstance(max_len, int) or max_len < 2:
            raise DiffFileError(f"diff metadata max_seq_length={max_len!r} is not a positive integer")
        return task_type, [str(x) for x in labels], n_texts, max_len

    def _check_base(self, diff: SparseDiff) -> None:
        key = tuple(diff.config.head_parameters or ())
        fp = self._fingerprints.get(key)
        if fp is None:
            fp = self._fingerprints[key] = model_fingerprint(self.model, diff.config)
        if fp != diff.base_fingerprint and not self.allow_base_mismatch:
            raise BaseModelMismatchError(
                "this diff was trained on a different base model: its base fingerprint is "
                f"{diff.base_fingerprint}, the served base's is {fp}. It names "
                f"{diff.extra.get('base_model', 'no base model')!r} as its base; the server runs "
                f"{self.base_model_id or 'an unnamed model'!r} (same checkpoint and dtype needed; if you know the weights "
                "are compatible: --allow-base-mismatch on the command line, allow_base_mismatch=True in Python)"
            )
        params = dict(self.model.named_parameters())
        for pname, shape in diff.shapes.items():
            if pname not in params:
                raise BaseModelMismatchError(f"the base model has no parameter {pname!r} that this diff changes")
            if tuple(params[pname].shape) != tuple(shape):
                raise BaseModelMismatchError(
                    f"parameter {pname!r} has shape {tuple(params[pname].shape)} in the base but {tuple(shape)} in the diff"
                )

    # ---- switching ------------------------------------------------------------------------------
    def _activate_locked(self, name: str) -> _Task:
        task = self._get(name)
        if self._active == name:
            return task
        t0 = time.perf_counter()
        self._deactivate_locked()
        for patch in task.patches:
            patch.apply()
        for module, attr, param, _ in task.heads:
            module._parameters[attr] = param
        self._active = name
        self.stats.switches += 1
        self.stats.switch_seconds += time.perf_counter() - t0
        return task

    def _deactivate_locked(self) -> None:
        if self._active is None:
            return
        task = self._tasks.get(self._active)
        if task is not None:
            for patch in task.patches:
                patch.revert()
            for module, attr, _, original in task.heads:
                module._parameters[attr] = original
        self._active = None

    def deactivate(self) -> None:
        """Restore the base weights (bit-exact) and heads; the next call re-applies its task."""
        with self._lock:
            self._deactivate_locked()

    def activate(self, name: str) -> None:
        """Apply `name`'s diff and head now (normally done by `logits`/`predict` as needed)."""
        with self._lock:
            self._activate_locked(name)

    # ---- inference --------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, name: str, encoded: Mapping[str, torch.Tensor], batch_size: int | None = None) -> torch.Tensor:
        """The task's logits for already tokenized inputs (a dict of tensors for the model's forward)."""
        n = next(iter(encoded.values())).shape[0]
        step = batch_size or n or 1
        outs = []
        with self._lock:
            self._classifier_task(name)
            self._activate_locked(name)
            t0 = time.perf_counter()
            for start in range(0, n, step):
                chunk = {k: v[start : start + step] for k, v in encoded.items()}
                out = self.model(**chunk)
                outs.append((out.logits if hasattr(out, "logits") else out[0]).float().cpu())
            self.stats.forwards += len(outs)
            self.stats.forward_seconds += time.perf_counter() - t0
            self.stats.inputs += n
            self.stats.per_task[name] = self.stats.per_task.get(name, 0) + n
        return torch.cat(outs) if outs else torch.zeros(0, 0)

    def split_inputs(self, name: str, inputs: Sequence) -> tuple[list[str], list[str] | None]:
        """Check single texts / text pairs against the task; returns (first texts, second texts or None)."""
        task = self._classifier_task(name)
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or len(inputs) == 0:
            raise InputError("inputs must be a non-empty list of texts or of [text, text] pairs")
        pairs = [isinstance(x, (list, tuple)) for x in inputs]
        if any(pairs) and not all(pairs):
            raise InputError("inputs mix single texts and pairs; send one kind per request")
        if all(pairs):
            if not all(len(x) == 2 and all(isinstance(s, str) for s in x) for x in inputs):
                raise InputError("each pair must be a list of exactly two strings")
            if task.n_texts == 1:
                raise InputError(f"task {name!r} takes single texts, not pairs")
            return [x[0] for x in inputs], [x[1] for x in inputs]
        if not all(isinstance(x, str) for x in inputs):
            raise InputError("each input must be a string (or a [text, text] pair)")
        if task.n_texts == 2:
            cols = task.info["text_columns"]
            raise InputError(f"task {name!r} takes text pairs [{cols[0]}, {cols[1]}], not single texts")
        return list(inputs), None

    def _tokenizer(self):
        if self.tokenizer is None:
            if not self.base_model_id:
                raise DiffPruneError("no tokenizer: pass tokenizer= to MultiTaskModel to predict from text")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.base_model_id)
        return self.tokenizer

    def encode(self, name: str, inputs: Sequence) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """Tokenize for the task (its max_seq_length); also says which inputs were truncated."""
        task = self._classifier_task(name)
        first, second = self.split_inputs(name, inputs)
        tok = self._tokenizer()
        max_len = task.max_seq_length
        with self._tok_lock:
            full = tok(first, second, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
            enc = tok(first, second, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        truncated = [len(ids) > max_len for ids in full]
        return dict(enc), truncated

    def format(self, name: str, logits: torch.Tensor, truncated: Sequence[bool] | None = None) -> list[dict]:
        """Per-input results: label, label_id, score and all scores (classification) or value (regression)."""
        task = self._classifier_task(name)
        truncated = truncated if truncated is not None else [False] * logits.shape[0]
        results = []
        if task.task_type == "regression":
            values = logits[:, 0].tolist()
            for v, t in zip(values, truncated):
                results.append({"value": v, "truncated": bool(t)})
            return results
        probs = torch.softmax(logits.double(), dim=-1).tolist()
        width = logits.shape[1]
        labels = task.labels if len(task.labels) == width else [f"LABEL_{i}" for i in range(width)]
        for row, t in zip(probs, truncated):
            top = max(range(width), key=row.__getitem__)
            results.append(
                {
                    "label": labels[top],
                    "label_id": top,
                    "score": row[top],
                    "scores": dict(zip(labels, row)),
                    "truncated": bool(t),
                }
            )
        return results

    def predict(self, name: str, inputs: Sequence, batch_size: int | None = None) -> list[dict]:
        """Predict texts (``["a", ...]``) or pairs (``[["a", "b"], ...]``) with task `name`.

        One dict per input: ``label``, ``label_id``, ``score``, ``scores`` (label -> probability)
        for classification, ``value`` for regression, and ``truncated`` (the input was longer than
        the task's max_seq_length and was cut).
        """
        encoded, truncated = self.encode(name, inputs)
        logits = self.logits(name, encoded, batch_size)
        return self.format(name, logits, truncated)

    # ---- generation -----------------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        """The base's position limit (``max_position_embeddings`` / ``n_positions``), if it has one."""
        cfg = getattr(self.model, "config", None)
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def render(self, name: str, *, prompt: str | None = None, messages: list | None = None) -> list[int]:
        """The prompt token ids of a completion (`prompt`) or chat (`messages`) request, rendered as
        training rendered them (`diffprune.lmdata.render_prompt`: the tokenizer's chat template, else
        diffprune's default one, with the generation prompt)."""
        from ..lmdata import render_prompt

        self._generation_task(name)
        tok = self._tokenizer()
        with self._tok_lock:
            try:
                ids = render_prompt(tok, prompt=prompt, messages=messages)
            except DiffPruneError as e:
                raise InputError(str(e)) from None
            except (TypeError, ValueError, KeyError) as e:  # a chat template refusing the messages
                raise InputError(f"cannot render the {'messages' if messages is not None else 'prompt'}: {e}") from None
        return [int(i) for i in ids]

    def check_prompt(self, name: str, ids: Sequence[int], max_new_tokens: int) -> None:
        """Refuse a prompt the task cannot take: empty, over the task's max_seq_length, or longer than
        the base's context together with `max_new_tokens`; token ids outside the vocabulary."""
        task = self._generation_task(name)
        n = len(ids)
        if n == 0:
            raise InputError("the prompt is empty (0 tokens): send some text")
        if n > task.max_seq_length:
            raise PromptTooLongError(
                f"the prompt is {n} tokens; task {name!r} takes at most {task.max_seq_length} (its max_seq_length): "
                "shorten the prompt"
            )
        ctx = self.context_length
        if ctx is not None and n + max_new_tokens > ctx:
            raise PromptTooLongError(
                f"the prompt ({n} tokens) plus max_tokens ({max_new_tokens}) is over the model's context of {ctx} "
                f"tokens: lower max_tokens to at most {ctx - n}"
            )
        vocab = self.model.get_input_embeddings().num_embeddings
        if any(not (0 <= int(i) < vocab) for i in ids):
            raise InputError(f"prompt token ids must lie in [0, {vocab})")

    def _eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def generate(
        self,
        name: str,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        streamer=None,
        cancel: threading.Event | None = None,
    ) -> list[dict]:
        """Generate a completion of each prompt (token ids) with generation task `name`.

        Greedy when `temperature` is 0, else sampling with `temperature` and `top_p` (and the base's
        own ``generation_config`` top_k, if it sets one); `seed` makes sampling reproducible (the global
        RNG is restored afterwards). Generation stops at EOS, at a `stop` string (the text is cut before
        it) or after `max_new_tokens`. Prompts of equal length run as one ``model.generate`` batch, other
        lengths in their own calls: no padding, so each answer equals the merged model's for that
        prompt alone. `streamer` (one prompt only) receives the tokens (`generation.TextDeltaStreamer`);
        `cancel` (a ``threading.Event``) stops generation when set.

        One dict per prompt: ``text``, ``token_ids`` (generated, EOS included when reached),
        ``finish_reason`` ("stop": EOS or stop string; "length"; "cancelled"), ``prompt_tokens``,
        ``completion_tokens``.
        """
        try:
            return self._generate(name, prompts, max_new_tokens, temperature, top_p, stop, seed, streamer, cancel)
        finally:
            if streamer is not None:
                streamer.end()  # idempotent; ends the stream when generation failed or never ran

    def _generate(self, name, prompts, max_new_tokens, temperature, top_p, stop, seed, streamer, cancel) -> list[dict]:
        from transformers import StoppingCriteriaList

        from ..generation import StopOnCancel, StopOnStrings, cut_at_stop, decode

        self._generation_task(name)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise InputError("prompts must be a non-empty list of token id lists")
        prompts = [list(p) for p in prompts]
        if not all(all(isinstance(i, int) and not isinstance(i, bool) for i in p) for p in prompts):
            raise InputError("each prompt must be a list of token ids (integers)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise InputError(f"temperature must be >= 0, got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and not (isinstance(seed, int) and -(2**63) <= seed < 2**64):
            raise InputError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(x, str) and x for x in stop):
            raise InputError("stop strings must be non-empty strings")
        if streamer is not None and len(prompts) != 1:
            raise InputError("a streamer streams one prompt: pass a single prompt")
        for p in prompts:
            self.check_prompt(name, p, max_new_tokens)
        tok = self._tokenizer()
        eos = self._eos_ids()
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = min(eos) if eos else 0
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        results: list[dict | None] = [None] * len(prompts)
        device = next(self.model.parameters()).device
        sample = float(temperature) > 0
        for length, rows in groups.items():
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
            criteria = StoppingCriteriaList()
            stopper = StopOnStrings(tok, stop, length, eos, self._tok_lock) if stop else None
            if stopper is not None:
                criteria.append(stopper)
            if cancel is not None:
                criteria.append(StopOnCancel(cancel))
            kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=sample, use_cache=True, pad_token_id=pad, stopping_criteria=criteria,
                          streamer=streamer)
            if sample:
                top_k = getattr(getattr(self.model, "generation_config", None), "top_k", None)
                kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=top_k or 0)
            if cancel is not None and cancel.is_set():
                out = ids
            else:
                with self._lock:
                    self._activate_locked(name)
                    t0 = time.perf_counter()
                    with torch.inference_mode(), _seeded(seed, device):
                        out = self.model.generate(**kwargs)
                    self.stats.generate_calls += 1
                    self.stats.generate_seconds += time.perf_counter() - t0
                    self.stats.prompts += len(rows)
                    self.stats.per_task[name] = self.stats.per_task.get(name, 0) + len(rows)
            generated = out[:, length:].tolist()
            for r, i in enumerate(rows):
                gen = generated[r]
                if stopper is not None and r in stopper.done_at:
                    gen = gen[: stopper.done_at[r] - length]
                finish = "length"
                for j, t in enumerate(gen):
                    if t in eos:
                        gen, finish = gen[: j + 1], "stop"
                        break
                text, stopped = cut_at_stop(decode(tok, gen[:-1] if finish == "stop" else gen, self._tok_lock), stop)
                if stopped:
                    finish = "stop"
                elif finish == "length" and len(gen) < max_new_tokens:
                    finish = "cancelled" if cancel is not None and cancel.is_set() else finish
                results[i] = {"text": text, "token_ids": gen, "finish_reason": finish,
                              "prompt_tokens": length, "completion_tokens": len(gen)}
            with self._lock:
                self.stats.generated_tokens += sum(results[i]["completion_tokens"] for i in rows)
        return results  # type: ignore[return-value]

    def streamer(self, name: str, stop=(), callback=None):
        """A `generation.TextDeltaStreamer` for `generate(name, [prompt], streamer=...)`: the task's
        tokenizer, guarded by this model's tokenizer lock."""
        from ..generation import TextDeltaStreamer

        self._generation_task(name)
        return TextDeltaStreamer(self._tokenizer(), stop=stop, callback=callback, lock=self._tok_lock)

    # ---- memory ---------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes of the base's parameters and buffers, and of each task's stored state."""
        seen, base = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                base += t.numel() * t.element_size()
        with self._lock:
            tasks = {n: t.info["memory_bytes"] for n, t in self._tasks.items()}
        return {"base_bytes": base, "task_bytes": tasks, "total_bytes": base + sum(tasks.values())}
