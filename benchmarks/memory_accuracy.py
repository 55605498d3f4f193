#!/usr/bin/env python
"""What the memory options cost in accuracy (issue 16): structured diff pruning at 0.5% on the 5 GLUE
tasks with each memory configuration, against dense L0 on the same grid.

Every cell is a `benchmarks/glue_accuracy.py` run with that script's protocol and today's structured
defaults (batch 16, 3 L0 + 3 fixed-mask epochs, sequence 128, SST-2's first 8,000 examples, seed 0),
plus one configuration's settings:

    python benchmarks/memory_accuracy.py run --configs c0.05 lean          # train (finished cells are skipped)
    python benchmarks/memory_accuracy.py run --configs c0.05 --tasks rte mrpc --seeds 1 2
    python benchmarks/memory_accuracy.py report                            # rebuild the tables

Several instances may run at once (each takes the next unclaimed cell: glue_accuracy's lock files);
give each OMP_NUM_THREADS=1 on a 2-core CPU. Writes benchmarks/results/memory_accuracy.{md,json};
a fresh checkout restores the published records first, so finished cells are not trained again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import _env  # noqa: E402
import glue_accuracy  # noqa: E402

import torch  # noqa: E402

from diffprune._io import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = glue_accuracy.TASKS
# name -> (what it is, the structured settings it adds). "dense" is today's default; the published
# dense grid (glue_structured_study/per_gate_lr_1e-4, made before the per-layer diffs) is shown beside it.
CONFIGS = {
    "dense": ("dense L0 (the default)", {}),
    "lean": ("dense L0, `--memory lean` (in-backward AdamW, bf16 alpha, recomputed weights)", {"memory": "lean"}),
    "lean_m16": ("dense L0, `--memory lean --moments-dtype bf16`", {"memory": "lean", "moments_dtype": "bf16"}),
    "lean_w16": ("dense L0, `--memory lean --w-dtype bf16`", {"memory": "lean", "w_dtype": "bf16"}),
    "lean_factored": ("dense L0, `--memory lean --moments-dtype factored`", {"memory": "lean", "moments_dtype": "factored"}),
    "in_backward": ("dense L0, `--optimizer-in-backward` only", {"optimizer_in_backward": True}),
    "alpha_bf16": ("dense L0, `--alpha-dtype bf16` only", {"alpha_dtype": "bf16"}),
    "lean_theta16": ("dense L0, `--memory lean --theta-dtype bf16` (GPUs only: bf16 frozen weights under autocast)",
                     {"memory": "lean", "theta_dtype": "bf16"}),
    # candidates at the dense L0's w learning rate, 1e-4 (the library's default with --candidates until 2026-12-07)
    "c0.02": ("candidate L0, `--candidates 0.02 --lr 1e-4`", {"candidates": 0.02, "lr": 1e-4}),
    "c0.05": ("candidate L0, `--candidates 0.05 --lr 1e-4`", {"candidates": 0.05, "lr": 1e-4}),
    "c0.10": ("candidate L0, `--candidates 0.1 --lr 1e-4`", {"candidates": 0.1, "lr": 1e-4}),
    "c0.05_per_tensor": ("candidate L0, `--candidates 0.05 --lr 1e-4 --candidate-importance grad_per_tensor`",
                         {"candidates": 0.05, "lr": 1e-4, "candidate_importance": "grad_per_tensor"}),
    # at 5e-4, the default with --candidates since 2026-12-07 (Method.candidates_lr)
    "c0.05_lr5e-4": ("candidate L0, `--candidates 0.05` (w lr 5e-4)", {"candidates": 0.05, "lr": 5e-4}),
    "c0.02_lr5e-4": ("candidate L0, `--candidates 0.02` (w lr 5e-4)", {"candidates": 0.02, "lr": 5e-4}),
    "c0.10_lr5e-4": ("candidate L0, `--candidates 0.1` (w lr 5e-4)", {"candidates": 0.1, "lr": 5e-4}),
    # the configuration train_cost.py measures the cost of: candidates with every lean option
    "c0.05_lean": ("candidate L0, `--candidates 0.05 --memory lean` (w lr 5e-4; the configuration of the cost "
                   "tables)", {"candidates": 0.05, "lr": 5e-4, "memory": "lean"}),
}
# Records of code since changed: kept in the report (restored like the others), no longer run.
SUPERSEDED = {
    "lean_nearest": ("dense L0, `--memory lean` with bf16 alpha rounded to nearest (the code before "
                     "`diffprune/optim.py`'s stochastic rounding, 2026-12-06)", {"memory": "lean"}),
    "c0.05_nearest_importance": ("candidate L0, `--candidates 0.05` with the importance summed in bf16 rounded to "
                                 "nearest (the code before the stochastic importance sum, 2026-12-06)",
                                 {"candidates": 0.05}),
    "c0.05_per_input": ("candidate L0, `--candidates 0.05 --candidate-importance grad_per_input` (each weight's summed "
                        "absolute gradients over their input feature's mean; in the library at commit 9410e2a only)",
                        {"candidates": 0.05, "candidate_importance": "grad_per_input"}),
    "c0.05_per_input_rms": ("candidate L0, `--candidates 0.05 --candidate-importance grad_per_input_rms` (the same "
                            "over the input feature's RMS; at commit 9410e2a only)",
                            {"candidates": 0.05, "candidate_importance": "grad_per_input_rms"}),
}


def _needs_accelerator(settings: dict) -> bool:
    """Whether training refuses these settings on a CPU (the library's rule: `TrainConfig.memory_options`)."""
    from diffprune.errors import ConfigError
    from diffprune.training import TrainConfig

    try:
        TrainConfig(output_dir="unused", **settings).memory_options(accelerator=False)
    except ConfigError:
        return True
    return False


GPU_ONLY = tuple(c for c, (_, settings) in CONFIGS.items() if _needs_accelerator(settings))
"""Configurations training refuses on a CPU (bf16 frozen weights): `run` leaves them out by default there."""
GPU_MARK = " ᴳ"  # a seed-0 cell trained on a GPU
PUBLISHED_DENSE = REPO / "benchmarks" / "results" / "glue_structured_study" / "per_gate_lr_1e-4" / "glue_accuracy.json"


def _grid_args(cfg: str, args, report: bool = False) -> list[str]:
    sets = [f"structured.{k}={json.dumps(v)}" for k, v in CONFIGS[cfg][1].items()]
    out = ["--methods", "structured", "--tasks", *args.tasks, "--seeds", *map(str, args.seeds),
           "--data-dir", args.data_dir, "--work-dir", str(Path(args.work_dir) / cfg),
           "--results-dir", str(Path(args.work_dir) / cfg / "_report"), "--no-progress"]
    if args.model:
        out += ["--model", args.model]
    if args.max_train_samples:
        out += ["--max-train-samples", str(args.max_train_samples)]
    if report:
        out.append("--report-only")
    return out + (["--set", *sets] if sets else [])


def restore_published(args) -> int:
    """A fresh checkout's work dir is empty: seed it with the published records (the grid's runs are not
    published, only their records), so `run` trains only what is missing."""
    path = Path(args.results_dir) / "memory_accuracy.json"
    if not path.exists():
        return 0
    n = 0
    for r in json.loads(path.read_text()).get("records", []):
        if r["config"] not in CONFIGS and r["config"] not in SUPERSEDED:
            continue
        dest = Path(args.work_dir) / r["config"] / f"{r['task']}-structured-s{r['seed']}" / "benchmark_record.json"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            record = {k: v for k, v in r.items() if k != "config"}
            atomic_write_text(dest, json.dumps(record, indent=2) + "\n")
            n += 1
    if n:
        print(f"restored {n} finished cells from {path}", flush=True)
    return n


def collect(args) -> list[dict]:
    out = []
    for cfg in [*CONFIGS, *SUPERSEDED]:
        work = Path(args.work_dir) / cfg
        if not work.is_dir():
            continue
        for r in glue_accuracy.collect(work):
            r = {"config": cfg, **r}
            log = work / f"{r['task']}-structured-s{r['seed']}" / "train_log.jsonl"
            if log.exists() and "in_backward" not in r:
                events = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
                ib = [e for e in events if e.get("event") == "optimizer_in_backward"]
                if ib:
                    r["in_backward"] = {e["phase"]: {"steps": e["steps"], "over": e["steps_over_max_grad_norm"]}
                                        for e in ib}
            out.append(r)
    return out


def _published_dense() -> list[dict]:
    if not PUBLISHED_DENSE.exists():
        return []
    return [{"config": "dense_published", **r} for r in json.loads(PUBLISHED_DENSE.read_text())]


def _avg(by_task: dict, seed=0):
    scores = [by_task[t][seed] for t in TASKS if seed in by_task.get(t, {})]
    return statistics.mean(scores) if len(scores) == len(TASKS) else None


def write_report(records: list[dict], out_dir: Path, command: str) -> str:
    rows = [("dense_published", "dense L0, published grid (2026-11-23 code, before the per-layer diffs)")]
    rows += [(c, title) for c, (title, _) in CONFIGS.items()]
    rows[3:3] = [(c, title) for c, (title, _) in SUPERSEDED.items()]  # after "lean", the row it was
    all_records = _published_dense() + records
    table: dict = {}
    for r in all_records:
        table.setdefault(r["config"], {}).setdefault(r["task"], {})[r["seed"]] = r["score"]
    ref_pub = _avg(table.get("dense_published", {}))
    ref_now = _avg(table.get("dense", {}))

    def delta(avg, ref):
        return f"{avg - ref:+.2f}" if avg is not None and ref is not None else "—"

    lines = [
        "# What the memory options cost in accuracy: structured diff pruning 0.5%, 5 GLUE tasks",
        "",
        "all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters, tuned for sentence embeddings); GLUE validation sets; "
        "`benchmarks/glue_accuracy.py`'s protocol: full training sets except SST-2's first 8,000 examples, batch 16, "
        "3 L0 + 3 fixed-mask epochs, sequence 128, structured defaults (per_gate, w lr 1e-4 unless a row names "
        "another, fixed-mask lr 5e-4, "
        "λ 1.25e-7). Per-task score = mean of the task's metrics x 100. Seed 0 unless a column says otherwise.",
        "",
        "| configuration | " + " | ".join(TASKS) + " | avg | vs dense (published) | vs dense (today's code) | "
        "train time, 5 tasks |",
        "|---|" + "---|" * (len(TASKS) + 4),
    ]
    on_gpu = {(r["config"], r["task"]) for r in all_records if r["seed"] == 0 and r.get("machine", {}).get("gpu")}
    seconds: dict = {}
    for r in all_records:
        if r["seed"] == 0:
            seconds.setdefault(r["config"], {})[r["task"]] = r["train_seconds"]
    for cfg, title in rows:
        by_task = table.get(cfg, {})
        if not by_task:
            continue
        cells = [f"{by_task[t][0]:.1f}{GPU_MARK if (cfg, t) in on_gpu else ''}" if 0 in by_task.get(t, {}) else "—"
                 for t in TASKS]
        avg = _avg(by_task)
        secs = seconds.get(cfg, {})
        time_cell = f"{sum(secs.values()) / 3600:.2f} h" if len(secs) == len(TASKS) else "—"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {'—' if avg is None else f'{avg:.2f}'} | "
                     f"{delta(avg, ref_pub) if cfg != 'dense_published' else '—'} | "
                     f"{delta(avg, ref_now) if cfg != 'dense' else '—'} | {time_cell} |")
    seeded = [(cfg, t) for cfg, by in table.items() for t in ("rte", "mrpc") if len(by.get(t, {})) > 1]
    if seeded:
        lines += ["", "## Seeds 0-2 on RTE and MRPC", "", "| configuration | task | scores (seed: score) | mean ± std |",
                  "|---|---|---|---|"]
        titles = dict(rows)
        for cfg, t in sorted(seeded, key=lambda x: ([c for c, _ in rows].index(x[0]), x[1])):
            s = table[cfg][t]
            lines.append(f"| {titles[cfg]} | {t} | " + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(s.items()))
                         + f" | {statistics.mean(s.values()):.1f} ± {statistics.stdev(s.values()):.1f} |")
    lines += ["", "## Stages (seed 0)", "",
              "Score at the end of the L0 stage with its expected density, right after projection to 0.5%, and final; "
              "for in-backward runs, the steps whose own gradient norm exceeded 1.0 (where clipping by the previous "
              "step's norm differs from exact clipping).", "",
              "| configuration | task | L0 stage | density then | after projection | final | steps over the clip norm |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in all_records if r["seed"] == 0),
                    key=lambda r: ([c for c, _ in rows].index(r["config"]), TASKS.index(r["task"]))):
        st = r.get("stages", {})
        dens = f"{100 * st['first_stage_density']:.1f}%" if "first_stage_density" in st else "—"
        ib = r.get("in_backward")
        over = "; ".join(f"{ph} {v['over']}/{v['steps']}" for ph, v in ib.items()) if ib else "—"
        lines.append(f"| {r['config']} | {r['task']} | {st.get('first_stage', float('nan')):.2f} | {dens} | "
                     f"{st.get('after_projection', float('nan')):.2f} | {st['final']:.2f} | {over} |")
    dates = sorted(r["date"] for r in records)
    machines: dict[str, int] = {}  # every machine that ran a cell, with its count of cells
    for r in records:
        key = json.dumps(r["machine"], sort_keys=True)
        machines[key] = machines.get(key, 0) + 1
    lines += ["", "## Provenance", "",
              f"- command: `{command}` (each cell: `python benchmarks/glue_accuracy.py --methods structured "
              "--set structured.KEY=VALUE ...`, recorded per run in the JSON)",
              *(f"- machine ({n} cells): {json.loads(m)}" for m, n in machines.items()),
              "- one thread per run, two runs at a time on the CPU"
              + (f"; cells marked {GPU_MARK.strip()} ran on the GPU named above (`benchmarks/memory_accuracy_gpu.sh`)"
                 if any("gpu" in json.loads(m) for m in machines) else ""),
              f"- versions: {records[-1]['versions'] if records else {}}",
              f"- dates: {dates[0]} to {dates[-1]}" if dates else "- dates: —",
              f"- dense (published): {PUBLISHED_DENSE.relative_to(REPO)}"]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"configs": {c: {"title": t, "settings": s} for c, (t, s) in {**CONFIGS, **SUPERSEDED}.items()},
               "averages": {c: _avg(table.get(c, {})) for c, _ in rows}, "records": records}
    if plot_candidates(table, out_dir / PLOT):
        text += (f"\n![score against the candidate fraction c]({PLOT})\n\n`{PLOT}`: each task's score (seed 0) "
                 "against c for the candidate L0 series, with dense L0 (published) and `--memory lean` as lines.\n")
    atomic_write_text(out_dir / "memory_accuracy.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out_dir / "memory_accuracy.md", text)
    return text


PLOT = "memory_accuracy_candidates.png"
# the candidate-fraction series of the plot: (label, {c: configuration})
C_SERIES = (("candidate L0, w lr 5e-4", {0.02: "c0.02_lr5e-4", 0.05: "c0.05_lr5e-4", 0.10: "c0.10_lr5e-4"}),
            ("candidate L0, w lr 1e-4", {0.02: "c0.02", 0.05: "c0.05", 0.10: "c0.10"}))
C_LINES = (("dense L0 (published)", "dense_published", "black"), ("dense L0, --memory lean", "lean", "tab:gray"))


def c_points(table: dict, configs: dict, task: str) -> list[tuple[float, float]]:
    """(c, seed-0 score) of one candidate series on `task`, for each c measured there."""
    return [(c, table[cfg][task][0]) for c, cfg in sorted(configs.items()) if 0 in table.get(cfg, {}).get(task, {})]


def plot_candidates(table: dict, path: Path) -> bool:
    """Each task's seed-0 score against the candidate fraction c (one line per series, a point per
    measured c), beside dense L0's as horizontal lines: where a picture says more than the table's
    scattered cells which c is best. False (nothing written) when no series has two measured c."""
    if not any(len(c_points(table, configs, t)) >= 2 for _, configs in C_SERIES for t in TASKS):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(3.1 * len(TASKS), 3.4))
    for ax, task in zip(axes, TASKS):
        for (label, configs), marker in zip(C_SERIES, ("o", "s")):
            pts = c_points(table, configs, task)
            if pts:
                ax.plot([100 * c for c, _ in pts], [v for _, v in pts], marker=marker, label=label)
        for label, cfg, color in C_LINES:
            if 0 in table.get(cfg, {}).get(task, {}):
                ax.axhline(table[cfg][task][0], color=color, linestyle="--", linewidth=1, label=label)
        ax.set_xscale("log")
        ax.set_xlim(1.6, 12.5)
        ax.set_xticks([2, 5, 10], ["2%", "5%", "10%"])
        ax.minorticks_off()
        ax.set_title(task)
        ax.set_xlabel("candidates c")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("validation score (seed 0)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Candidate L0 at 0.5% against the candidate fraction c (all-MiniLM-L6-v2, GLUE validation)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "report"))
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                   help=f"default: all ({', '.join(GPU_ONLY)} only where there is a GPU)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "glue"))
    p.add_argument("--model", default=None, help="(tests) another model than the packaged MiniLM")
    p.add_argument("--max-train-samples", type=int, default=None, help="(tests) cap every training set")
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "memory_accuracy"))
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.configs is None:
        args.configs = [c for c in CONFIGS if gpu or c not in GPU_ONLY]
    elif args.action == "run" and not gpu and set(args.configs) & set(GPU_ONLY):
        p.error(f"{', '.join(sorted(set(args.configs) & set(GPU_ONLY)))}: bf16 frozen weights train on a GPU only "
                "(this machine has none); leave it out of --configs")
    restore_published(args)
    status = 0
    if args.action == "run":
        # One cell at a time, the report rewritten after each: a run cut off keeps every finished cell.
        for cfg in args.configs:
            for task in args.tasks:
                for seed in args.seeds:
                    cell = argparse.Namespace(**{**vars(args), "tasks": [task], "seeds": [seed]})
                    status |= glue_accuracy.main(_grid_args(cfg, cell))
                    write_report(collect(args), Path(args.results_dir), _env.command())
    print(write_report(collect(args), Path(args.results_dir), _env.command()))
    return status


if __name__ == "__main__":
    sys.exit(main())
