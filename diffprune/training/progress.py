"""What a run tells its user while it trains: the whole run's ETA, the JSON Lines log, the diff's density."""

from __future__ import annotations

import json
from pathlib import Path

from ..methods import Phase
from .checkpoints import Position


def hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class RunClock:
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


def log_event(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def density(model) -> float | None:
    """Density of the diff now: expected (L0 stage with gates) or exact (after projection); None otherwise."""
    from ..model import DiffModel

    if not isinstance(model, DiffModel):
        return None
    if model.stage == "fixed":
        return model.nnz() / model.n_diffed
    if not model.config.use_gates:
        return None
    return model.expected_density()
