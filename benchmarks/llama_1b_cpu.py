#!/usr/bin/env python
"""A 1B causal LM on this CPU through `diffprune train` (issue 16, regime (c)): what is refused up front,
with which figures, and what trains.

A Llama-3.2-1B-shaped model with random weights (hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocabulary 128,256, tied embeddings: 1.24B parameters, 4.6 GiB in fp32) and the
offline BPE tokenizer of `diffprune.tiny` are saved as an ordinary model folder; then `diffprune train`
runs on a small text file once per memory configuration, each in its own process, as a user would run it:

    python benchmarks/llama_1b_cpu.py                 # about 40 minutes on the 2-core CPU
    python benchmarks/llama_1b_cpu.py --configs lean  # one configuration

Each run's exit code, wall time, peak resident memory and (when refused) the refusal line, or (when
trained) its steps, nnz, file and step times, go to benchmarks/results/llama_1b_cpu.{md,json}.
Random weights: the scores mean nothing and are not reported; the point is what fits and runs.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import _env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name -> (what it is, extra `diffprune train` flags)
CONFIGS = {
    "standard": ("dense L0 (the default memory options)", []),
    "lean": ("dense L0, `--memory lean`", ["--memory", "lean"]),
    "lean_w16": ("dense L0, `--memory lean --w-dtype bf16`", ["--memory", "lean", "--w-dtype", "bf16"]),
    "lean_factored": ("dense L0, `--memory lean --moments-dtype factored`",
                      ["--memory", "lean", "--moments-dtype", "factored"]),
    "candidates": ("candidate L0, `--memory lean --candidates 0.05`",
                   ["--memory", "lean", "--candidates", "0.05", "--candidate-warmup-steps", "4"]),
}
TRAIN = ["--target-sparsity", "0.005", "--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "1",
         "--max-seq-length", "512", "--lr", "1e-4", "--save-steps", "0", "--no-progress", "--overwrite"]


def build(model_dir: Path, shape: str) -> dict:
    """The random model and the offline tokenizer, saved once (skipped when the folder is there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from diffprune.tiny import tiny_tokenizer
    from train_cost import LLAMA_SHAPES

    if (model_dir / "config.json").exists():
        return json.loads((model_dir / "build.json").read_text())
    t0 = time.time()
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_SHAPES[shape], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    info = {"shape": shape, "parameters": n, "build_seconds": round(time.time() - t0, 1)}
    (model_dir / "build.json").write_text(json.dumps(info))
    return info


def write_data(out: Path, rows: int, seed: int) -> Path:
    """Text rows of about 512 tokens each (words of the tokenizer's own corpus)."""
    from diffprune.tiny import _CORPUS

    words = _CORPUS.split()
    rng = random.Random(seed)
    out.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(420))}) + "\n"
                           for _ in range(rows)))
    return out


def run_one(name: str, model_dir: Path, data: Path, val: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "diffprune", "train", "--model", str(model_dir), "--train-file", str(data),
           "--validation-file", str(val), "--output-dir", str(out), *TRAIN, *CONFIGS[name][1]]
    # a fresh wrapper per run, so that its RUSAGE_CHILDREN peak is this run's alone
    wrapper = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps({'rc': r.returncode, 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
               "'stderr': r.stderr[-6000:], 'stdout': r.stdout[-2000:]}))")
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=REPO,
                          env={**_env_vars()})
    seconds = time.time() - t0
    res = json.loads(done.stdout.strip().splitlines()[-1])
    record = {"config": name, "title": CONFIGS[name][0], "command": "diffprune " + " ".join(cmd[3:]),
              "exit_code": res["rc"], "wall_seconds": round(seconds, 1), "peak_rss_gib": round(res["maxrss_kib"] / 2**20, 2)}
    err_lines = [x for x in res["stderr"].splitlines() if "error:" in x]
    if res["rc"] != 0:
        record["refusal"] = err_lines[-1] if err_lines else res["stderr"][-800:]
        return record
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    warmup = [e for e in log if e.get("event") == "candidates"]
    est = [e for e in log if e.get("event") == "memory_estimate"]
    if est and est[0].get("in_use_bytes") is not None:  # what the memory check expected the run to peak at
        record["expected_peak_gib"] = round((est[0]["in_use_bytes"] + est[0]["estimate_bytes"]) / 2**30, 2)
    record.update({
        "steps": metrics.get("steps"), "nnz": metrics["nnz"], "n_diffed": metrics.get("n_diffed"),
        "stored_bytes": metrics["stored_bytes"], "train_seconds": metrics["train_seconds"],
        "candidate_warmup": warmup[-1] if warmup else None,
        "seconds_per_step": {ph: _pace(log, ph) for ph in ("l0", "fixed")},
    })
    return record


def _with_earlier(records: list[dict], info: dict, path: Path) -> list[dict]:
    """This run's records, then the earlier results file's records of the configurations this run did not
    repeat (same model shape), each keeping its date and the command that made it, in CONFIGS order."""
    if not path.exists():
        return records
    old = json.loads(path.read_text())
    if old.get("model", {}).get("shape") != info.get("shape"):
        return records
    done = {r["config"] for r in records}
    for r in old.get("records", []):
        if r["config"] not in done:
            r = dict(r)
            r.setdefault("date", old.get("date"))
            r.setdefault("kept_from", {"date": r["date"], "command": old.get("command"), "note": old.get("note")})
            records.append(r)
    return sorted(records, key=lambda r: list(CONFIGS).index(r["config"]))


def _pace(log: list[dict], phase: str) -> float | None:
    """Mean seconds per step of a phase: the training seconds its evaluations record (the run's so far),
    over its steps; None for a phase with no evaluation. (Rows from before the evaluations recorded them,
    kept from earlier results files, came from the step records' examples/s, then rounded to two decimals:
    a 1B model's 0.01 example/s was 67-200 s a step.)"""
    evals = [e for e in log if e.get("event") == "eval" and "train_seconds" in e]
    ends = {e["phase"]: (e["global_step"], e["train_seconds"]) for e in evals}  # each phase's last evaluation
    if phase not in ends:
        return None
    before = [v for k, v in ends.items() if v[0] < ends[phase][0]]
    # (the first phase's seconds start after the candidate warm-up, which they include)
    warmup = sum(e["seconds"] for e in log if e.get("event") == "candidates")
    step0, sec0 = max(before) if before else (0, warmup)
    return float(f"{(ends[phase][1] - sec0) / (ends[phase][0] - step0):.3g}")


def _env_vars() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_report(info: dict, records: list[dict], args, out_dir: Path) -> str:
    lines = [
        "# A 1B causal LM on the 2-core CPU: what `diffprune train` refuses, and what trains",
        "",
        (f"Llama-3.2-1B's shape" if info["shape"] == "llama-1b" else f"The {info['shape']} shape of train_cost.py")
        + f" with random weights ({info['parameters']:,} parameters, fp32; embeddings and LM head "
        "frozen by the causal-LM default), the offline BPE tokenizer of `diffprune.tiny`, "
        f"{args.rows} text rows of about 512 tokens, batch 1, one L0 and one fixed-mask epoch, 0.5%. "
        "Random weights: no score is reported. Each run is `diffprune train` in its own process; peak memory is "
        "its resident set (weights included); \"expected\" is what the run's memory check logged: the process's "
        "memory at the check plus the estimate of what training adds (runs since 2026-12-07 evening).",
        "",
        "| configuration | date | exit | wall time | peak memory | what happened |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["exit_code"] != 0:
            what = "refused before training: " + r["refusal"].replace("diffprune train: error: ", "").replace("|", "/")
        else:
            pace = r["seconds_per_step"]
            wu = r.get("candidate_warmup")
            what = (f"trained: {r['steps']} steps ({pace['l0']} s per L0 step, {pace['fixed']} s per fixed-mask step"
                    + (f", after a {wu['warmup_steps']}-batch importance warm-up of {wu['seconds']:.0f} s" if wu else "")
                    + f"), {r['nnz']:,} nonzeros of {r['n_diffed']:,}, a {r['stored_bytes'] / 1e6:.1f} MB diff")
        expected = f" (expected {r['expected_peak_gib']:.1f})" if r.get("expected_peak_gib") else ""
        lines.append(f"| {r['title']} | {r.get('date', '?')} | {r['exit_code']} | {r['wall_seconds']:.0f} s | "
                     f"{r['peak_rss_gib']:.1f} GiB{expected} | {what} |")
    lines += ["", "## Provenance", "", f"- command: `{_env.command()}`", f"- machine: {_env.machine()}",
              f"- versions: {_env.versions()}", f"- date: {_env.now()}",
              f"- note: {args.note}" if args.note else "- note: —"]
    kept = [r for r in records if r.get("kept_from")]
    if kept:
        lines.append("- rows kept from earlier runs (configurations this run did not repeat): "
                     + "; ".join(f"{r['config']} from {r['kept_from']['date']} (`{r['kept_from']['command']}`"
                                 + (f", note: {r['kept_from']['note']}" if r['kept_from'].get("note") else "") + ")"
                                 for r in kept))
    lines += ["", "Each run's command:", ""]
    lines += [f"- {r['config']}: `{r['command']}`" for r in records]
    text = "\n".join(lines) + "\n"
    _env.write_results(out_dir / "llama_1b_cpu", text, {"model": info, "records": records, "command": _env.command(),
                                                          "machine": _env.machine(), "versions": _env.versions(),
                                                          "date": _env.now(), "note": args.note})
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--shape", default="llama-1b", help="a train_cost.py Llama shape (llama-tiny for a smoke test)")
    p.add_argument("--rows", type=int, default=8, help="training rows (one step each)")
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "llama_1b_cpu"))
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    info = build(work / f"model-{args.shape}", args.shape)
    print(f"model: {info}", flush=True)
    data, val = write_data(work / "train.jsonl", args.rows, 0), write_data(work / "validation.jsonl", 2, 1)
    records = []
    for name in args.configs:
        r = run_one(name, work / f"model-{args.shape}", data, val, work / f"run-{name}")
        r["date"] = _env.now()
        print(json.dumps(r), flush=True)
        records.append(r)
    records = _with_earlier(records, info, Path(args.results_dir) / "llama_1b_cpu.json")
    print(write_report(info, records, args, Path(args.results_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
