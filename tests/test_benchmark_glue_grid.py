"""benchmarks/glue_accuracy.py as one grid: records of other runs join it only when made with the grid's own
settings (`--import-records`), and a fresh work dir restores the published grid instead of training it."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _record(task: str, method: str, seed: int, score: float, settings: dict, train_samples=None) -> dict:
    return {"task": task, "method": method, "seed": seed, "score": score, "metrics": {"accuracy": score / 100},
            "stages": {"final": score}, "stored_bytes": 1000, "nnz": 10, "trainable_parameters": 20,
            "train_seconds": 1.0, "train_samples": train_samples, "settings": settings, "target_sparsity": 0.005,
            "model": "m", "command": "python x", "versions": {}, "machine": {"cpu": "c"}, "date": "2026-11-23 12:00 UTC"}


def test_import_records_keeps_one_protocol(tmp_path):
    import glue_accuracy as ga

    today = ga.settings_for("structured", {})
    old = {**today, "lr": 5e-4}
    del old["group_penalty"]
    other = tmp_path / "study.json"
    other.write_text(json.dumps([
        _record("rte", "structured", 0, 55.0, today),
        _record("rte", "structured", 1, 57.0, today),
        _record("mrpc", "structured", 0, 80.0, old),                      # another setting: left out
        _record("mrpc", "full", 0, 83.0, ga.settings_for("full", {})),
        _record("sst2", "full", 0, 85.0, ga.settings_for("full", {})),     # all of SST-2, not the grid's 8k
    ]))
    results = tmp_path / "results"
    argv = ["--report-only", "--seeds", "0", "1", "--results-dir", str(results)]
    assert ga.main([*argv, "--work-dir", str(tmp_path / "w1"), "--import-records", str(other)]) == 0
    published = json.loads((results / "glue_accuracy.json").read_text())
    assert sorted((r["task"], r["method"], r["seed"]) for r in published) == [
        ("mrpc", "full", 0), ("rte", "structured", 0), ("rte", "structured", 1)]
    assert {r["imported_from"] for r in published} == {os.path.relpath(other.resolve(), ga.REPO)}
    text = (results / "glue_accuracy.md").read_text()
    assert "| structured diff pruning 0.5% | 56.0 ± 1.4 (n=2) |" in text and "brought in with `--import-records`" in text

    # a fresh checkout's empty work dir: the published grid comes back as it was, nothing trained
    assert ga.main([*argv, "--work-dir", str(tmp_path / "w2")]) == 0
    assert json.loads((results / "glue_accuracy.json").read_text()) == published
