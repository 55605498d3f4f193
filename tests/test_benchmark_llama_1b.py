"""benchmarks/llama_1b_cpu.py end to end on the tiny Llama shape: the model folder is built once, `diffprune train`
runs as a user would run it (a subprocess per configuration), and the report has what each run did."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_llama_cpu_benchmark_on_a_tiny_llama(tmp_path):
    import llama_1b_cpu

    results = tmp_path / "results"
    assert llama_1b_cpu.main(["--shape", "llama-tiny", "--configs", "candidates", "--rows", "4",
                              "--work-dir", str(tmp_path / "work"), "--results-dir", str(results)]) == 0
    rec = json.loads((results / "llama_1b_cpu.json").read_text())
    (run,) = rec["records"]
    assert run["exit_code"] == 0 and run["steps"] == 8  # 4 rows x (1 L0 + 1 fixed-mask epoch) at batch 1
    assert run["nnz"] == round(0.005 * run["n_diffed"]) and run["candidate_warmup"]["warmup_steps"] == 4
    assert run["peak_rss_gib"] > 0 and rec["model"]["shape"] == "llama-tiny"
    # the memory check's expectation, from the run's own log, beside the measured peak
    assert 0 < run["expected_peak_gib"] <= 2 * run["peak_rss_gib"]
    assert f"GiB (expected {run['expected_peak_gib']:.1f})" in (results / "llama_1b_cpu.md").read_text()
    assert "trained: 8 steps" in (results / "llama_1b_cpu.md").read_text()
    # the paces come from the training seconds the evaluations log: 4 steps of each phase + the warm-up
    pace = run["seconds_per_step"]
    total = 4 * pace["l0"] + 4 * pace["fixed"] + run["candidate_warmup"]["seconds"]
    assert pace["l0"] > 0 and pace["fixed"] > 0 and abs(total - run["train_seconds"]) < 0.02 * run["train_seconds"]

    # a later run of another configuration keeps this row, with its date and command
    assert llama_1b_cpu.main(["--shape", "llama-tiny", "--configs", "standard", "--rows", "4",
                              "--work-dir", str(tmp_path / "work"), "--results-dir", str(results)]) == 0
    rec2 = json.loads((results / "llama_1b_cpu.json").read_text())
    assert [r["config"] for r in rec2["records"]] == ["standard", "candidates"]
    kept = rec2["records"][1]
    assert kept["nnz"] == run["nnz"] and kept["date"] == run["date"] == rec["date"]
    assert kept["kept_from"]["command"] == rec["command"] and "kept_from" not in rec2["records"][0]
    md = (results / "llama_1b_cpu.md").read_text()
    assert "rows kept from earlier runs" in md and "trained: 8 steps" in md
