#!/usr/bin/env python
"""Tabulate a hyperparameter search from several glue_accuracy.json files, one row per setting.

    python benchmarks/glue_search_table.py --out benchmarks/results/glue_lr_search \
        benchmarks/results/glue_accuracy.json benchmarks/results/glue_structured_study/*/glue_accuracy.json

Runs are grouped by method and settings (read from each record, so no labels are typed by hand);
a row names the settings that differ from glue_accuracy.py's defaults. For every method and every
combination of the other settings, a "tuned" row takes, per task, the best validation score over
the searched setting (`--axis`, default lr): the same selection for every method, so the search
effort is equal and visible. Validation-selected scores are optimistic for every method alike
(GLUE's labelled test sets are not public). With `--seeds 0 1 2` each cell is instead the mean ±
sample std over the seeds it has, with the scores per seed below, and there are no tuned rows.
Writes OUT.md and OUT.json with the command, machine and date; each row records where its runs
ran (GPU or CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not
import _env  # noqa: E402
from glue_accuracy import DEFAULTS, METHOD_TITLES, METHODS, TASKS, _kb  # noqa: E402

from diffprune.training import UNRECORDED_SETTINGS  # noqa: E402


def _device(rec: dict) -> str:
    return rec["machine"].get("gpu") or "CPU"


def _fmt(value) -> str:
    """Floats as people write learning rates: 1e-4, 5e-5, 1.25e-7, 0.1."""
    if not isinstance(value, float):
        return str(value)
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _defaults(method: str) -> dict:
    """What glue_accuracy.py runs `method` with when nothing is --set: its table, then the library's."""
    from diffprune.training import TrainConfig

    lib = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return {k: _fmt(v) for k, v in {**lib, **DEFAULTS["common"], **DEFAULTS.get(method, {})}.items()}


def _config_key(rec: dict, keys: set) -> tuple:
    # A setting a record does not carry (a run made before the option existed) takes the value runs
    # had then, so runs that differ only in how they were recorded are one config.
    defaults = {**_defaults(rec["method"]), **{k: _fmt(v) for k, v in UNRECORDED_SETTINGS.items()}}
    settings = {k: _fmt(rec["settings"][k]) if k in rec["settings"] else defaults.get(k, "—") for k in keys}
    return rec["method"], tuple(sorted(settings.items()))


def _sort_key(value: str):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


# The rank is a searched setting here, so LoRA's title leaves it to the settings, which always show it.
TITLES = {**METHOD_TITLES, "lora": "LoRA (q,v) + head"}
ALWAYS_SHOWN = {"lora": ("lora_r",)}


def _label(method: str, settings: dict, always: tuple = ()) -> str:
    defaults = _defaults(method)
    always = (*always, *ALWAYS_SHOWN.get(method, ()))
    changed = [f"{k}={v}" for k, v in sorted(settings.items()) if defaults.get(k) != v or k in always]
    return TITLES[method] + (f" ({', '.join(changed)})" if changed else "")


def collect(paths: list[Path], seeds: list[int]) -> dict:
    """config key -> {task: {seed: record}}. When two inputs hold runs of the same config, task and
    seed (the same run copied, or a rerun of it elsewhere), the first input's is used and the other
    is named on stderr, so a table never silently averages reruns."""
    records = [(path, rec) for path in paths for rec in json.loads(path.read_text()) if rec["seed"] in seeds]
    keys: dict = defaultdict(set)
    for _, rec in records:
        keys[rec["method"]] |= set(rec["settings"])
    configs: dict = defaultdict(lambda: defaultdict(dict))
    source: dict = {}
    for path, rec in records:
        key = _config_key(rec, keys[rec["method"]])
        task, seed = rec["task"], rec["seed"]
        if seed in configs[key][task]:
            kept = configs[key][task][seed]
            if (kept["score"], kept.get("date")) != (rec["score"], rec.get("date")):
                print(f"note: {path} has another {task} seed-{seed} run of {_label(key[0], dict(key[1]))} "
                      f"(score {rec['score']:.1f}); using {source[key, task, seed]}'s ({kept['score']:.1f})",
                      file=sys.stderr)
            continue
        configs[key][task][seed], source[key, task, seed] = rec, path
    return configs


def build(configs: dict, tasks: list[str], axis: str, tuned: bool = True) -> list[dict]:
    rows = []
    for (method, items), by_task in sorted(configs.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        settings = dict(items)
        seed_scores = {t: {seed: rec["score"] for seed, rec in sorted(by_task[t].items())} for t in tasks if t in by_task}
        scores = {t: statistics.mean(s.values()) for t, s in seed_scores.items()}
        stored = {t: statistics.mean(rec.get("stored_bytes") or 0 for rec in by_task[t].values()) for t in scores}
        rows.append({
            "kind": "setting", "method": method, "label": _label(method, settings, always=(axis,)), "settings": settings,
            "scores": scores, "seed_scores": seed_scores,
            "std": {t: statistics.stdev(s.values()) for t, s in seed_scores.items() if len(s) > 1},
            "average": statistics.mean(scores.values()) if len(scores) == len(tasks) else None,
            "stored_bytes": stored,
            "devices": sorted({_device(rec) for t in scores for rec in by_task[t].values()}),
        })
    if not tuned:
        return rows
    # A tuned row per method and per value of every other setting (the best score per task over
    # `axis`), placed after the rows it chose from.
    families: dict = defaultdict(list)
    for row in rows:
        rest = tuple(sorted((k, v) for k, v in row["settings"].items() if k != axis))
        families[(row["method"], rest)].append(row)
    out = []
    for (method, rest), members in families.items():
        out += members
        if len(members) < 2:
            continue
        scores, chosen, stored = {}, {}, {}
        for t in tasks:
            have = [m for m in members if t in m["scores"]]
            if have:
                best = max(have, key=lambda m: m["scores"][t])
                scores[t], chosen[t], stored[t] = best["scores"][t], best["settings"].get(axis), best["stored_bytes"][t]
        label = _label(method, dict(rest))  # without the axis: the row picks it per task
        searched = sorted({m["settings"].get(axis) for m in members}, key=_sort_key)
        out.append({
            "kind": "tuned", "method": method, "label": f"{label}, best {axis} per task of {{{', '.join(searched)}}}",
            "settings": dict(rest), "scores": scores, "chosen": chosen,
            "average": statistics.mean(scores.values()) if len(scores) == len(tasks) else None,
            "stored_bytes": stored,
            "devices": sorted({d for m in members for d in m["devices"]}),
        })
    return out


def _cell(row: dict, task: str) -> str:
    if task not in row["scores"]:
        return "—"
    if row["kind"] == "tuned":
        return f"{row['scores'][task]:.1f} ({row['chosen'][task]})"
    n = len(row["seed_scores"][task])
    return f"{row['scores'][task]:.1f} ± {row['std'][task]:.1f} (n={n})" if n > 1 else f"{row['scores'][task]:.1f}"


def render(rows: list[dict], tasks: list[str], axis: str, meta: dict) -> str:
    seeds = meta["seeds"]
    if len(seeds) == 1:
        about = (f"Seed {seeds[0]}. Scores are the per-task GLUE score (0–100) on the validation sets; `avg` is "
                 "their mean when every task has a run. Rows marked *tuned* take, per task, the best score over "
                 f"the searched {axis} (shown under the score): the same selection for every method, optimistic for all alike.")
    else:
        about = (f"Seeds {', '.join(map(str, seeds))}. Scores are the per-task GLUE score (0–100) on the validation "
                 "sets, as mean ± sample std over the seeds a cell has (n); `avg` is the mean of the task means when "
                 "every task has a run. No tuned rows: a setting is chosen on one seed, then rerun on more.")
    about += " `bytes / task`: stored bytes per task (the diff file, LoRA adapter or fp32 checkpoint), mean over the row's runs."
    lines = [
        "# GLUE hyperparameter search (validation sets)" if len(seeds) == 1 else "# GLUE over seeds (validation sets)", "",
        f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ", f"Machine (this table): {meta['machine']['cpu']}", "",
        about, "",
        "| setting | " + " | ".join(tasks) + " | avg | bytes / task | ran on |",
        "|---|" + "---|" * (len(tasks) + 3),
    ]
    for row in rows:
        avg = "—" if row["average"] is None else f"{row['average']:.1f}"
        name = row["label"]
        if row["kind"] == "tuned":
            name, avg = f"*tuned:* {name}", f"**{avg}**"
        stored = [b for b in row["stored_bytes"].values() if b]
        size = _kb(statistics.mean(stored)) if len(stored) == len(row["stored_bytes"]) and stored else "—"
        lines.append(f"| {name} | " + " | ".join(_cell(row, t) for t in tasks)
                     + f" | {avg} | {size} | {', '.join(row['devices'])} |")
    if len(seeds) > 1:
        lines += ["", "## Per seed", "", "| setting | task | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---|" + "---|" * len(seeds)]
        for row in rows:
            for t in tasks:
                by_seed = row["seed_scores"].get(t, {})
                if len(by_seed) > 1:
                    cells = [f"{by_seed[s]:.1f}" if s in by_seed else "—" for s in seeds]
                    lines.append(f"| {row['label']} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="glue_accuracy.json files")
    p.add_argument("--out", required=True, type=Path, help="path without suffix; writes .md and .json")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="one seed: a search table with tuned rows; several: mean ± std per cell over them")
    p.add_argument("--axis", default="lr", help="the searched setting a tuned row chooses per task")
    args = p.parse_args(argv)

    missing = [str(x) for x in args.inputs if not x.is_file()]
    if missing:
        raise SystemExit(f"no such results file: {', '.join(missing)} (run glue_accuracy.py first)")
    configs = {k: v for k, v in collect(args.inputs, args.seeds).items() if k[0] in args.methods}
    if not configs:
        raise SystemExit(f"no runs with seed(s) {args.seeds} for methods {args.methods} in the inputs")
    rows = build(configs, args.tasks, args.axis, tuned=len(args.seeds) == 1)
    meta = {"command": _env.command(), "machine": _env.machine(), "date": _env.now(), "seeds": args.seeds,
            "inputs": [str(x) for x in args.inputs]}
    text = render(rows, args.tasks, args.axis, meta)
    print(text)
    _env.write_results(args.out, text, {**meta, "rows": rows})


if __name__ == "__main__":
    main()
