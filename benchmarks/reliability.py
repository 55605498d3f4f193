#!/usr/bin/env python
"""Long runs of the reliability checks, written to benchmarks/results/reliability.{md,json}.

    python benchmarks/reliability.py                       # fuzzers at 2,000 examples per property/operation
                                                           # + the 10-minute soak (about 25 min on 2 cores)
    python benchmarks/reliability.py --examples 200 --soak-minutes 0   # fuzzers only, a few minutes

* the diff-file fuzzer (tests/test_fuzz_diff_file.py): mutated bytes, edited and re-checksummed
  headers, replaced tensors, over v2 files (fp32 / bf16 / int8 values) and the v1 fixture;
* the server fuzzer (tests/test_fuzz_server.py): schemathesis over the server's own OpenAPI spec, on
  127.0.0.1, plus hostile bodies;
* the soak (benchmarks/soak.py): mixed load while tasks are removed and added; its own report is
  benchmarks/results/soak.{md,json}.

The fast versions of both fuzzers run in the test suite (`python -m pytest -q`) with fewer examples.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# Failures the fuzzers and probes found, each fixed in the same change as its test (kept here so the
# report says what the counts above it mean).
FINDINGS = [
    ("server", "a 100,000-deep nested JSON array in a predict body gave 500 and a logged traceback "
               "(RecursionError in json.loads)", "400 'malformed JSON body: nested too deeply' "
               "(tests/test_fuzz_server.py::test_hostile_bodies_are_4xx)"),
    ("server", "an integer literal over Python's 4,300-digit limit gave 500 (a plain ValueError, not a "
               "JSONDecodeError)", "400 'malformed JSON body' (same test)"),
    ("server", "schemathesis ST205: OPTIONS /v1/tasks answered 405 with `Allow: GET`, though POST is served "
               "there too (Starlette lists only the first route of a path)", "a 405 handler lists every "
               "method of every route matching the path"),
    ("diff file", "a byte edit in the JSON header of a version-1 file (a label name, a config value) loaded "
                  "silently as a different diff: the v1 checksum covers the tensors only",
     "format v2 checksums the header, format and version too; v1 files still load (their headers stay "
     "unprotected: `diffprune compress` rewrites a run as v2)"),
    ("diff file", "hypothesis (re-checksummed header, config.diff_parameters = []): the file loaded and "
                  "`from_pretrained` raised ConfigError ('no parameters left to diff'), not a diff-file error",
     "the reader refuses a header whose config does not diff the tensors it has diffs for, and "
     "from_sparse_diff turns a config that does not fit the model into DiffFileError"),
    ("soak", "the server's RSS grew +7.5 MiB/min over a 10-minute soak, with a constant number of Python "
             "objects: glibc kept the memory of freed tensors of ever-changing batch shapes",
     "the model thread calls malloc_trim(0) between batches, at most every 2 s (serving/server.py:trim_heap)"),
]


def run_pytest(test_file: str, examples: int, report: Path, extra_env: dict | None = None) -> dict:
    env = {**os.environ, "DIFFPRUNE_FUZZ_EXAMPLES": str(examples), "DIFFPRUNE_FUZZ_REPORT": str(report),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                       cwd=REPO, env=env, capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()
    return {"file": test_file, "returncode": r.returncode, "seconds": round(time.time() - t0, 1),
            "summary": tail[-1] if tail else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="examples per fuzz property / API operation")
    ap.add_argument("--soak-minutes", type=float, default=10.0, help="0 skips the soak")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reliability"))
    args = ap.parse_args()
    import _env

    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "counts.jsonl"
        runs = [run_pytest("tests/test_fuzz_diff_file.py", args.examples, report),
                run_pytest("tests/test_fuzz_server.py", args.examples, report)]
        counts = {}
        if report.exists():
            for line in report.read_text().splitlines():
                counts.update(json.loads(line))
    soak = None
    if args.soak_minutes > 0:
        cmd = [sys.executable, "benchmarks/soak.py", "--minutes", str(args.soak_minutes)]
        r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        soak_file = REPO / "benchmarks" / "results" / "soak.json"
        if soak_file.exists():
            data = json.loads(soak_file.read_text())
            soak = {"returncode": r.returncode, "requests": data["soak"]["requests"], "inputs": data["soak"]["inputs"],
                    "wrong": data["soak"]["wrong"], "errors_5xx": data["soak"]["errors_5xx"],
                    "transport_errors": data["soak"]["transport_errors"], "churn": data["soak"]["churn"],
                    "rss_slope_mib_per_min": data["rss_slope_mib_per_min"], "minutes": args.soak_minutes,
                    "date": data["date"]}
    result = {
        "date": _env.now(),
        "command": _env.command(),
        "environment": {"machine": _env.machine(), "versions": _env.versions("hypothesis", "schemathesis", "fastapi")},
        "fuzz_runs": runs,
        "counts": counts,
        "soak": soak,
        "findings": [{"where": w, "failure": f, "fix": x} for w, f, x in FINDINGS],
        "seconds": round(time.time() - t_start, 1),
    }
    _env.write_results(args.out, render(result), result)
    print(render(result))
    ok = all(r["returncode"] == 0 for r in runs) and (soak is None or soak["returncode"] == 0)
    return 0 if ok else 1


def render(result: dict) -> str:
    c = result["counts"]
    lines = ["# Reliability: fuzzers and soak", "", f"- date: {result['date']}", f"- command: `{result['command']}`",
             f"- machine: {result['environment']['machine']}", f"- versions: {result['environment']['versions']}", "",
             "## Fuzzers", "", "| fuzzer | inputs tried | outcomes | result |", "|---|---|---|---|"]
    for run in result["fuzz_runs"]:
        if "diff_file" in run["file"]:
            per = c.get("diff_file", {})
            tried = sum(sum(v.values()) for v in per.values())
            outcomes = "; ".join(f"{prop}: " + ", ".join(f"{k} {n}" for k, n in sorted(v.items()))
                                 for prop, v in sorted(per.items()))
            name = "diff file (`SparseDiff.load`, `from_pretrained`; hypothesis)"
        else:
            per = c.get("server", {})
            tried = per.get("requests", 0)
            outcomes = "statuses " + ", ".join(f"{k}: {n}" for k, n in sorted(per.get("statuses", {}).items()))
            name = "server (schemathesis over /openapi.json, 127.0.0.1)"
        lines.append(f"| {name} | {tried:,} | {outcomes} | {run['summary']} ({run['seconds']} s) |")
    lines += ["", f"Examples per property / operation: {c.get('diff_file', {}) and c.get('examples_per_property')}"
                  f" / {c.get('examples_per_operation')}. Allowed outcomes and the memory bound: the docstrings of "
                  "tests/test_fuzz_diff_file.py and tests/test_fuzz_server.py.", ""]
    s = result["soak"]
    lines += ["## Soak", ""]
    if s:
        lines += [f"{s['minutes']:g} minutes ({s['date']}; details in [soak.md](soak.md)): {s['requests']:,} predict "
                  f"requests ({s['inputs']:,} inputs checked against the merged models), {s['wrong']} wrong answers, "
                  f"{s['errors_5xx']} 5xx, {s['transport_errors']} transport errors; tasks removed and re-added "
                  f"{s['churn']['removed']} / {s['churn']['added']} times and extra copies added and removed "
                  f"{s['churn']['extra_added']} / {s['churn']['extra_removed']} times under load "
                  f"({s['churn']['failed']} failed); server RSS slope {s['rss_slope_mib_per_min']['all']:+.2f} MiB/min "
                  f"over the run, {s['rss_slope_mib_per_min']['after_1_min']:+.2f} MiB/min after the first minute.", ""]
    else:
        lines += ["Not run (--soak-minutes 0).", ""]
    lines += ["## Failures found and fixed", "", "| where | failure | fix |", "|---|---|---|"]
    lines += [f"| {f['where']} | {f['failure']} | {f['fix']} |" for f in result["findings"]]
    lines += ["", f"Total time: {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
