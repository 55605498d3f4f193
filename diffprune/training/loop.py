"""The training loop: `train(cfg)` reads top to bottom; each step of it is a small named helper here or
in its own module (`config`, `checkpoints`, `rundir`, `memory`, `progress`, `distributed`)."""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import lean, runs, sharding
from ..batching import pad_id
from ..errors import TrainError
from ..families import CAUSAL_LM, CLASSIFIER, Family, get_family
from ..methods import Phase, get_method
from . import checkpoints, memory, rundir
from .checkpoints import Position
from .config import TrainConfig
from .distributed import (barrier, broadcast_object, gather_objects, is_main, local_indices, local_processes,
                          permutation, refuse_accelerate_fsdp, step_noise_seed)
from .progress import RunClock, density, hms, log_event

STEP_SLEEP_ENV = "DIFFPRUNE_DEBUG_STEP_SLEEP"  # tests: slow each step down to kill a run mid-way


@dataclass
class Workload:
    """A task ready to train: its family, data (encoded), base model and tokenizer."""

    family: Family
    spec: object
    data: object
    train: object
    validation: object
    tokenizer: object
    pad: int

    def batch(self, indices, device) -> dict[str, torch.Tensor]:
        b = self.family.collate(self.train, indices, self.pad, self.spec)
        return {k: v.to(device) for k, v in b.items()}


# ---- before anything is written -------------------------------------------------------------------------
def choose_family(cfg: TrainConfig) -> Family:
    """The family a run trains: cfg.family, else causal-lm when the training file holds LM rows."""
    if cfg.family is not None:
        return get_family(cfg.family)
    if cfg.task is None and cfg.train_file is not None and not cfg.text_columns and not cfg.label_column:
        from ..lmdata import looks_like_lm_file

        if looks_like_lm_file(cfg.train_file):
            return get_family(CAUSAL_LM)
    return get_family(CLASSIFIER)


def _custom_name(cfg: TrainConfig) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.output_dir).resolve().name).strip("-.") or "custom"
    return name[:64]


def _settings(cfg: TrainConfig, base_model: str, family: Family) -> dict:
    d = cfg.to_dict()
    d["model"] = base_model
    d["lr"] = cfg.resolved_lr()
    d["family"] = family.name
    for k in ("data_dir", "train_file", "validation_file"):
        if d[k] is not None:
            d[k] = str(Path(d[k]).resolve())
    return d


def _refuse_bad_options(opts: dict, world: int) -> None:
    if opts["optimizer_in_backward"] and world > 1:
        raise TrainError(
            f"--optimizer-in-backward (part of --memory lean) steps each process on its own gradient, before "
            f"data-parallel averaging: train with one process, or pass --optimizer-in-backward false with {world}"
        )


def _load_workload(cfg: TrainConfig, family: Family, base_model: str, acc, show: bool):
    """Data (validated in full), base model and tokenizer, the method's model around it."""
    with acc.main_process_first():
        data = family.load_data(cfg, _custom_name(cfg))
    spec = data.spec
    if show:
        print(f"task {spec.name}: {spec.task_type} ({data.source.get('task_type_from', '')})", file=sys.stderr)
    base, tokenizer, missing = family.load_base(base_model, spec, cfg.seed)
    method = get_method(cfg.method)
    estimate = None
    if cfg.check_memory:
        estimate = memory.check_memory(method, base, acc.device, cfg, shards=acc.num_processes if cfg.fsdp else 1,
                                       sharing=local_processes() if acc.device.type == "cpu" else 1, missing=missing,
                                       family=family)
    with runs.hf_quiet():
        model = method.build(base, missing, cfg, family)
    if not cfg.fsdp:  # (--fsdp: sharding.setup moves it, block by block)
        model.to(acc.device)
    pad = pad_id(tokenizer)
    train_enc = family.encode(tokenizer, data.train, spec, cfg.max_seq_length)
    val_enc = family.encode(tokenizer, data.validation, spec, cfg.max_seq_length)
    for name, enc in (("training", train_enc), ("validation", val_enc)):
        _report_truncation(name, enc, cfg.max_seq_length, show)
    if len(train_enc) == 0:
        raise TrainError("no training example is left after truncation at --max-seq-length "
                         f"{cfg.max_seq_length}; raise it")
    return Workload(family, spec, data, train_enc, val_enc, tokenizer, pad), model, missing, estimate


def _report_truncation(name: str, enc, max_len: int, show: bool) -> None:
    cut, dropped = getattr(enc, "truncated", 0), getattr(enc, "dropped", 0)
    if show and (cut or dropped):
        print(f"{name} data: {cut:,} example(s) cut at --max-seq-length {max_len}"
              + (f", {dropped:,} dropped (nothing left to learn from)" if dropped else ""), file=sys.stderr)


# ---- the run directory ------------------------------------------------------------------------------------
def _open_run_dir(acc, out: Path, ckpt, ckpt_state, wl: Workload, model, task_info, settings, missing) -> Position:
    """A fresh run directory (run.json, the log's start event), or the checkpoint's state loaded."""
    log_path = out / runs.LOG_FILE
    if ckpt is None:
        if is_main(acc):
            out.mkdir(parents=True, exist_ok=True)
            rundir.clear_output_dir(out)
            runs.write_json(out / runs.RUN_FILE, {"format": runs.RUN_FORMAT, "status": "training", "task_info": task_info,
                                                  "data": wl.data.source, "settings": settings})
            start = {"event": "start", "time": time.time(), "world_size": acc.num_processes, "settings": settings,
                     "train_examples": len(wl.train), "validation_examples": len(wl.validation),
                     "new_parameters": missing}
            for key in ("truncated", "dropped"):
                if hasattr(wl.train, key):
                    start[f"train_{key}"] = getattr(wl.train, key)
                    start[f"validation_{key}"] = getattr(wl.validation, key)
            log_event(log_path, start)
        barrier(acc)
        return Position()
    pos = Position(**ckpt_state["position"])
    checkpoints.restore_trainable(model, ckpt)
    if is_main(acc):
        log_event(log_path, {"event": "resume", "time": time.time(), "checkpoint": ckpt.name, "phase": pos.phase,
                             "epoch": pos.epoch, "step": pos.step, "global_step": pos.global_step})
    barrier(acc)
    return pos


def _start_from_l0(acc, out: Path, model, src: Path, state: dict) -> Position:
    """--from-l0: the other run's L0 state and position (its L0 epochs, steps and time count as this run's)."""
    checkpoints.restore_trainable(model, src)
    pos = Position(**state["position"])
    if is_main(acc):
        log_event(out / runs.LOG_FILE, {"event": "from_l0", "time": time.time(), "run": str(src.parent.parent.resolve()),
                                        "checkpoint": src.name, "global_step": pos.global_step})
    barrier(acc)
    return pos


def _stop_after_l0(acc, out: Path, trainer) -> dict:
    """--stop-after l0: the run ends at its L0 checkpoint (written at the last L0 epoch's end)."""
    ckpt = checkpoints.latest_checkpoint(out)
    score = trainer.pos.epoch_records[-1]["score"] if trainer.pos.epoch_records else None
    peak = trainer.note_peak()
    trainer.log({"event": "stop", "after": "l0", "time": time.time(), "checkpoint": ckpt.name if ckpt else None,
                 "peak_memory_bytes": peak})
    trainer.say(f"stopped after the L0 stage (--stop-after l0); its state is kept in {out / runs.CHECKPOINT_DIR}: "
                f"--from-l0 {out} starts a run on any budget from it, --resume continues this one")
    barrier(acc)
    acc.end_training()
    return {"stopped_after": "l0", "output_dir": str(out), "checkpoint": str(ckpt) if ckpt else None,
            "l0_score": score, "density": trainer.pos.epoch_records[-1].get("density") if score is not None else None,
            "train_seconds": round(trainer.pos.train_seconds, 3), "peak_memory_bytes": peak}


def _seed_processes(cfg: TrainConfig, rank: int, ckpt) -> None:
    """Each process draws its own dropout / gate noise from here on (the model init is shared); a
    resumed run continues every process's stream where the checkpoint left it."""
    torch.manual_seed(cfg.seed * 1000 + 7919 * rank + 1)
    if ckpt is not None:
        rng, _ = checkpoints.load_safetensors(ckpt / f"rng-rank{rank}.safetensors")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


# ---- evaluation -----------------------------------------------------------------------------------------
def evaluate(acc, model, wl: Workload, batch_size: int, cfg: TrainConfig, which: str = "validation") -> dict:
    """Validation metrics (eval mode); the examples are shared out over the processes."""
    enc = getattr(wl, which)
    if getattr(model, "sharded", False):
        # FSDP: every forward is a collective, so every process runs the same batches (all of them); their
        # results are the same, each process keeps its own
        part = wl.family.evaluate(model, enc, wl.spec, tokenizer=wl.tokenizer, batch_size=batch_size,
                                  pad_token_id=wl.pad, device=acc.device, indices=list(range(len(enc))), cfg=cfg)
        sharding.reshard(model)  # a forward without backward leaves the root group gathered: back to its shards
        return wl.family.combine([part], enc, wl.spec)
    indices = list(range(len(enc)))[acc.process_index::acc.num_processes]
    part = wl.family.evaluate(model, enc, wl.spec, tokenizer=wl.tokenizer, batch_size=batch_size,
                              pad_token_id=wl.pad, device=acc.device, indices=indices, cfg=cfg)
    return wl.family.combine(gather_objects(acc, part), enc, wl.spec)


# ---- one phase ------------------------------------------------------------------------------------------
def _phase_optimizer(method, model, phase: Phase, cfg: TrainConfig, opts: dict, resume_from):
    optimizer = method.optimizer(model, phase, cfg)
    if opts["optimizer_in_backward"]:
        optimizer = lean.OptimizerInBackward(optimizer.param_groups, cfg.max_grad_norm,
                                             **memory.adamw_settings(optimizer))
    if resume_from is not None:
        opt_tensors, opt_meta = checkpoints.load_safetensors(resume_from / "optimizer.safetensors")
        optimizer.load_state_dict(checkpoints.optimizer_from_safetensors(opt_tensors, opt_meta))
        sharding.localize_optimizer_state(optimizer)  # full moments onto sharded parameters' shards
    return optimizer


class _Trainer:
    """The state one run's phases share: the accelerator, the model, the data, the position, the clock."""

    def __init__(self, cfg, acc, model, wl: Workload, pos: Position, out: Path, settings: dict, opts: dict,
                 autocast, clock: RunClock, steps_per_epoch: int, show: bool, wall0: float):
        self.cfg, self.acc, self.model, self.wl, self.pos, self.out = cfg, acc, model, wl, pos, out
        self.settings, self.opts, self.autocast, self.clock, self.show = settings, opts, autocast, clock, show
        self.steps_per_epoch = steps_per_epoch
        self.log_path = out / runs.LOG_FILE if is_main(acc) else None
        self.method = get_method(cfg.method)
        self.last_metrics, self.changed_since_eval = None, True
        self.step_sleep = float(os.environ.get(STEP_SLEEP_ENV) or 0)
        self.wall0, self.wall_before = wall0, pos.wall_seconds  # this process's start; wall time of earlier runs

    def log(self, record: dict) -> None:
        if self.log_path is not None:
            log_event(self.log_path, record)

    def note_peak(self) -> int | None:
        """This process's peak memory so far, kept in the position as the run's (a resumed run's includes
        the processes before it)."""
        now = memory.peak_bytes(self.acc.device)
        if now is not None:
            self.pos.peak_memory_bytes = max(self.pos.peak_memory_bytes, now)
        return self.pos.peak_memory_bytes or None

    def say(self, text: str) -> None:
        if self.show:
            print(text, file=sys.stderr)

    def timed_eval(self) -> dict:
        t = time.time()
        with self.autocast():
            m = evaluate(self.acc, self.model, self.wl, self.cfg.eval_batch_size, self.cfg)
        self.pos.eval_seconds += time.time() - t
        self.last_metrics, self.changed_since_eval = m, False
        return m

    def project(self) -> None:
        """Projection onto exactly round(t * n) nonzeros, scored before the fixed-mask phase."""
        model, pos = self.model, self.pos
        model.project()
        nnz = model.nnz()
        if not self.method.projects:  # bitfit: it keeps every entry it trains; nothing to score here
            self.log({"event": "project", "nnz": nnz, "n_diffed": model.n_diffed, "target_sparsity": 1.0})
            return
        pos.after_projection = {"nnz": nnz, "metrics": self.timed_eval()}
        pos.after_projection["score"] = self.wl.family.score(self.wl.spec, pos.after_projection["metrics"])
        self.log({"event": "project", "nnz": nnz, "n_diffed": model.n_diffed,
                  "target_sparsity": self.cfg.target_sparsity, **pos.after_projection})
        self.say(f"projected to {nnz:,} nonzeros ({nnz / model.n_diffed:.3%} of {model.n_diffed:,}); "
                 f"validation score {pos.after_projection['score']:.2f} before fixed-mask training")

    def run_phase(self, pi: int, phase: Phase, ckpt) -> None:
        cfg, pos, acc = self.cfg, self.pos, self.acc
        self.method.start_phase(self.model, phase)
        if getattr(self.model, "sharded", False):
            sharding.prepare_phase(self.model)  # this phase's diff state sharded, the weights resharded
        resuming = ckpt is not None and pi == pos.phase and (pos.epoch or pos.step)
        optimizer = _phase_optimizer(self.method, self.model, phase, cfg, self.opts, ckpt if resuming else None)
        if getattr(self.model, "sharded", False):
            wrapped = self.model  # FSDP reduces the gradients: no data-parallel wrapper
        elif self.opts["optimizer_in_backward"]:
            wrapped = acc.prepare(self.model)
        else:
            wrapped, optimizer = acc.prepare(self.model, optimizer)
        for epoch in range(pos.epoch if pi == pos.phase else 0, phase.epochs):
            start = pos.step if (pi == pos.phase and epoch == pos.epoch) else 0
            self.train_epoch(wrapped, optimizer, pi, phase, epoch, start)
            self.end_epoch(optimizer, pi, phase, epoch)
        if isinstance(optimizer, lean.OptimizerInBackward):
            optimizer.close()
            self.log({"event": "optimizer_in_backward", "phase": phase.name, "steps": optimizer.steps,
                      "steps_over_max_grad_norm": optimizer.clipped_steps})
        acc.free_memory()
        del wrapped, optimizer
        pos.phase, pos.epoch, pos.step = pi + 1, 0, 0

    def train_epoch(self, wrapped, optimizer, pi: int, phase: Phase, epoch: int, start: int) -> None:
        from tqdm.auto import tqdm

        cfg, pos, acc, spe = self.cfg, self.pos, self.acc, self.steps_per_epoch
        perm = permutation(cfg.seed, pi, epoch, len(self.wl.train))
        # what is clipped is what the optimiser steps (under --fsdp, model.parameters() can hold the gathered
        # copies FSDP made for a validation forward instead of the sharded parameters)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        total_steps = phase.epochs * spe
        bar = tqdm(total=spe, initial=start, disable=not self.show, dynamic_ncols=True, file=sys.stderr,
                   desc=f"{phase.name} epoch {epoch + 1}/{phase.epochs}")
        wrapped.train()
        loss_sum, loss_n, seen, t_log = 0.0, 0, 0, time.time()
        for step in range(start, spe):
            t0 = time.time()
            for g in optimizer.param_groups:  # linear decay to 0 over the phase, no warm-up
                g["lr"] = g["initial_lr"] * (1.0 - (epoch * spe + step) / total_steps)
            idx = local_indices(perm, step, cfg.batch_size, acc.process_index, acc.num_processes)
            if cfg.fsdp:  # the same gate noise on every process: one sample per global batch
                self.model.step_seed = step_noise_seed(cfg.seed, pos.global_step)
            with self.autocast():
                loss = wrapped(**self.wl.batch(idx, acc.device)).loss
            acc.backward(loss)
            if not self.opts["optimizer_in_backward"]:  # else: clipped with the last step's norm, in backward
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if self.step_sleep:
                time.sleep(self.step_sleep)
            pos.step, pos.global_step = step + 1, pos.global_step + 1
            n_ex = len(idx) * acc.num_processes
            pos.examples += n_ex
            seen += n_ex
            loss_sum = loss_sum + loss.detach()  # a device tensor, read when logging: no GPU sync per step
            loss_n += 1
            pos.train_seconds += time.time() - t0
            self.changed_since_eval = True
            if pos.global_step % cfg.log_steps == 0 or step + 1 == spe:
                rate = seen / max(time.time() - t_log, 1e-9)
                self.log_step(bar, phase, epoch, step, float(loss_sum) / loss_n, optimizer, rate)
                loss_sum, loss_n, seen, t_log = 0.0, 0, 0, time.time()
            bar.update(1)
            if cfg.save_steps and pos.global_step % cfg.save_steps == 0 and pos.step < spe:
                checkpoints.write_checkpoint(acc, self.out, self.model, optimizer, pos, self.settings)
        bar.close()

    def log_step(self, bar, phase: Phase, epoch: int, step: int, mean_loss: float, optimizer, rate: float) -> None:
        d = density(self.model)
        rec = {"step": self.pos.global_step, "phase": phase.name,
               "epoch": round(epoch + (step + 1) / self.steps_per_epoch, 4), "loss": mean_loss,
               "lr": optimizer.param_groups[0]["lr"], "examples_per_s": float(f"{rate:.4g}")}  # 4 significant digits (a 1B model's 0.0147 is not 0.01)
        if d is not None:
            rec["density"] = d
        self.log(rec)
        shown = {"density": f"{d:.3%}"} if d is not None else {}
        eta = self.clock.eta(self.pos)
        if eta is not None:
            shown["run ETA"] = hms(eta)
        bar.set_postfix({"loss": f"{mean_loss:.4f}", **shown, "ex/s": f"{rate:.1f}"}, refresh=False)

    def end_epoch(self, optimizer, pi: int, phase: Phase, epoch: int) -> None:
        """Validation, the epoch's record, then a checkpoint at the start of the next epoch."""
        pos = self.pos
        metrics = self.timed_eval()
        record = {"phase": phase.name, "epoch": epoch + 1, "metrics": metrics,
                  "score": self.wl.family.score(self.wl.spec, metrics), "global_step": pos.global_step}
        d = density(self.model)
        if d is not None:
            record["density"] = d
        pos.epoch_records.append(record)
        peak = self.note_peak()
        self.log({"event": "eval", **record, "train_seconds": round(pos.train_seconds, 3),  # (the run's so far)
                  "peak_memory_bytes": peak})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        mem = f"; peak memory {peak / 2**30:.2f} GiB" if peak else ""
        self.say(f"{phase.name} epoch {epoch + 1}/{phase.epochs}: {shown} (score {record['score']:.2f}{mem})")
        pos.epoch, pos.step = epoch + 1, 0
        if pos.epoch == phase.epochs:
            pos.phase, pos.epoch = pi + 1, 0
        pos.wall_seconds = self.wall_before + time.time() - self.wall0
        checkpoints.write_checkpoint(self.acc, self.out, self.model, optimizer, pos, self.settings)


# ---- the run ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Train per `cfg`, write the run directory, and return the metrics also written to metrics.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    wall0 = time.time()
    cfg.validate()
    refuse_accelerate_fsdp()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main, world, rank = is_main(acc), acc.num_processes, acc.process_index
    show = cfg.progress and main
    out = Path(cfg.output_dir)

    # 1. everything that can fail on bad input, before the output directory is touched
    opts = cfg.memory_options(accelerator=acc.device.type != "cpu")
    _refuse_bad_options(opts, world)
    ckpt = rundir.check_output_dir(cfg)
    base_model = runs.resolve_model(cfg.model)
    family = choose_family(cfg)
    family.check_model(base_model)
    settings = _settings(cfg, base_model, family)
    # a checkpoint written with other settings is refused before the model loads
    ckpt_state = checkpoints.read_checkpoint(ckpt, settings, world) if ckpt is not None else None
    # --from-l0: another run's L0 state, refused here when it cannot be this run's first stage
    fork = checkpoints.read_l0_checkpoint(Path(cfg.from_l0), settings, world) \
        if ckpt is None and cfg.from_l0 is not None else None
    if ckpt is None and cfg.resume and show:
        print(f"--resume: {out} has no checkpoint yet (the run stopped before its first one); "
              "starting from the beginning", file=sys.stderr)
    set_seed(cfg.seed)
    wl, model, missing, estimate = _load_workload(cfg, family, base_model, acc, show)
    autocast = memory.memory_setup(model, opts, cfg, acc.device)
    if cfg.fsdp:
        blocks = sharding.setup(model, acc.device, world)
        if show and world > 1:
            print(f"--fsdp: {blocks} blocks and the root sharded over {world} processes; the diff state per tensor",
                  file=sys.stderr)
    method = get_method(cfg.method)
    phases = method.phases(cfg)
    steps_per_epoch = -(-len(wl.train) // (cfg.batch_size * world))
    task_info = family.task_info(wl.spec, base_model, cfg.max_seq_length, cfg.method, wl.data)

    # 2. the output directory: fresh, or resumed from the checkpoint
    pos = _open_run_dir(acc, out, ckpt, ckpt_state, wl, model, task_info, settings, missing)
    if fork is not None:
        pos = _start_from_l0(acc, out, model, *fork)
    _seed_processes(cfg, rank, ckpt if ckpt is not None else (fork[0] if fork else None))
    clock = RunClock(phases, steps_per_epoch, pos, method.projects)
    if show:
        print(f"training: {clock.describe(phases, steps_per_epoch)}; the bars show the whole run's ETA as 'run ETA'",
              file=sys.stderr)
    trainer = _Trainer(cfg, acc, model, wl, pos, out, settings, opts, autocast, clock, steps_per_epoch, show, wall0)
    if estimate is not None:  # what the memory check expected, beside the peaks each evaluation logs
        trainer.log({"event": "memory_estimate", "time": time.time(), **estimate})

    # 3. the phases: [candidate warm-up], L0 or dense, projection, fixed mask (or one phase: full, lora)
    if getattr(model, "stage", None) == "warmup":
        memory.candidate_warmup(model, cfg, len(wl.train), lambda idx: wl.family.collate(wl.train, idx, wl.pad, wl.spec),
                                acc, autocast, pos, trainer.log_path, show)
    for pi, phase in enumerate(phases):
        if pi < pos.phase:
            continue
        if phase.name == "fixed" and model.stage == "l0":
            if cfg.stop_after == "l0":
                return _stop_after_l0(acc, out, trainer)
            trainer.project()
        if phase.epochs:
            trainer.run_phase(pi, phase, ckpt)
    final = trainer.last_metrics if (trainer.last_metrics is not None and not trainer.changed_since_eval) \
        else trainer.timed_eval()
    trainer.note_peak()

    # 4. the artefacts (main process), then the metrics on every process
    if getattr(model, "sharded", False):
        sharding.unshard(model)  # the diff state and head gathered on every process (collectives)
    if cfg.debug_rank_hashes:
        _write_rank_hash(out, model, method, rank)
    metrics = None
    if main:
        metrics = rundir.finish(cfg, out, model, wl.tokenizer, family, wl.spec, task_info, wl.data, pos, final, settings,
                                world, len(wl.train), len(wl.validation), trainer.wall_before + time.time() - wall0)
    barrier(acc)
    metrics = broadcast_object(acc, metrics)
    acc.end_training()
    return metrics


def _write_rank_hash(out: Path, model, method, rank: int) -> None:
    """Tests: every process writes a hash of its final trainable state to RUN_DIR/rank-hashes/."""
    import json

    from .._io import atomic_write_text

    h = {"rank": rank, "hash": checkpoints.state_hash(model)}
    if method.artefact == "diff":
        h["nnz"] = model.nnz()
    hdir = out / "rank-hashes"
    hdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(hdir / f"rank{rank}.json", json.dumps(h) + "\n")
