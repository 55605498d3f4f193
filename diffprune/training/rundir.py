"""The output directory of a run: deciding (before anything is written) whether it may be used, clearing
a run being replaced, and writing the finished run's artefact, metrics, model card and run.json."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .. import runs
from ..errors import TrainError
from ..methods import get_method
from .checkpoints import Position, latest_checkpoint
from .config import TrainConfig
from .progress import log_event


OWNED = (runs.RUN_FILE, runs.METRICS_FILE, runs.LOG_FILE, runs.CARD_FILE, "diff.safetensors", "diff_config.json",
          runs.MODEL_DIR, runs.ADAPTER_DIR, runs.CHECKPOINT_DIR, "rank-hashes")


def check_output_dir(cfg: TrainConfig) -> Path | None:
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


def clear_output_dir(out: Path) -> None:
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def finish(cfg, out: Path, model, tokenizer, family, spec, task_info, data, pos: Position, final: dict, settings: dict,
           world: int, n_train: int, n_val: int, wall: float) -> dict:
    """Write the finished run (main process): the method's artefact, metrics.json, the model card, run.json."""
    method = get_method(cfg.method)
    extra = {k: task_info[k] for k in runs.TASK_INFO_KEYS}
    extra.update({k: task_info[k] for k in ("label_column", "glue", "data_format") if k in task_info})
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
        "family": family.name,
        "labels": list(spec.labels),
        "final": final,
        "score": family.score(spec, final),
        "score_metrics": list(spec.score_metrics),
        "epochs": pos.epoch_records,
        **core,
        "stored_bytes": int(stored),
        "full_model_bytes": core["total_parameters"] * 4,
        **counts,  # method-specific: n_diffed, density, ... for the diff methods
        "train_seconds": round(pos.train_seconds, 3),
        "eval_seconds": round(pos.eval_seconds, 3),
        "wall_seconds": round(wall, 3),
        "peak_memory_bytes": pos.peak_memory_bytes or None,  # the main process's (`memory.peak_bytes`)
        "train_examples": n_train,
        "validation_examples": n_val,
        "steps": pos.global_step,
        "examples_seen": pos.examples,
        "world_size": world,
        "settings": settings,
    }
    runs.write_json(out / runs.METRICS_FILE, metrics)
    from ..modelcard import write_model_card

    write_model_card(out, metrics, task_info, data.source)
    runs.write_json(out / runs.RUN_FILE, {"format": runs.RUN_FORMAT, "status": "complete", "task_info": task_info,
                                          "data": data.source, "settings": settings})
    log_event(out / runs.LOG_FILE, {"event": "end", "time": time.time(), "score": metrics["score"], "final": final,
                                    "nnz": metrics["nnz"], "stored_bytes": stored, "train_seconds": metrics["train_seconds"],
                                    "peak_memory_bytes": metrics["peak_memory_bytes"]})
    shutil.rmtree(out / runs.CHECKPOINT_DIR, ignore_errors=True)
    return metrics
