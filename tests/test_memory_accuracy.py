"""benchmarks/memory_accuracy.py end to end on a tiny random BERT and 32 RTE examples: each configuration
trains with its own settings, the report compares them, and a fresh work dir restores the published records
instead of training again."""

import json
import sys
from pathlib import Path

from .helpers_cli import glue, one_thread, tiny_base  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_memory_accuracy_grid_on_a_tiny_model(tmp_path, tiny_base, glue):
    import memory_accuracy

    work, results = tmp_path / "work", tmp_path / "results"
    common = ["--tasks", "rte", "--model", str(tiny_base), "--data-dir", str(glue), "--max-train-samples", "32",
              "--work-dir", str(work), "--results-dir", str(results)]
    assert memory_accuracy.main(["run", "--configs", "dense", "lean", "c0.05_lr5e-4", *common]) == 0
    payload = json.loads((results / "memory_accuracy.json").read_text())
    by = {r["config"]: r for r in payload["records"]}
    assert set(by) == {"dense", "lean", "c0.05_lr5e-4"}
    assert by["lean"]["settings"]["memory"] == "lean" and by["c0.05_lr5e-4"]["settings"]["candidates"] == 0.05
    assert by["c0.05_lr5e-4"]["settings"]["lr"] == 5e-4 and by["dense"]["settings"]["lr"] == 1e-4
    assert "memory" not in by["dense"]["settings"] and "candidates" not in by["dense"]["settings"]
    # every configuration ends at the same exact budget, through its own L0 stage
    assert len({r["nnz"] for r in by.values()}) == 1
    run = json.loads((work / "c0.05_lr5e-4" / "rte-structured-s0" / "run.json").read_text())
    assert run["settings"]["candidates"] == 0.05 and run["settings"]["lr"] == 5e-4
    # the lean run stepped inside backward, and the report says how often its clipping differed
    assert set(by["lean"]["in_backward"]) == {"l0", "fixed"}
    text = (results / "memory_accuracy.md").read_text()
    assert "| dense L0 (the default) |" in text and "| candidate L0, `--candidates 0.05` (w lr 5e-4) |" in text
    assert "dense L0, published grid" in text  # the published dense grid beside today's

    # a fresh checkout: the published records are restored, nothing is trained again
    fresh = tmp_path / "fresh"
    out = memory_accuracy.main(["report", *[a if a != str(work) else str(fresh) for a in common]])
    assert out == 0
    assert json.loads((results / "memory_accuracy.json").read_text())["records"] == payload["records"]
    assert not list(fresh.glob("*/rte-structured-s0/run.json"))  # records only, no runs


def test_a_superseded_configuration_stays_in_the_report(tmp_path):
    """A record of code since replaced (lean before stochastic rounding) is restored and reported beside the
    configuration that replaced it, and cannot be run again."""
    import memory_accuracy
    import pytest

    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    record = {"config": "lean_nearest", "task": "rte", "method": "structured", "seed": 0, "score": 49.8,
              "metrics": {"accuracy": 0.498}, "stages": {"final": 49.8, "first_stage": 56.3,
                                                         "first_stage_density": 0.987, "after_projection": 49.8},
              "train_seconds": 60.0, "settings": {"memory": "lean"}, "date": "2026-12-06 12:05 UTC",
              "machine": {}, "versions": {}, "nnz": 1, "stored_bytes": 1}
    (results / "memory_accuracy.json").write_text(json.dumps({"records": [record]}))
    args = ["--tasks", "rte", "--work-dir", str(work), "--results-dir", str(results)]
    assert memory_accuracy.main(["report", *args]) == 0
    assert (work / "lean_nearest" / "rte-structured-s0" / "benchmark_record.json").exists()
    payload = json.loads((results / "memory_accuracy.json").read_text())
    assert [(r["config"], r["score"]) for r in payload["records"]] == [("lean_nearest", 49.8)]
    text = (results / "memory_accuracy.md").read_text()
    row = next(line for line in text.splitlines() if "rounded to nearest" in line)
    assert "| 49.8 |" in row
    with pytest.raises(SystemExit):
        memory_accuracy.main(["run", "--configs", "lean_nearest", *args])


def test_cells_trained_on_a_gpu_are_marked_and_every_machine_is_listed(tmp_path):
    """A cell a lent GPU trained (memory_accuracy_gpu.sh) sits in the same table as the CPU's: the report marks
    it and names both machines with their counts of cells."""
    import memory_accuracy

    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    cpu, gpu = {"cpu": "AMD EPYC", "cores": 2}, {"cpu": "Xeon", "cores": 16, "gpu": "NVIDIA H100 80GB HBM3"}

    def record(config, task, machine, score):
        return {"config": config, "task": task, "method": "structured", "seed": 0, "score": score,
                "metrics": {"accuracy": score / 100}, "stages": {"final": score}, "train_seconds": 60.0,
                "settings": {}, "date": "2026-12-06 12:05 UTC", "machine": machine, "versions": {}, "nnz": 1,
                "stored_bytes": 1}

    records = [record("c0.05_lr5e-4", "rte", cpu, 56.7), record("c0.02_lr5e-4", "rte", gpu, 55.1),
               record("c0.02_lr5e-4", "mrpc", gpu, 83.0)]
    (results / "memory_accuracy.json").write_text(json.dumps({"records": records}))
    assert memory_accuracy.main(["report", "--tasks", "rte", "--work-dir", str(work), "--results-dir", str(results)]) == 0
    text = (results / "memory_accuracy.md").read_text()
    c002 = next(line for line in text.splitlines() if line.startswith("| candidate L0, `--candidates 0.02` (w lr 5e-4) |"))
    c005 = next(line for line in text.splitlines() if line.startswith("| candidate L0, `--candidates 0.05` (w lr 5e-4) |"))
    assert "| 55.1 ᴳ |" in c002 and "| 83.0 ᴳ |" in c002
    assert "| 56.7 |" in c005 and "ᴳ" not in c005
    assert "- machine (2 cells): {'cores': 16, 'cpu': 'Xeon', 'gpu': 'NVIDIA H100 80GB HBM3'}" in text
    assert "- machine (1 cells): {'cores': 2, 'cpu': 'AMD EPYC'}" in text
    assert "cells marked ᴳ ran on the GPU" in text


def test_the_report_plots_score_against_the_candidate_fraction_once_two_are_measured(tmp_path):
    import memory_accuracy

    results = tmp_path / "results"
    results.mkdir()

    def record(config, task, score):
        return {"config": config, "task": task, "method": "structured", "seed": 0, "score": score,
                "metrics": {"accuracy": score / 100}, "stages": {"final": score}, "train_seconds": 60.0,
                "settings": {}, "date": "2026-12-07 09:00 UTC", "machine": {}, "versions": {}, "nnz": 1,
                "stored_bytes": 1}

    def report(records, work):  # (a work dir of its own: the records are restored into it)
        (results / "memory_accuracy.json").write_text(json.dumps({"records": records}))
        assert memory_accuracy.main(["report", "--work-dir", str(work), "--results-dir", str(results)]) == 0
        return (results / "memory_accuracy.md").read_text()

    png = results / memory_accuracy.PLOT
    # one c per series: nothing to draw
    text = report([record("c0.05_lr5e-4", "rte", 59.2), record("c0.05", "cola", 25.7)], tmp_path / "one")
    assert not png.exists() and memory_accuracy.PLOT not in text
    # two c of one series on one task: drawn, linked, and its points are the table's cells
    recs = [record("c0.05_lr5e-4", "rte", 59.2), record("c0.10_lr5e-4", "rte", 55.2), record("c0.02_lr5e-4", "cola", 28.1)]
    text = report(recs, tmp_path / "two")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({memory_accuracy.PLOT})" in text
    table = {}
    for r in recs:
        table.setdefault(r["config"], {}).setdefault(r["task"], {})[0] = r["score"]
    series = dict(memory_accuracy.C_SERIES)["candidate L0, w lr 5e-4"]
    assert memory_accuracy.c_points(table, series, "rte") == [(0.05, 59.2), (0.10, 55.2)]
    assert memory_accuracy.c_points(table, series, "cola") == [(0.02, 28.1)]


def test_gpu_only_configurations_are_refused_before_any_work_on_a_cpu(tmp_path, monkeypatch, capsys):
    """bf16 frozen weights train on a GPU only: asked for on a CPU, `run` stops before creating anything;
    the default list leaves them out there and keeps them where there is a GPU."""
    import pytest
    import torch

    import memory_accuracy

    # derived from the library's own refusal, not listed by hand
    assert memory_accuracy.GPU_ONLY == ("lean_theta16",)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    work = tmp_path / "work"
    with pytest.raises(SystemExit):
        memory_accuracy.main(["run", "--configs", "lean", "lean_theta16", "--work-dir", str(work),
                              "--results-dir", str(tmp_path / "results")])
    assert "lean_theta16: bf16 frozen weights train on a GPU only" in capsys.readouterr().err
    assert not work.exists() and not (tmp_path / "results").exists()

    seen = []
    monkeypatch.setattr(memory_accuracy, "restore_published", lambda args: seen.append(list(args.configs)))
    monkeypatch.setattr(memory_accuracy, "write_report", lambda *a, **k: "")
    monkeypatch.setattr(memory_accuracy, "collect", lambda args: [])
    monkeypatch.setattr(memory_accuracy.glue_accuracy, "main", lambda argv: 0)
    memory_accuracy.main(["run", "--tasks", "rte", "--work-dir", str(work)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    memory_accuracy.main(["run", "--tasks", "rte", "--work-dir", str(work)])
    assert "lean_theta16" not in seen[0] and "lean" in seen[0]
    assert seen[1] == list(memory_accuracy.CONFIGS)
