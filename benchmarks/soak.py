#!/usr/bin/env python
"""Soak test of `diffprune serve`: mixed load for --minutes while tasks are removed and added.

    python benchmarks/soak.py                 # 10 minutes, 8 clients, 5 GLUE tasks of the packaged MiniLM
    python benchmarks/soak.py --minutes 1     # a short one

1. The 5 small GLUE diffs and each task's offline reference predictions (its merged model, one input
   at a time) come from benchmarks/serve_load.py (cached in --work-dir).
2. `diffprune serve` holds the 5 tasks on 127.0.0.1 with --diff-root over the run directories.
3. For --minutes, --concurrency clients send predict requests (1-4 random validation inputs of a random
   task) and check every answer against the reference (label, and every score or the value within 1e-5).
   Meanwhile a churn client, every --churn-seconds, DELETEs one task and POSTs it back, and adds and
   removes an extra copy of a task under another name, so switches, adds and removes all happen under
   load. A request for a task that is out at that moment gets 404: counted apart, not as an error.
4. The server's RSS is sampled every --sample-seconds; its slope (least squares, MiB per minute) is
   reported over the whole run and after the first minute (warm-up: allocator pools, tokenizer caches).

Only 127.0.0.1 is contacted; every loop stops at the deadline. Writes benchmarks/results/soak.{json,md}
(or --out) with the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import serve_load as sl  # noqa: E402  (the benchmark this soak reuses: runs, references, server, checks)


def slope_mib_per_min(samples: list[tuple[float, int]]) -> float | None:
    if len(samples) < 3:
        return None
    ts = [t / 60.0 for t, _ in samples]
    ys = [r / 2**20 for _, r in samples]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else None


async def soak(url: str, pools: dict, refs: dict, runs: dict, args, pid: int) -> dict:
    import httpx

    rng = random.Random(args.seed)
    tasks = list(sl.TASKS)
    present = set(tasks)  # what the churn client believes is loaded (a 404 for a task not in it is expected)
    outages = {t: 0 for t in tasks}  # per task, how many times the churn client has taken it out
    out = {"requests": 0, "inputs": 0, "statuses": {}, "wrong": 0, "errors_5xx": 0, "transport_errors": 0,
           "unexpected_404": 0, "expected_404": 0, "max_abs_error": 0.0, "churn": {"removed": 0, "added": 0,
           "extra_added": 0, "extra_removed": 0, "failed": 0, "failures": []}, "rss": []}
    start = time.monotonic()
    deadline = start + 60.0 * args.minutes
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker(wid: int):
            wr = random.Random(args.seed * 1000 + wid)
            while time.monotonic() < deadline:
                task = wr.choice(tasks)
                items = [wr.randrange(len(pools[task])) for _ in range(wr.randint(1, args.max_request_inputs))]
                was_present, outage = task in present, outages[task]
                try:
                    r = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": [pools[task][i] for i in items]})
                except httpx.HTTPError:
                    out["transport_errors"] += 1
                    continue
                out["requests"] += 1
                out["statuses"][r.status_code] = out["statuses"].get(r.status_code, 0) + 1
                if r.status_code >= 500:
                    out["errors_5xx"] += 1
                elif r.status_code == 404:
                    # expected only while the churn client has the task out (or is just taking it out/in)
                    if was_present and task in present and outages[task] == outage:
                        out["unexpected_404"] += 1
                    else:
                        out["expected_404"] += 1
                elif r.status_code == 200:
                    results = r.json()["results"]
                    out["inputs"] += len(items)
                    if len(results) != len(items):
                        out["wrong"] += len(items)
                    for i, res in zip(items, results):
                        ref = refs[task][i]
                        if "value" in ref:
                            err = abs(res["value"] - ref["value"])
                        else:
                            err = max(abs(res["scores"][lab] - s) for lab, s in zip(sl.TASKS[task]["labels"], ref["scores"]))
                        out["max_abs_error"] = max(out["max_abs_error"], err)
                        out["wrong"] += 0 if sl.check_answer(task, res, ref) else 1

        async def churn():
            n = 0
            while time.monotonic() + args.churn_seconds < deadline:
                await asyncio.sleep(args.churn_seconds)
                task = rng.choice(tasks)
                c = out["churn"]
                try:
                    present.discard(task)
                    outages[task] += 1
                    r = await client.delete(f"/v1/tasks/{task}")
                    ok = r.status_code == 200
                    c["removed"] += ok
                    await asyncio.sleep(args.churn_seconds / 4)
                    r2 = await client.post("/v1/tasks", json={"run_dir": runs[task].name, "name": task})
                    ok = ok and r2.status_code == 201
                    c["added"] += r2.status_code == 201
                    if r2.status_code == 201:
                        present.add(task)
                    extra = f"{task}-copy{n}"
                    r3 = await client.post("/v1/tasks", json={"run_dir": runs[task].name, "name": extra})
                    c["extra_added"] += r3.status_code == 201
                    r4 = await client.delete(f"/v1/tasks/{extra}")
                    c["extra_removed"] += r4.status_code == 200
                    ok = ok and r3.status_code == 201 and r4.status_code == 200
                    if not ok:
                        c["failed"] += 1
                        c["failures"].append([r.status_code, r2.status_code, r3.status_code, r4.status_code, r2.text[:200]])
                        if r2.status_code >= 500 or r3.status_code >= 500 or r4.status_code >= 500:
                            out["errors_5xx"] += 1
                except httpx.HTTPError as e:
                    c["failed"] += 1
                    c["failures"].append(repr(e)[:200])
                n += 1

        async def sampler():
            while time.monotonic() < deadline:
                out["rss"].append((round(time.monotonic() - start, 2), sl.proc_memory(pid)["rss_bytes"]))
                await asyncio.sleep(args.sample_seconds)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker(i) for i in range(args.concurrency)], churn(), sampler())
        out["elapsed_seconds"] = round(time.perf_counter() - t0, 1)
        final = await client.get("/v1/tasks")
        out["tasks_at_end"] = sorted(t["name"] for t in final.json()["tasks"])
        out["health_at_end"] = (await client.get("/health")).json()
        out["server_stats"] = (await client.get("/v1/stats")).json()["model"]
    return out


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.with_suffix(".json")).write_text(json.dumps(result, indent=2) + "\n")
    s = result["soak"]
    lines = [
        "# Soak: `diffprune serve` under mixed load while tasks are removed and added",
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- machine: {result['environment'].get('machine')}",
        f"- versions: {result['environment'].get('versions')}",
        f"- tasks: {', '.join(sl.TASKS)} (small diffs of the packaged all-MiniLM-L6-v2: {result['trained_with']}; "
        "their accuracy is not a result, only their size and structure matter)",
        "",
        "| what | value |",
        "|---|---|",
        f"| duration | {s['elapsed_seconds']} s |",
        f"| predict requests answered | {s['requests']:,} ({s['inputs']:,} inputs checked) |",
        f"| wrong answers (vs the merged model, 1e-5) | {s['wrong']} |",
        f"| 5xx responses | {s['errors_5xx']} |",
        f"| transport errors | {s['transport_errors']} |",
        f"| 404 while the task was out (expected) | {s['expected_404']} |",
        f"| 404 for a task that was in | {s['unexpected_404']} |",
        f"| statuses | {json.dumps(s['statuses'])} |",
        f"| largest score/value difference | {s['max_abs_error']:.2e} |",
        f"| churn: removed / re-added / extra added / extra removed / failed | {s['churn']['removed']} / "
        f"{s['churn']['added']} / {s['churn']['extra_added']} / {s['churn']['extra_removed']} / {s['churn']['failed']} |",
        f"| server switches / forwards | {s['server_stats'].get('switches')} / {s['server_stats'].get('forwards')} |",
        f"| server RSS first / last / max sample | {result['rss_mib']['first']:.0f} / {result['rss_mib']['last']:.0f} / "
        f"{result['rss_mib']['max']:.0f} MiB |",
        f"| RSS slope, whole run | {result['rss_slope_mib_per_min']['all']:+.2f} MiB/min |",
        f"| RSS slope, after the first minute | {result['rss_slope_mib_per_min']['after_1_min']:+.2f} MiB/min |",
        f"| tasks at the end | {', '.join(s['tasks_at_end'])} |",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-request-inputs", type=int, default=4)
    ap.add_argument("--churn-seconds", type=float, default=4.0, help="seconds between remove/add rounds")
    ap.add_argument("--sample-seconds", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "glue"))
    ap.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "serve_load"))
    ap.add_argument("--train-samples", type=int, default=sl.QUICK["train_samples"])
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=100)
    ap.add_argument("--max-seq-length", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--server-threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak"))
    args = ap.parse_args()
    if args.minutes <= 0 or args.concurrency < 1 or args.churn_seconds <= 0:
        ap.error("--minutes, --concurrency and --churn-seconds must be positive")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    runs, trained_with = sl.ensure_runs(args)
    pools = {t: [sl.texts_of(t, r) for r in sl.read_tsv(Path(args.data_dir) / t / "validation.tsv")[: args.pool]]
             for t in sl.TASKS}
    sl.log("offline references from the merged models")
    refs, _ = sl.prepare_references(runs, pools, args)
    root = Path(next(iter(runs.values()))).parent
    srv = sl.Server([f"{t}={p}" for t, p in runs.items()], args, Path(args.work_dir) / "server_soak.log")
    srv.cmd += ["--diff-root", str(root)]
    sl.log(f"soak: {args.minutes} min, {args.concurrency} clients, churn every {args.churn_seconds} s")
    with srv:
        s = asyncio.run(soak(srv.url, pools, refs, runs, args, srv.proc.pid))
        alive = srv.proc.poll() is None
    rss = s.pop("rss")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "environment": sl.environment(),
        "trained_with": trained_with,
        "config": vars(args),
        "soak": s,
        "server_alive_at_end": alive,
        "rss_samples": rss,
        "rss_mib": {"first": rss[0][1] / 2**20, "last": rss[-1][1] / 2**20, "max": max(r for _, r in rss) / 2**20},
        "rss_slope_mib_per_min": {"all": slope_mib_per_min(rss) or 0.0,
                                  "after_1_min": slope_mib_per_min([x for x in rss if x[0] >= 60]) or 0.0},
    }
    write_report(result, Path(args.out))
    sl.log(f"soak done: {s['requests']} requests, {s['wrong']} wrong, {s['errors_5xx']} 5xx, "
           f"RSS slope {result['rss_slope_mib_per_min']['after_1_min']:+.2f} MiB/min; wrote {args.out}.md/.json")
    ok = s["wrong"] == 0 and s["errors_5xx"] == 0 and s["transport_errors"] == 0 and alive and s["unexpected_404"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
