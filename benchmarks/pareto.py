#!/usr/bin/env python
"""Accuracy per stored byte: structured diff pruning against LoRA, SHiRA, magnitude pruning, BitFit and
full finetuning on the GLUE tasks, every point a real run of `diffprune train` on the same data.

    python benchmarks/pareto.py                          # the grid (resumable; several instances share it)
    python benchmarks/pareto.py --tasks sst2 stsb        # some tasks
    python benchmarks/pareto.py --report-only            # tables and plot from the finished runs

Points per task (seed 0):
  structured, magnitude   budgets 0.025%, 0.05%, 0.1%, 0.25%, 0.5%, 1%: ONE first stage per learning rate
                          (`--stop-after l0`), projected onto every budget by `--from-l0` runs, each
                          with its own fixed-mask stage; every diff saved as fp32, bf16 and int8 values
                          (`diffprune compress`) and each scored
  lora                    PEFT LoRA r = 1, 2, 4, 8, 16 on query/value + head; adapter in fp32 (as PEFT
                          saves it) and in bf16
  shira                   PEFT SHiRA (random fixed mask) with r sized to the 0.1% and 0.5% budgets;
                          fp32 and bf16
  bitfit, full            the two ends (BitFit: biases + head; a diff of the biases, fp32/bf16/int8)

Learning rates: every point of every method is the better of two learning rates of the stage that
trains its stored values, chosen per task and point on the validation score: LoRA and SHiRA three
values of their learning rate (`LRS`) at every rank; structured and magnitude two values of the
fixed-mask stage's (`FIXMASK_LRS`) at every budget, from the first stage whose learning rate (two
values, `LRS`) won at the reference budget 0.5% (`REFERENCE`); BitFit and full finetuning, one point
each, two values. (On 500 examples the fixed-mask stage has ~90 steps: at 0.1% its lr 5e-4 left
SST-2 at 70.9 where 5e-3 reached 78.0, so one fixed value would have compared an under-trained
diff with a tuned LoRA.) Scores are GLUE validation scores (per-task mean of its metrics x 100), the
same data used to choose the learning rate, as in the paper and in GLUE dev-set reporting.

Writes benchmarks/results/pareto.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not
import _env  # noqa: E402
from glue_accuracy import _claim  # noqa: E402  (one lock file per run: instances share a grid)

from diffprune._io import atomic_write_text  # noqa: E402
from diffprune.runs import PACKAGED_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("sst2", "stsb", "mrpc", "rte", "cola")  # run order: short, informative tasks first
BUDGETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)  # 0.025%: below LoRA r=1's bytes
SIZES = {
    "structured": BUDGETS, "magnitude": BUDGETS, "lora": (1, 2, 4, 8, 16), "shira": (0.001, 0.005),
    "bitfit": (None,), "full": (None,),
}
REFERENCE = {"structured": 0.005, "magnitude": 0.005, "lora": 8, "shira": 0.005, "bitfit": None, "full": None}
LRS = {  # the searched values of each method's first-stage learning rate (structured/magnitude: w; fixed-mask 5e-4)
    "structured": (1e-4, 5e-4), "magnitude": (5e-5, 1e-4), "lora": (1e-3, 2e-3, 5e-3), "shira": (5e-4, 2e-3, 5e-3),
    "bitfit": (1e-3, 5e-3), "full": (5e-5, 1e-4),
}
VALUE_DTYPES = {"structured": ("fp32", "bf16", "int8"), "magnitude": ("fp32", "bf16", "int8"),
                "bitfit": ("fp32", "bf16", "int8"), "lora": ("fp32", "bf16"), "shira": ("fp32", "bf16"),
                "full": ("fp32",)}
TITLES = {"structured": "structured diff pruning", "magnitude": "magnitude (non-adaptive)", "lora": "LoRA (q,v)",
          "shira": "SHiRA (q,v)", "bitfit": "BitFit", "full": "full finetuning"}
COMMON = {"batch_size": 16, "max_seq_length": 128, "epochs": 3, "fixmask_epochs": 3, "fixmask_lr": 5e-4}
FIXMASK_LRS = (5e-4, 5e-3)  # the fixed-mask stage's searched values (structured, magnitude); the first is COMMON's
STAGED = ("structured", "magnitude")  # one first stage feeds every budget; FIXMASK_LRS searched at every budget
PER_POINT_LR = ("lora", "shira")  # LRS searched at every size
EXTRA_SEEDS = {"tasks": ("rte", "mrpc"), "points": (("structured", 0.005), ("lora", 8)), "seeds": (1, 2)}


@dataclass(frozen=True)
class Point:
    task: str
    method: str
    size: float | int | None
    lr: float
    seed: int = 0
    fixmask_lr: float | None = None  # structured / magnitude: None = COMMON's

    @property
    def name(self) -> str:
        size = "" if self.size is None else (f"-r{self.size}" if self.method == "lora" else f"-{self.size:g}")
        flr = "" if self.fixmask_lr in (None, COMMON["fixmask_lr"]) else f"-flr{self.fixmask_lr:g}"
        return f"{self.task}-{self.method}{size}-lr{self.lr:g}{flr}-s{self.seed}"

    @property
    def l0_name(self) -> str:
        return f"{self.task}-{self.method}-l0-lr{self.lr:g}-s{self.seed}"

    @property
    def staged(self) -> bool:  # one first stage feeds every budget
        return self.method in STAGED


def train_config(p: Point, args, out: Path, **kw):
    from diffprune.training import TrainConfig

    settings = dict(COMMON)
    if args.epochs is not None:
        settings.update(epochs=args.epochs, fixmask_epochs=args.epochs)
    if p.method == "lora":
        settings["lora_r"] = p.size
    if p.method in ("structured", "magnitude", "shira") and p.size is not None:
        settings["target_sparsity"] = p.size
    if p.fixmask_lr is not None:
        settings["fixmask_lr"] = p.fixmask_lr
    settings.update(kw)
    return TrainConfig(output_dir=str(out), task=p.task, data_dir=args.data_dir, model=args.model, method=p.method,
                       lr=p.lr, seed=p.seed,
                       max_train_samples=samples_of(p.task, args), progress=not args.no_progress, save_steps=0,
                       **settings)


def samples_of(task: str, args) -> int | None:
    """The training subset of `task`: --train-samples, or --sst2-train-samples for SST-2 (None = all)."""
    if task == "sst2" and args.sst2_train_samples is not None:
        return args.sst2_train_samples or None
    return args.train_samples


# ---- one point --------------------------------------------------------------------------------------
def ensure_l0(p: Point, args) -> Path | None:
    """The first stage of a staged point, trained once (`--stop-after l0`); None while another instance
    trains it."""
    from diffprune.training import latest_checkpoint, train

    out = Path(args.work_dir) / p.l0_name
    if latest_checkpoint(out) is not None and (out / "stopped.json").exists():
        return out
    lock = _claim(out)
    if lock is None:
        return None
    try:
        cfg = train_config(p, args, out, stop_after="l0", overwrite=out.exists() and not (out / "checkpoint").exists(),
                           resume=(out / "checkpoint").exists())
        print(f"== {p.l0_name}: first stage", flush=True)
        info = train(cfg)
        atomic_write_text(out / "stopped.json", json.dumps(info, indent=2) + "\n")
    finally:
        lock.unlink(missing_ok=True)
    return out


def finished(p: Point, args) -> list[dict] | None:
    """The records of a finished point (None if not finished); a point trained on another subset than
    this run's is refused: one work dir holds one protocol."""
    path = Path(args.work_dir) / p.name / "pareto_records.json"
    if not path.exists():
        return None
    records = json.loads(path.read_text())
    if records[0]["train_samples"] != samples_of(p.task, args):
        raise SystemExit(f"{path.parent} was trained on {records[0]['train_samples'] or 'all'} examples, not "
                         f"{samples_of(p.task, args) or 'all'}: use another --work-dir for another protocol")
    return records


def run_point(p: Point, args) -> list[dict] | None:
    """Train one point (unless done) and score its stored forms; None when another instance has it."""
    from diffprune.training import train

    out = Path(args.work_dir) / p.name
    record_path = out / "pareto_records.json"
    done = finished(p, args)
    if done is not None:
        return done
    l0 = None
    if p.staged:
        l0 = ensure_l0(p, args)
        if l0 is None:
            return None
    lock = _claim(out)
    if lock is None:
        return None
    try:
        if record_path.exists():
            return json.loads(record_path.read_text())
        resume = (out / "checkpoint").exists()
        kw = {"from_l0": str(l0)} if l0 is not None else {}
        cfg = train_config(p, args, out, resume=resume, overwrite=out.exists() and not resume, **kw)
        print(f"== {p.name}", flush=True)
        t0 = time.time()
        metrics = train(cfg)
        records = score_forms(p, out, metrics, args)
        print("   " + "; ".join(f"{r['value_dtype']} {r['score']:.2f} ({r['stored_bytes']:,} B)" for r in records)
              + f"  {time.time() - t0:.0f}s", flush=True)
        atomic_write_text(record_path, json.dumps(records, indent=2) + "\n")
        return records
    finally:
        lock.unlink(missing_ok=True)


def score_forms(p: Point, out: Path, metrics: dict, args) -> list[dict]:
    """One record per stored form of the run (fp32 as trained; bf16 / int8 rewritten and re-scored)."""
    base = {
        "task": p.task, "method": p.method, "size": p.size, "lr": p.lr, "seed": p.seed, "nnz": metrics["nnz"],
        "task_parameters": metrics["task_parameters"], "model": metrics["base_model"],
        "train_seconds": metrics["train_seconds"], "train_samples": samples_of(p.task, args),
        "first_stage": _first_stage(metrics), "settings": metrics["settings"], "run": p.name,
        "command": _env.command(), "machine": _env.machine(), "versions": _env.versions(), "date": _env.now(),
    }
    if "after_projection" in metrics:
        base["after_projection"] = metrics["after_projection"]["score"]
    records = [{**base, "value_dtype": "fp32", "score": metrics["score"], "metrics": metrics["final"],
                "stored_bytes": metrics["stored_bytes"], "file_format": file_format(p.method, out),
                **bits_of(p.method, out)}]
    for dtype in VALUE_DTYPES[p.method][1:]:
        form = out.parent / f"{p.name}@{dtype}"
        if p.method in ("lora", "shira"):
            size = adapter_copy(out, form, dtype)
        else:
            size = compress(out, form, dtype)
        result = evaluate(form, args)
        records.append({**base, "value_dtype": dtype, "score": result["score"], "metrics": result["metrics"],
                        "stored_bytes": size, "file_format": file_format(p.method, form), **bits_of(p.method, form)})
    return records


DIFF_METHODS = ("structured", "magnitude", "bitfit")  # stored as diffprune diff files


BITS = ("bits_per_nonzero", "position_bits_per_nonzero", "position_bound_bits_per_nonzero", "value_bits_per_nonzero")


def bits_of(method: str, run_dir: Path) -> dict:
    """{"bits": ...} for a stored diff (`SparseDiff.summary`: coded positions + values per nonzero, the
    positions' bound log2 C(n, k) / k); {} for the other methods' files or a run whose diff is gone."""
    from diffprune.diff_file import SparseDiff

    if method not in DIFF_METHODS or not (run_dir / "diff.safetensors").exists():
        return {}
    summary = SparseDiff.load(run_dir).summary()
    return {"bits": {k: summary[k] for k in BITS}}


def current_diff_format() -> str:
    from diffprune.diff_file import FORMAT_VERSION

    return f"diffprune diff v{FORMAT_VERSION}"


def file_format(method: str, run_dir: Path) -> str:
    """What a stored form is, so that its bytes can be told apart from another format's: the diff file's
    format version, or the kind of file the other methods store."""
    if method in DIFF_METHODS:
        return f"diffprune diff v{json.loads((run_dir / 'diff_config.json').read_text())['format_version']}"
    return {"lora": "peft adapter", "shira": "peft adapter", "full": "transformers checkpoint"}[method]


def _first_stage(metrics: dict) -> float | None:
    first = [e for e in metrics.get("epochs") or [] if e["phase"] in ("l0", "train")]
    return first[-1]["score"] if first else None


def compress(src: Path, out: Path, dtype: str) -> int:
    from diffprune.cli import main

    code = main(["compress", str(src), "--value-dtype", dtype, "--output-dir", str(out), "--overwrite"])
    if code:
        raise RuntimeError(f"diffprune compress {src} --value-dtype {dtype} exited {code}")
    return (out / "diff.safetensors").stat().st_size


def adapter_copy(src: Path, out: Path, dtype: str) -> int:
    """The run with its PEFT adapter's floating tensors stored as `dtype` (PEFT loads them into the fp32
    model, so the score is that of the rounded weights)."""
    from safetensors.torch import load_file, save_file

    import torch

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    path = out / "adapter" / "adapter_model.safetensors"
    target = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def evaluate(run_dir: Path, args) -> dict:
    import contextlib
    import io

    from diffprune.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["eval", str(run_dir), "--data-dir", args.data_dir])
    if code:
        raise RuntimeError(f"diffprune eval {run_dir} exited {code}")
    return json.loads(buf.getvalue())


# ---- the grid ---------------------------------------------------------------------------------------
def _best(points: list[Point], work: Path) -> Point | None:
    """The point with the best fp32 validation score (None until all are done; ties: the smaller rates)."""
    scores = {}
    for p in points:
        path = work / p.name / "pareto_records.json"
        if not path.exists():
            return None
        scores[p] = next(r["score"] for r in json.loads(path.read_text()) if r["value_dtype"] == "fp32")
    return max(sorted(points, key=lambda p: (p.lr, p.fixmask_lr or 0)), key=lambda p: scores[p])


def chosen_lr(task: str, method: str, work: Path, seed: int = 0) -> float | None:
    """The searched learning rate with the best fp32 validation score at the method's reference point
    (structured / magnitude: of the first stage, both at the common fixed-mask lr; None until both search
    runs are done; ties: the smaller)."""
    best = _best([Point(task, method, REFERENCE[method], lr, seed) for lr in LRS[method]], work)
    return None if best is None else best.lr


def jobs(task: str, method: str, work: Path, extra_seeds: bool) -> tuple[list[Point], bool]:
    """The points of (task, method) runnable now, and whether more will follow (after the search)."""
    ref = [Point(task, method, REFERENCE[method], lr) for lr in LRS[method]]
    lr = chosen_lr(task, method, work)
    if lr is None:
        return ref, True
    if method in STAGED:  # every budget at both fixed-mask rates, from the chosen first stage
        rest = [Point(task, method, s, lr, fixmask_lr=f) for s in SIZES[method] for f in FIXMASK_LRS
                if (s, f) != (REFERENCE[method], COMMON["fixmask_lr"])]
    elif method in PER_POINT_LR:
        rest = [Point(task, method, s, other) for s in SIZES[method] if s != REFERENCE[method] for other in LRS[method]]
    else:
        rest = []
    if extra_seeds and task in EXTRA_SEEDS["tasks"] and (method, REFERENCE[method]) in EXTRA_SEEDS["points"]:
        ref_point = _best([Point(task, method, REFERENCE[method], lr, fixmask_lr=f) for f in FIXMASK_LRS], work) \
            if method in STAGED else Point(task, method, REFERENCE[method], lr)
        if ref_point is None:  # its fixed-mask rate is not chosen yet
            return ref + rest, True
        rest += [Point(task, method, REFERENCE[method], lr, seed, ref_point.fixmask_lr) for seed in EXTRA_SEEDS["seeds"]]
    return ref + rest, False


def run_grid(args) -> list:
    """Run the grid; after every finished point the scan restarts from the first task, so the points
    of the earlier tasks (their other sizes, once the learning-rate search is done) come first and
    tasks complete one after the other."""
    work = Path(args.work_dir)
    failures: list[str] = []
    while True:
        ran, waiting = False, False
        for task, method in ((t, m) for t in args.tasks for m in args.methods):
            points, more = jobs(task, method, work, args.extra_seeds)
            for p in points:
                if p.name in failures or finished(p, args) is not None:
                    continue
                try:
                    if run_point(p, args) is None:  # another instance has it (or its first stage)
                        waiting = True
                        continue
                except Exception:  # one failed point must not lose the rest of the grid
                    failures.append(p.name)
                    traceback.print_exc()
                ran = True
                break
            if ran:
                break
            waiting |= more and not any(p.name in failures for p in points)
        if ran:
            write_report(collect(work), args)  # the tables and plot follow the grid
            continue
        if not waiting:
            return failures
        time.sleep(20)  # another instance holds what is left: wait for it


def restore_published(args) -> int:
    """Seed the work dir from the published `pareto.json`: a fresh checkout (whose work dir is gone) resumes
    where the published grid stops instead of training its points again. Only records of this run's
    protocol (model, training subset, epochs) are restored, one `pareto_records.json` per run, and of the
    diff methods only those stored in today's diff file format (their bytes are the point); the runs'
    diffs themselves are not published, so a restored point is scored, not re-scorable."""
    published = Path(args.results_dir) / "pareto.json"
    if not published.exists():
        return 0
    epochs = args.epochs if args.epochs is not None else COMMON["epochs"]
    by_run: dict[str, list[dict]] = {}
    stale = set()
    for r in json.loads(published.read_text()).get("records", []):
        if (r["task"] in args.tasks and r["model"] == (args.model or PACKAGED_MODEL)
                and r["train_samples"] == samples_of(r["task"], args) and r["settings"]["epochs"] == epochs):
            if r["method"] in DIFF_METHODS and r.get("file_format") != current_diff_format():
                stale.add(r["run"])  # its bytes are an older diff file's (records before v3 lack the field)
                continue
            by_run.setdefault(r["run"], []).append(r)
    if stale:
        print(f"{len(stale)} published runs of the diff methods stored an older diff file format than "
              f"{current_diff_format()}: trained again, so that their bytes are today's", flush=True)
    restored = 0
    for run, records in by_run.items():
        path = Path(args.work_dir) / run / "pareto_records.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(records, indent=2) + "\n")
            restored += 1
    if restored:
        print(f"restored {restored} finished points from {published}", flush=True)
    return restored


def collect(work: Path) -> list[dict]:
    """Every finished point's records; a diff point recorded before records carried bits per nonzero gets
    them from its stored forms while they are still in the work dir."""
    out = []
    for path in sorted(work.glob("*/pareto_records.json")):
        records = json.loads(path.read_text())
        if any("bits" not in r for r in records if r["method"] in DIFF_METHODS):
            for r in records:
                form = path.parent if r["value_dtype"] == "fp32" else work / f"{r['run']}@{r['value_dtype']}"
                if "bits" not in r:
                    r.update(bits_of(r["method"], form))
            if all("bits" in r for r in records if r["method"] in DIFF_METHODS):
                atomic_write_text(path, json.dumps(records, indent=2) + "\n")
        out += records
    return out


# ---- the report -------------------------------------------------------------------------------------
def _kb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _size_label(method: str, size) -> str:
    if size is None:
        return "—"
    return f"r={size}" if method == "lora" else f"{100 * size:g}%"


def fixmask_lr_of(r: dict) -> float | None:
    """The fixed-mask stage's learning rate of a structured / magnitude record (None for the other methods)."""
    return r["settings"].get("fixmask_lr", COMMON["fixmask_lr"]) if r["method"] in STAGED else None


def chosen_runs(records: list[dict]) -> dict[tuple, str]:
    """(method, size, task) -> the run chosen on the fp32 validation score, seed 0: structured / magnitude
    from the first stage whose lr won at the reference budget (at the common fixed-mask lr), the better of
    its fixed-mask rates; LoRA / SHiRA the better lr at each size; BitFit / full the better lr. Ties: the
    smaller rates."""
    fp32 = [r for r in records if r["seed"] == 0 and r["value_dtype"] == "fp32"]
    first: dict[tuple, dict] = {}  # (method, task) -> the winning first stage's reference record
    for r in fp32:
        if r["method"] in STAGED and r["size"] == REFERENCE[r["method"]] and fixmask_lr_of(r) == COMMON["fixmask_lr"]:
            key = (r["method"], r["task"])
            if key not in first or (r["score"], -r["lr"]) > (first[key]["score"], -first[key]["lr"]):
                first[key] = r
    best: dict[tuple, dict] = {}
    for r in fp32:
        if r["method"] in STAGED and first[(r["method"], r["task"])]["lr"] != r["lr"]:
            continue
        key = (r["method"], r["size"], r["task"])
        rank = (r["score"], -r["lr"], -(fixmask_lr_of(r) or 0))
        if key not in best or rank > best[key][0]:
            best[key] = (rank, r)
    return {k: r["run"] for k, (_, r) in best.items()}


def curve_rows(records: list[dict], tasks: list[str]) -> list[dict]:
    """One row per (method, size, value dtype) at the chosen learning rates (`chosen_runs`), seed 0: score
    and bytes per task and their means over `tasks` (None where a task is missing)."""
    runs = chosen_runs(records)
    by = {(r["run"], r["value_dtype"]): r for r in records if r["seed"] == 0}
    rows = []
    for method in SIZES:
        for size in SIZES[method]:
            for dtype in VALUE_DTYPES[method]:
                cells = {}
                for task in tasks:
                    hit = by.get((runs.get((method, size, task)), dtype))
                    if hit:
                        cells[task] = hit
                if not cells:
                    continue
                done = all(t in cells for t in tasks)
                rows.append({
                    "method": method, "size": size, "value_dtype": dtype, "cells": cells,
                    "score": statistics.mean(c["score"] for c in cells.values()) if done else None,
                    "bytes": statistics.mean(c["stored_bytes"] for c in cells.values()),
                    "task_parameters": statistics.mean(c["task_parameters"] for c in cells.values()),
                })
    return rows


def write_report(records: list[dict], args) -> str:
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    present = [t for t in TASKS if any(r["task"] == t for r in records)]
    # the tasks on which every method of the grid has every point: the average is over those
    complete = [t for t in present if all(
        any(r["task"] == t and r["method"] == m and r["size"] == s for r in records)
        for m in args.methods for s in SIZES[m])]
    rows = curve_rows(records, complete or present)
    lines = [
        "# Accuracy per stored byte: structured diff pruning vs LoRA, SHiRA, magnitude, BitFit, full finetuning",
        "",
        f"GLUE validation scores (per-task mean of its metrics x 100) of all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M "
        f"parameters, tuned for sentence embeddings), seed 0, against the bytes each task's file takes. Training data: "
        f"{_protocol(records)}"
        f" (the same subset for every method); full validation sets. Settings: {COMMON}; the fixed-mask lr of "
        f"structured and magnitude is searched per point over {', '.join(format(f, 'g') for f in FIXMASK_LRS)}, "
        f"LoRA's and SHiRA's lr per point over `LRS` (see the choice per point below).",
        "",
        f"Tasks with every point: {', '.join(complete) or 'none yet'}"
        + (f"; the average below is over those {len(complete)}." if complete else
           f"; tasks with some points: {', '.join(present) or 'none'}.") + " ![pareto](pareto.png)",
        "",
        "| method | size | values | " + " | ".join(complete or present) + " | avg | bytes / task | stored parameters |",
        "|---|---|---|" + "---|" * (len(complete or present) + 3),
    ]
    for row in rows:
        cells = " | ".join(f"{row['cells'][t]['score']:.1f}" if t in row["cells"] else "—" for t in complete or present)
        avg = f"{row['score']:.1f}" if row["score"] is not None else "—"
        lines.append(f"| {TITLES[row['method']]} | {_size_label(row['method'], row['size'])} | {row['value_dtype']} | "
                     f"{cells} | {avg} | {_kb(row['bytes'])} | {row['task_parameters']:,.0f} |")
    lines += _dominance(rows)
    lines += _bits_table(records)
    width = max(len(v) for v in LRS.values())
    lines += ["", f"## Learning-rate search (reference point, fp32 score; the chosen value in bold; structured / magnitude: the "
              f"first stage's lr, at fixed-mask lr {COMMON['fixmask_lr']:g})", "",
              "| task | method | point | " + " | ".join(f"lr {i + 1}" for i in range(width)) + " |",
              "|---|---|---|" + "---|" * width]
    for task in present:
        for method in SIZES:
            ref = [r for r in records if r["task"] == task and r["method"] == method and r["size"] == REFERENCE[method]
                   and r["value_dtype"] == "fp32" and r["seed"] == 0 and fixmask_lr_of(r) in (None, COMMON["fixmask_lr"])]
            if not ref:
                continue
            best = max(ref, key=lambda r: (r["score"], -r["lr"]))["lr"] if len(ref) == len(LRS[method]) else None
            cells = []
            for lr in LRS[method]:
                hit = [r for r in ref if r["lr"] == lr]
                text = f"{lr:g}: {hit[0]['score']:.1f}" if hit else f"{lr:g}: —"
                cells.append(f"**{text}**" if lr == best else text)
            cells += [""] * (width - len(cells))
            lines.append(f"| {task} | {method} | {_size_label(method, REFERENCE[method])} | " + " | ".join(cells) + " |")
    lines += _per_point_search(records, present)
    seeds = [r for r in records if r["seed"] != 0 and r["value_dtype"] == "fp32"]
    if seeds:
        lines += ["", "## Seeds 0-2 (reference points, chosen learning rate, fp32)", "",
                  "| task | method | point | scores | mean ± std |", "|---|---|---|---|---|"]
        for task in EXTRA_SEEDS["tasks"]:
            for method, size in EXTRA_SEEDS["points"]:
                rs = [r for r in records if r["task"] == task and r["method"] == method and r["size"] == size
                      and r["value_dtype"] == "fp32" and _rates(r) == _rates_of(rows, method, size, task)]
                if len(rs) > 1:
                    sc = [r["score"] for r in sorted(rs, key=lambda r: r["seed"])]
                    lines.append(f"| {task} | {method} | {_size_label(method, size)} | "
                                 + ", ".join(f"{s:.1f}" for s in sc)
                                 + f" | {statistics.mean(sc):.1f} ± {statistics.stdev(sc):.1f} |")
    lines += ["", "## Runs", "", "| run | values | score | first stage | after projection | nnz (+ head) | bytes | file | train s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["task"], r["method"], str(r["size"]), r["lr"], r["seed"])):
        fs = f"{r['first_stage']:.1f}" if r.get("first_stage") is not None else "—"
        ap = f"{r['after_projection']:.1f}" if r.get("after_projection") is not None else "—"
        head = r["task_parameters"] - r["nnz"]
        nnz = f"{r['nnz']:,}" + (f" (+{head:,})" if head > 0 else "")
        lines.append(f"| {r['run']} | {r['value_dtype']} | {r['score']:.2f} | {fs} | {ap} | {nnz} | "
                     f"{r['stored_bytes']:,} | {r.get('file_format', 'diffprune diff v2' if r['method'] in DIFF_METHODS else '—')} "
                     f"| {r['train_seconds']:.0f} |")
    if records:
        r0 = records[-1]
        lines += ["", "## Provenance", "", f"- model: `{r0['model']}`", f"- machine: {r0['machine']}",
                  f"- versions: {r0['versions']}",
                  f"- dates: {min(r['date'] for r in records)} to {max(r['date'] for r in records)}",
                  "- commands: " + "; ".join(sorted({f'`{r["command"]}`' for r in records})),
                  "- structured / magnitude: the first stage of each learning rate ran once (`diffprune train "
                  "--stop-after l0`); every budget is a `--from-l0` run from it with its own projection and "
                  "3-epoch fixed-mask stage (fixed-mask lr: the better of "
                  f"{' and '.join(format(f, 'g') for f in FIXMASK_LRS)} per budget). A point's train seconds include its first stage."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "pareto.md", text)
    atomic_write_text(out_dir / "pareto.json", json.dumps(
        {"tasks_complete": complete, "curve": [{k: v for k, v in row.items() if k != "cells"} |
                                               {"tasks": {t: c["score"] for t, c in row["cells"].items()}}
                                               for row in rows],
         "records": records}, indent=1) + "\n")
    plot(rows, records, complete or present, out_dir / "pareto.png")
    return text


def _bits_table(records: list[dict]) -> list[str]:
    """Bits per nonzero of the stored diffs (seed 0, every run of the point that carries them): min-max."""
    have = [r for r in records if "bits" in r and r["seed"] == 0]
    if not have:
        return []
    out = ["", "## Bits per nonzero of the stored diffs (coded positions + values; every run of the grid, min-max)",
           "", "| method | size | values | bits / nonzero | positions | bound log2 C(n, k) / k | runs |",
           "|---|---|---|---|---|---|---|"]

    def span(rs, key):
        v = [r["bits"][key] for r in rs]
        return f"{min(v):.2f}" if max(v) - min(v) < 0.005 else f"{min(v):.2f}-{max(v):.2f}"
    for method in DIFF_METHODS:
        for size in SIZES[method]:
            for dtype in VALUE_DTYPES[method]:
                rs = [r for r in have if r["method"] == method and r["size"] == size and r["value_dtype"] == dtype]
                if rs:
                    out.append(f"| {TITLES[method]} | {_size_label(method, size)} | {dtype} | {span(rs, 'bits_per_nonzero')} "
                               f"| {span(rs, 'position_bits_per_nonzero')} | {span(rs, 'position_bound_bits_per_nonzero')} "
                               f"| {len(rs)} |")
    return out


def _per_point_search(records: list[dict], tasks: list[str]) -> list[str]:
    """Each point's two searched rates and their fp32 scores (seed 0), the chosen one in bold."""
    runs = chosen_runs(records)
    out = ["", "## Learning-rate choice per point (fp32 score; structured / magnitude: the fixed-mask stage's lr "
           "from the chosen first stage; LoRA / SHiRA: the lr; the chosen value in bold)", "",
           "| method | size | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for method in (*STAGED, *PER_POINT_LR):
        for size in SIZES[method]:
            cells = []
            for task in tasks:
                chosen = runs.get((method, size, task))
                if chosen is None:
                    cells.append("—")
                    continue
                first = next(r["lr"] for r in records if r["run"] == chosen)
                tried = sorted((r for r in records if r["task"] == task and r["method"] == method and r["size"] == size
                                and r["seed"] == 0 and r["value_dtype"] == "fp32"
                                and (method in PER_POINT_LR or r["lr"] == first)), key=_rates)
                texts = []
                for r in tried:
                    value = fixmask_lr_of(r) if method in STAGED else r["lr"]
                    text = f"{value:g}: {r['score']:.1f}"
                    texts.append(f"**{text}**" if r["run"] == chosen else text)
                cells.append(", ".join(texts))
            if any(c != "—" for c in cells):
                out.append(f"| {TITLES[method]} | {_size_label(method, size)} | " + " | ".join(cells) + " |")
    return out


def _protocol(records: list[dict]) -> str:
    sizes = {}
    for r in records:
        sizes.setdefault(r["train_samples"], set()).add(r["task"])
    parts = [f"{'the first ' + format(n, ',') + ' examples' if n else 'the full training set'} of "
             f"{', '.join(sorted(t))}" for n, t in sorted(sizes.items(), key=lambda kv: kv[0] or 1e12)]
    return "; ".join(parts) or "none yet"


def _rates(r: dict) -> tuple:
    return r["lr"], fixmask_lr_of(r)


def _rates_of(rows, method, size, task):
    for row in rows:
        if row["method"] == method and row["size"] == size and task in row["cells"]:
            return _rates(row["cells"][task])
    return None


def _dominance(rows: list[dict]) -> list[str]:
    """Where structured stands against LoRA and SHiRA at each of their points (average, same value width)."""
    avg = [r for r in rows if r["score"] is not None]
    if not avg:
        return []
    out = ["", "## Structured against LoRA and SHiRA at their sizes (average score)", "",
           "For each LoRA / SHiRA point: the best structured point (same value dtype) that stores no more bytes.", "",
           "| point | values | its bytes | its score | best structured at <= bytes | its score | difference |",
           "|---|---|---|---|---|---|---|"]
    for r in avg:
        if r["method"] not in ("lora", "shira"):
            continue
        cand = [s for s in avg if s["method"] == "structured" and s["value_dtype"] == r["value_dtype"]
                and s["bytes"] <= r["bytes"]]
        if cand:
            best = max(cand, key=lambda s: s["score"])
            out.append(f"| {TITLES[r['method']]} {_size_label(r['method'], r['size'])} | {r['value_dtype']} | "
                       f"{_kb(r['bytes'])} | {r['score']:.1f} | {_size_label('structured', best['size'])} "
                       f"({_kb(best['bytes'])}) | {best['score']:.1f} | {best['score'] - r['score']:+.1f} |")
        else:
            out.append(f"| {TITLES[r['method']]} {_size_label(r['method'], r['size'])} | {r['value_dtype']} | "
                       f"{_kb(r['bytes'])} | {r['score']:.1f} | none this small | — | — |")
    return out


STYLE = {"structured": ("tab:red", "o"), "magnitude": ("tab:orange", "s"), "lora": ("tab:blue", "^"),
         "shira": ("tab:green", "v"), "bitfit": ("tab:purple", "D"), "full": ("black", "*")}
DASH = {"fp32": "-", "bf16": "--", "int8": ":"}


def plot(rows: list[dict], records: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, 4, width_ratios=[2.2, 1, 1, 1])
    main = fig.add_subplot(grid[:, 0])
    panels = [fig.add_subplot(grid[i // 3, 1 + i % 3]) for i in range(min(len(tasks), 6))]

    def draw(ax, value_of, small=False):
        for method in SIZES:
            for dtype in VALUE_DTYPES[method]:
                pts = sorted((r["bytes"] if not small else r["cells"][small]["stored_bytes"], value_of(r))
                             for r in rows if r["method"] == method and r["value_dtype"] == dtype
                             and value_of(r) is not None)
                if not pts:
                    continue
                color, marker = STYLE[method]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], DASH[dtype], color=color, marker=marker,
                        markersize=4 if small else 6, linewidth=1 if small else 1.6,
                        label=f"{TITLES[method]} ({dtype})", alpha=1.0 if dtype == "fp32" else 0.65)
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.25)

    draw(main, lambda r: r["score"])
    main.set_xlabel("stored bytes per task (log)")
    main.set_ylabel(f"GLUE validation score, average of {len(tasks)} task(s)")
    main.set_title(f"average over {', '.join(tasks)}", fontsize=10)
    main.legend(fontsize=7, loc="lower right")
    for ax, task in zip(panels, tasks):
        draw(ax, lambda r, t=task: r["cells"][t]["score"] if t in r["cells"] else None, small=task)
        ax.set_title(task, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("Accuracy per stored byte, all-MiniLM-L6-v2 (seed 0)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "glue"))
    p.add_argument("--train-samples", type=int, default=500,
                   help="the first N training examples of every task, for every method (0 = full training sets)")
    p.add_argument("--sst2-train-samples", type=int, default=None,
                   help="SST-2's subset instead of --train-samples (0 = all 67k; the GPU script uses 8000)")
    p.add_argument("--model", default=None, help="HF model id or folder (default: the packaged MiniLM-L6)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each stage (default 3 + 3 fixed-mask)")
    p.add_argument("--no-extra-seeds", dest="extra_seeds", action="store_false",
                   help="skip seeds 1-2 of structured 0.5%% and LoRA r=8 on RTE and MRPC")
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "pareto"))
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.train_samples = args.train_samples or None
    args.tasks = sorted(args.tasks, key=TASKS.index)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    restore_published(args)
    failures = [] if args.report_only else run_grid(args)
    print(write_report(collect(Path(args.work_dir)), args))
    if failures:
        print(f"failed points: {failures}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
