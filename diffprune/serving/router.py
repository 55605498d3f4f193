"""`TaskRouter`: several `MultiTaskModel` bases side by side (one per model family), one namespace of tasks.

Design
------
A `MultiTaskModel` holds one base of one family and switches its tasks in place. A server that serves
classifier runs (``AutoModelForSequenceClassification`` base) and causal-LM runs (``AutoModelForCausalLM``
base) next to each other needs two bases: the router keeps one `MultiTaskModel` per family and sends
every call to the model that owns the task. Task names are unique across the bases. Each base keeps its
own lock, so a switch on one never touches the other; the server still runs every model call on one
model thread (`server.Batcher`), so they take turns.

The router has the `MultiTaskModel` methods the server uses (`tasks`, `describe`, `task_info`,
`predict`, `generate`, `add_task`, `remove_task`, `stats`, `memory_report`, ...); `create_app` wraps a
lone `MultiTaskModel` in one, so the server code has a single path. A task added at run time goes to
the base of its diff's family; a family without a base is refused with the fix (start the server with
a run of that family).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..diff_file import SparseDiff
from ..errors import TaskError, TaskExistsError, UnknownTaskError
from ..families import CAUSAL_LM, CLASSIFIER
from .multitask import (
    MultiTaskModel,
    Stats,
    check_task_name,
    default_task_name,
    diff_family,
)


class TaskRouter:
    """One `MultiTaskModel` per family; every task call goes to the model holding the task."""

    def __init__(self, models: Sequence[MultiTaskModel] | MultiTaskModel):
        models = [models] if isinstance(models, MultiTaskModel) else list(models)
        if not models:
            raise TaskError("a TaskRouter needs at least one MultiTaskModel")
        self.models: dict[str, MultiTaskModel] = {}
        for m in models:
            if m.family in self.models:
                raise TaskError(f"two {m.family} bases given; a router holds one base per family")
            self.models[m.family] = m
        names = [t for m in self.models.values() for t in m.tasks()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise TaskExistsError(f"task {dupes[0]!r} is loaded on two bases; task names must be unique")
        self._lock = threading.Lock()  # add / remove: the name check and the add are one step

    @classmethod
    def from_run_dirs(
        cls,
        runs: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
        base_models: Mapping[str, str] | None = None,
        allow_base_mismatch: bool = False,
    ) -> "TaskRouter":
        """Load run directories of any families (``{name: dir}`` or ``[dir, ...]``): one base per family,
        each the first of its runs' ``extra['base_model']`` unless `base_models` names it ({family: base})."""
        items = list(runs.items()) if isinstance(runs, Mapping) else [(None, r) for r in runs]
        if not items:
            raise TaskError("no run directories given")
        loaded = [(name, path, SparseDiff.load(path)) for name, path in items]
        by_family: dict[str, list] = {}
        for name, path, diff in loaded:
            by_family.setdefault(diff_family(diff), []).append((name, path, diff))
        models = []
        for family, group in by_family.items():
            base = (base_models or {}).get(family) or group[0][2].extra.get("base_model")
            if not base:
                raise TaskError(f"{group[0][1]}: the diff does not name its base model (extra['base_model']); pass it")
            model = MultiTaskModel(base, family=family, allow_base_mismatch=allow_base_mismatch)
            models.append(model)
        router = cls(models)
        for name, path, diff in loaded:
            router.add_task(name or default_task_name(diff, path), diff, run_dir=path)
        return router

    # ---- routing ------------------------------------------------------------------------------
    def model_for(self, name: str) -> MultiTaskModel:
        for m in self.models.values():
            if name in m:
                return m
        raise UnknownTaskError(f"unknown task {name!r}; loaded tasks: {sorted(self.tasks())}")

    def model_of_family(self, family: str) -> MultiTaskModel | None:
        return self.models.get(family)

    @property
    def primary(self) -> MultiTaskModel:
        """The first base (the classifier's when there is one): what /health names as base_model."""
        return self.models.get(CLASSIFIER) or next(iter(self.models.values()))

    # ---- registry -----------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        return [t for m in self.models.values() for t in m.tasks()]

    def __contains__(self, name: object) -> bool:
        return any(name in m for m in self.models.values())

    def __len__(self) -> int:
        return sum(len(m) for m in self.models.values())

    def describe(self) -> list[dict]:
        return [t for m in self.models.values() for t in m.describe()]

    def task_info(self, name: str) -> dict:
        return self.model_for(name).task_info(name)

    def generates(self, name: str) -> bool:
        return self.model_for(name).generates(name)

    @property
    def base_model_id(self) -> str | None:
        return self.primary.base_model_id

    @property
    def active_task(self) -> str | None:
        return self.primary.active_task

    def bases(self) -> list[dict]:
        return [{"family": f, "base_model": m.base_model_id, "tasks": len(m), "active_task": m.active_task}
                for f, m in self.models.items()]

    def add_task(self, name: str | None, diff: SparseDiff | str | os.PathLike, *, run_dir=None, metrics=None,
                 replace: bool = False) -> dict:
        """Add a task to the base of its diff's family (see `MultiTaskModel.add_task`)."""
        if not isinstance(diff, SparseDiff):
            run_dir = diff if run_dir is None else run_dir
            diff = SparseDiff.load(diff)
        family = diff_family(diff)
        name = check_task_name(name if name is not None else default_task_name(diff, run_dir))
        model = self.models.get(family)
        if model is None:
            hint = "a causal-LM run" if family == CAUSAL_LM else f"a {family} run"
            raise TaskError(
                f"task {name!r} is a {family} run, but this server has no {family} base (it serves "
                f"{', '.join(self.models)}): start `diffprune serve` with {hint} among its RUN_DIRs"
            )
        with self._lock:
            for other in self.models.values():
                if other is not model and name in other:
                    raise TaskExistsError(
                        f"task {name!r} is already loaded on the {other.family} base (remove it first)"
                    )
            return model.add_task(name, diff, run_dir=Path(run_dir) if run_dir is not None else None,
                                  metrics=metrics, replace=replace)

    def remove_task(self, name: str) -> dict:
        with self._lock:
            return self.model_for(name).remove_task(name)

    # ---- calls --------------------------------------------------------------------------------
    def split_inputs(self, name: str, inputs):
        return self.model_for(name).split_inputs(name, inputs)

    def predict(self, name: str, inputs, batch_size: int | None = None) -> list[dict]:
        return self.model_for(name).predict(name, inputs, batch_size=batch_size)

    def render(self, name: str, **kwargs) -> list[int]:
        return self.model_for(name).render(name, **kwargs)

    def check_prompt(self, name: str, ids, max_new_tokens: int) -> None:
        self.model_for(name).check_prompt(name, ids, max_new_tokens)

    def generate(self, name: str, prompts, **kwargs) -> list[dict]:
        return self.model_for(name).generate(name, prompts, **kwargs)

    def streamer(self, name: str, **kwargs):
        return self.model_for(name).streamer(name, **kwargs)

    # ---- counters -----------------------------------------------------------------------------
    @property
    def stats(self) -> Stats:
        """The bases' counters summed (per base: `per_family_stats`)."""
        total = Stats()
        for m in self.models.values():
            total = total.add(m.stats)
        return total

    def per_family_stats(self) -> dict:
        return {f: m.stats.to_dict() for f, m in self.models.items()}

    def memory_report(self) -> dict:
        reports = {f: m.memory_report() for f, m in self.models.items()}
        base = sum(r["base_bytes"] for r in reports.values())
        tasks = {n: b for r in reports.values() for n, b in r["task_bytes"].items()}
        out = {"base_bytes": base, "task_bytes": tasks, "total_bytes": base + sum(tasks.values())}
        if len(reports) > 1:
            out["per_family"] = reports
        return out
