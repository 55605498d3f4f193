#!/usr/bin/env python
"""GLUE accuracy: diff pruning vs full finetuning, non-adaptive (magnitude) pruning and LoRA.

Every (task, method, seed) is one run of `diffprune.training.train` on the same model, data
and seed; finished runs are skipped, so the grid can be filled over several sessions:

    python benchmarks/glue_accuracy.py                       # the whole grid
    python benchmarks/glue_accuracy.py --tasks rte mrpc --methods full structured --seeds 0 1 2
    python benchmarks/glue_accuracy.py --report-only         # rebuild the tables from finished runs

Writes benchmarks/results/glue_accuracy.{json,md}. Scores are on the GLUE validation sets
(labelled test sets are not public); the per-task score is the mean of the task's metrics x100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not
import _env  # noqa: E402

from diffprune import SparseDiff  # noqa: E402
from diffprune._io import atomic_write_text  # noqa: E402
from diffprune.analysis import analyze  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("rte", "mrpc", "stsb", "cola", "sst2")
METHODS = ("full", "diff", "structured", "magnitude", "lora")
METHOD_TITLES = {
    "full": "full finetuning",
    "diff": "diff pruning 0.5%",
    "structured": "structured diff pruning 0.5%",
    "magnitude": "non-adaptive (magnitude) 0.5%",
    "lora": "LoRA r=8 (q,v) + head",
}

# Runs start longest first (largest training set, then the two-stage methods), so that when several
# instances share a grid (see glue_accuracy_gpu.sh) the long runs are not left for the end.
RUN_ORDER_TASKS = ("sst2", "cola", "stsb", "mrpc", "rte")
RUN_ORDER_METHODS = ("diff", "structured", "magnitude", "full", "lora")

# Settings chosen for all-MiniLM-L6-v2 on CPU (see the results file for the search behind them).
# Every method gets the same batch size, sequence length, seed and data; epochs: 3 for the dense
# stage of every method, plus the fixed-mask stage for the three 0.5% methods, as in the paper.
DEFAULTS = {
    "common": {"batch_size": 16, "max_seq_length": 128, "epochs": 3},
    "full": {"lr": 5e-5},
    "lora": {"lr": 1e-3},
    "diff": {"lr": 5e-4, "alpha_lr": 0.1, "l0_lambda": 1.25e-7, "fixmask_epochs": 3, "fixmask_lr": 5e-4},
    "structured": {"lr": 1e-4, "alpha_lr": 0.1, "l0_lambda": 1.25e-7, "fixmask_epochs": 3, "fixmask_lr": 5e-4,
                   "group_penalty": "per_gate"},
    "magnitude": {"lr": 5e-5, "fixmask_epochs": 3, "fixmask_lr": 5e-4},
}


def parse_overrides(items: list[str]) -> dict:
    """--set diff.lr=1e-4 structured.l0_lambda=1e-6 common.batch_size=16"""
    out: dict = {}
    for item in items:
        try:
            key, value = item.split("=", 1)
            method, name = key.split(".", 1)
        except ValueError:
            raise SystemExit(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. diff.lr=1e-4") from None
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        out.setdefault(method, {})[name] = value
    return out


def settings_for(method: str, overrides: dict) -> dict:
    s = dict(DEFAULTS["common"])
    s.update(overrides.get("common", {}))
    s.update(DEFAULTS[method])
    s.update(overrides.get(method, {}))
    return s


def run_one(task, method, seed, args, overrides) -> dict | None:
    from diffprune.training import TrainConfig, train

    run_dir = Path(args.work_dir) / f"{task}-{method}-s{seed}"
    settings = settings_for(method, overrides)
    max_train = train_samples_for(task, args)
    record_path = run_dir / "benchmark_record.json"
    if record_path.exists():
        done = json.loads(record_path.read_text())
        if (done["settings"], done.get("train_samples"), done.get("target_sparsity")) != (
                settings, max_train, args.target_sparsity):
            raise SystemExit(
                f"{run_dir} finished with other settings ({done['settings']}, train samples "
                f"{done.get('train_samples')}); use another --work-dir for a different grid")
        return None
    lock = _claim(run_dir)
    if lock is None:  # another instance of this script is training it
        return None
    if record_path.exists():  # finished by another instance since the check above
        lock.unlink(missing_ok=True)
        return None
    cfg = TrainConfig(
        output_dir=str(run_dir), task=task, data_dir=args.data_dir, model=args.model, method=method,
        target_sparsity=args.target_sparsity, seed=seed, max_train_samples=max_train,
        overwrite=not (run_dir / "checkpoint").exists(), resume=(run_dir / "checkpoint").exists(),
        progress=not args.no_progress, **settings,
    )
    print(f"== {task} / {method} / seed {seed}: {settings} (train samples: {max_train or 'all'})", flush=True)
    t0 = time.time()
    try:
        metrics = train(cfg)
        print(f"   score {metrics['score']:.2f}  nnz {metrics['nnz']}  bytes {metrics['stored_bytes']}  "
              f"{time.time() - t0:.0f}s", flush=True)
        record = {
            "task": task, "method": method, "seed": seed, "score": metrics["score"], "metrics": metrics["final"],
            "stages": stages(metrics),
            "stored_bytes": metrics["stored_bytes"], "nnz": metrics["nnz"],
            "trainable_parameters": metrics.get("trainable_parameters"), "train_seconds": metrics["train_seconds"],
            "train_samples": max_train, "settings": settings, "target_sparsity": args.target_sparsity,
            "model": metrics.get("base_model"), "command": _env.command(), "versions": _env.versions(),
            "machine": _env.machine(), "date": _env.now(),
        }
        record_path.write_text(json.dumps(record, indent=2))
    finally:  # after the record, so no other instance sees a finished run as unclaimed
        lock.unlink(missing_ok=True)
    return record


def train_samples_for(task: str, args) -> int | None:
    return args.sst2_train_samples if task == "sst2" and args.max_train_samples is None else args.max_train_samples


def import_records(paths: list[Path], args, overrides, tag: bool = True) -> int:
    """Bring finished records of this script (other work dirs, published results) into this grid's work dir as
    finished cells. Only records made with exactly this grid's settings (the method's DEFAULTS and --set),
    training subset and target sparsity are taken, so the grid stays one protocol; the rest are counted and
    left out. A fresh checkout restores its published results this way instead of training them again (the
    runs' folders are not published, so an imported cell is a record, not a re-scorable run)."""
    taken, other = 0, 0
    for path in paths:
        if not Path(path).exists():
            continue
        for r in json.loads(Path(path).read_text()):
            if r["task"] not in args.tasks or r["method"] not in args.methods or r["seed"] not in args.seeds:
                continue
            mine = (settings_for(r["method"], overrides), train_samples_for(r["task"], args), args.target_sparsity)
            if (r["settings"], r.get("train_samples"), r.get("target_sparsity")) != mine:
                other += 1
                continue
            dest = Path(args.work_dir) / f"{r['task']}-{r['method']}-s{r['seed']}" / "benchmark_record.json"
            if dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if tag and "imported_from" not in r:  # where a cell brought in from another grid was run
                r = {**r, "imported_from": os.path.relpath(Path(path).resolve(), REPO)}
            atomic_write_text(dest, json.dumps(r, indent=2) + "\n")
            taken += 1
    if taken or other:
        print(f"imported {taken} finished cells; left out {other} records made with other settings", flush=True)
    return taken


def _claim(run_dir: Path) -> Path | None:
    """A lock file per run, so several instances of this script share one grid (each takes the next
    unclaimed run). A lock whose process is gone (killed session) is taken over."""
    lock = run_dir.parent / f"{run_dir.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return None
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)
                continue
            except PermissionError:
                return None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def collect(work_dir: Path) -> list[dict]:
    records = []
    for path in sorted(work_dir.glob("*/benchmark_record.json")):
        record = json.loads(path.read_text())
        if "stages" not in record:
            record["stages"] = stages(json.loads((path.parent / "metrics.json").read_text()))
        if "kept" not in record and (path.parent / "diff.safetensors").exists():
            record["kept"] = kept_shares(path.parent)
        records.append(record)
    return records


def kept_shares(run_dir: Path) -> dict:
    """Where a 0.5% diff puts its entries: share per parameter kind and per layer, and the tensor
    holding the most (the structured diffs here can sit almost entirely in one matrix)."""
    report = analyze(SparseDiff.load(run_dir))
    nnz = max(report["nnz"], 1)
    top = max(report["tensors"], key=lambda t: t["nnz"])
    return {
        "by_kind": {row["name"]: round(row["nnz"] / nnz, 4) for row in report["kinds"]},
        "by_layer": {row["name"]: round(row["nnz"] / nnz, 4) for row in report["layers"]},
        "largest_tensor": {"name": top["name"], "share": round(top["nnz"] / nnz, 4)},
    }


def stages(metrics: dict) -> dict:
    """Validation score at the end of the dense / L0 stage, right after projection, and at the end."""
    epochs = metrics.get("epochs") or []
    first = [e for e in epochs if e["phase"] in ("l0", "train")]
    out = {"final": metrics["score"]}
    if first:
        out["first_stage"] = first[-1]["score"]
        if first[-1].get("density") is not None:
            out["first_stage_density"] = first[-1]["density"]
    if metrics.get("after_projection"):
        out["after_projection"] = metrics["after_projection"]["score"]
    return out


def _fmt(scores: list[float]) -> str:
    if not scores:
        return "—"
    if len(scores) == 1:
        return f"{scores[0]:.1f}"
    return f"{statistics.mean(scores):.1f} ± {statistics.stdev(scores):.1f}"


def _largest(record: dict) -> str:
    kept = record.get("kept")
    if not kept:
        return "—"
    kind, share = max(kept["by_kind"].items(), key=lambda kv: kv[1])
    top = kept["largest_tensor"]
    return f"{kind} {share:.0%}; `{top['name']}` {top['share']:.0%}"


def _kb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _matched_seed_table(by: dict, tasks: list[str]) -> list[str]:
    """Where some cells have more seeds than others, the means above compare different samples;
    this table compares every method on the seeds that every cell of the grid has."""
    seed_sets = [{r["seed"] for r in rs} for rs in by.values()]
    if len({frozenset(s) for s in seed_sets}) <= 1:
        return []
    common = sorted(set.intersection(*seed_sets))
    if not common:
        return []
    scores = {k: statistics.mean(r["score"] for r in rs if r["seed"] in common) for k, rs in by.items()}
    full_avg = (statistics.mean(scores[("full", t)] for t in tasks)
                if all(("full", t) in scores for t in tasks) else None)
    seeds = ", ".join(map(str, common))
    lines = ["", f"### Matched seeds: only seed(s) {seeds}, which every cell has", "",
             "| method | " + " | ".join(tasks) + " | avg | avg − full |", "|---|" + "---|" * (len(tasks) + 2)]
    for method in METHODS:
        if not all((method, t) in scores for t in tasks):
            continue
        avg = statistics.mean(scores[(method, t)] for t in tasks)
        delta = f"{avg - full_avg:+.1f}" if full_avg is not None else "—"
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(f"{scores[(method, t)]:.1f}" for t in tasks)
                     + f" | {avg:.1f} | {delta} |")
    return lines


def write_report(records: list[dict], out_dir: Path, tasks, notes: str = "") -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "glue_accuracy.json", json.dumps(records, indent=2) + "\n")
    by = {}
    for r in records:
        by.setdefault((r["method"], r["task"]), []).append(r)
    tasks = [t for t in tasks if any(k[1] == t for k in by)]
    full_bytes = [r["stored_bytes"] for r in records if r["method"] == "full"]
    one_model = statistics.mean(full_bytes) if full_bytes else None
    lines = [
        "# GLUE accuracy: diff pruning vs full finetuning, magnitude pruning and LoRA",
        "",
        "Validation-set scores (GLUE dev; per-task score = mean of the task's metrics x 100: MRPC acc/F1, "
        "STS-B Pearson/Spearman, CoLA Matthews x 100, others accuracy). Mean ± sample std over seeds where "
        "there are several.",
        "",
        "| method | " + " | ".join(tasks) + f" | avg | stored bytes / task | {len(tasks)} tasks: storage vs "
        f"{len(tasks)} full copies |",
        "|---|" + "---|" * (len(tasks) + 3),
    ]
    for method in METHODS:
        if not any(k[0] == method for k in by):
            continue
        cells, means, sizes = [], [], []
        for t in tasks:
            rs = by.get((method, t), [])
            scores = [r["score"] for r in rs]
            cells.append(_fmt(scores) + (f" (n={len(scores)})" if len(scores) > 1 else ""))
            if scores:
                means.append(statistics.mean(scores))
            sizes += [r["stored_bytes"] for r in rs]
        avg = f"{statistics.mean(means):.1f}" if len(means) == len(tasks) else "—"
        size = statistics.mean(sizes) if sizes else 0
        if method == "full":
            mult = "1 (a copy per task)"
        elif one_model:  # one shared base plus a file per task
            mult = f"{(one_model + size * len(tasks)) / (one_model * len(tasks)):.4f}"
        else:
            mult = "—"
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(cells) + f" | {avg} | {_kb(size)} | {mult} |")
    lines += _matched_seed_table(by, tasks)
    lines += ["", "## Runs", "", "| task | method | seed | score | metrics | nnz | trainable | bytes | train s | train samples |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["task"], METHODS.index(r["method"]), r["seed"])):
        m = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items() if isinstance(v, (int, float)))
        lines.append(f"| {r['task']} | {r['method']} | {r['seed']} | {r['score']:.2f} | {m} | {r['nnz']} | "
                     f"{r.get('trainable_parameters')} | {r['stored_bytes']} | {r['train_seconds']:.0f} | "
                     f"{r.get('train_samples') or 'all'} |")
    staged = [r for r in records if "after_projection" in r.get("stages", {})]
    if staged:
        lines += ["", "## Stages of the 0.5% methods", "",
                  "Validation score at the end of the first stage (diff/structured: L0 stage, density = expected "
                  "fraction of nonzero gates; magnitude: full finetuning), right after projection to 0.5%, and after "
                  "the fixed-mask stage.", "",
                  "| task | method | seed | first stage | density then | after projection | final | "
                  "largest share of the kept entries |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(staged, key=lambda r: (r["task"], METHODS.index(r["method"]), r["seed"])):
            st = r["stages"]
            dens = f"{100 * st['first_stage_density']:.1f}%" if "first_stage_density" in st else "—"
            lines.append(f"| {r['task']} | {r['method']} | {r['seed']} | {st.get('first_stage', float('nan')):.2f} | "
                         f"{dens} | {st['after_projection']:.2f} | {st['final']:.2f} | {_largest(r)} |")
    settings = {}
    for r in records:
        settings.setdefault(r["method"], r["settings"])
    lines += ["", "## Settings", ""]
    for method, s in settings.items():
        lines.append(f"- `{method}`: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    if records:
        r0 = records[-1]
        lines += ["", "## Provenance", "",
                  f"- model: `{r0.get('model')}` (all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters, "
                  "tuned for sentence embeddings, not a plain MLM checkpoint)",
                  f"- machine: {r0['machine']}", f"- versions: {r0['versions']}",
                  f"- dates: {min(r['date'] for r in records)} to {max(r['date'] for r in records)}",
                  "- commands: " + "; ".join(sorted({f'`{r["command"]}`' for r in records}))]
        imported = sorted({r["imported_from"] for r in records if r.get("imported_from")})
        for source in imported:
            cells = sorted(f"{r['task']}/{r['method']}/s{r['seed']}" for r in records if r.get("imported_from") == source)
            lines.append(f"- from `{source}` (same settings, brought in with `--import-records`): {', '.join(cells)}")
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "glue_accuracy.md", text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--model", default=None, help="HF model id or folder (default: the packaged MiniLM-L6)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "glue"))
    p.add_argument("--max-train-samples", type=int, default=None, help="cap every task's training set")
    p.add_argument("--sst2-train-samples", type=int, default=8000,
                   help="fixed SST-2 training subset on CPU when --max-train-samples is not given (0 = all)")
    p.add_argument("--target-sparsity", type=float, default=0.005)
    p.add_argument("--set", nargs="*", default=[], metavar="METHOD.KEY=VALUE", help="override a setting")
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "glue_accuracy"))
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--import-records", nargs="*", default=[], metavar="JSON", type=Path,
                   help="glue_accuracy.json files of other runs of this script: their records made with this grid's "
                        "settings join it as finished cells (the published results in --results-dir always do)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--notes-file", default=None, help="markdown appended to the results file")
    args = p.parse_args(argv)
    args.sst2_train_samples = args.sst2_train_samples or None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    overrides = parse_overrides(args.set)
    work = Path(args.work_dir)
    import_records([Path(args.results_dir) / "glue_accuracy.json"], args, overrides, tag=False)  # the published grid
    import_records(args.import_records, args, overrides)
    failures: list = []
    if not args.report_only:
        for seed in args.seeds:
            for task in sorted(args.tasks, key=RUN_ORDER_TASKS.index):
                for method in sorted(args.methods, key=RUN_ORDER_METHODS.index):
                    try:
                        run_one(task, method, seed, args, overrides)
                    except Exception:  # one failed cell must not lose the rest of the grid
                        failures.append((task, method, seed))
                        traceback.print_exc()
                    write_report(collect(work), Path(args.results_dir), TASKS, _notes(args))
    print(write_report(collect(work), Path(args.results_dir), TASKS, _notes(args)))
    if failures:
        print(f"failed runs: {failures}", file=sys.stderr)
    return 1 if failures else 0


def _notes(args) -> str:
    return Path(args.notes_file).read_text() if args.notes_file else ""


if __name__ == "__main__":
    sys.exit(main())
