"""benchmarks/plot_l0_trajectory.py reads real train_log.jsonl records and draws them."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _write_log(run_dir: Path, records) -> None:
    run_dir.mkdir()
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_reads_density_and_scores_of_both_stages(tmp_path):
    _write_log(tmp_path / "structured", [
        {"event": "start", "settings": {"epochs": 2}},
        {"step": 10, "phase": "l0", "epoch": 0.5, "loss": 1.0, "density": 0.9},
        {"step": 20, "phase": "l0", "epoch": 1.0, "loss": 0.9, "density": 0.2},
        {"event": "eval", "phase": "l0", "epoch": 1, "score": 10.0, "density": 0.2},
        {"step": 40, "phase": "l0", "epoch": 2.0, "loss": 0.8, "density": 0.0125},
        {"event": "eval", "phase": "l0", "epoch": 2, "score": 20.0, "density": 0.0125},
        {"step": 50, "phase": "fixed", "epoch": 0.5, "loss": 0.5, "density": 0.005},
        {"event": "eval", "phase": "fixed", "epoch": 1, "score": 25.0, "density": 0.005},
    ])
    _write_log(tmp_path / "full", [
        {"event": "start", "settings": {"epochs": 2}},
        {"event": "eval", "phase": "train", "epoch": 1, "score": 30.0},
    ])
    out = tmp_path / "fig" / "trajectory.png"
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "plot_l0_trajectory.py"), "--out", str(out), "--title", "T",
         f"gates={tmp_path / 'structured'}", f"full={tmp_path / 'full'}"],
        capture_output=True, text=True, check=True,
    )
    # the fixed-mask stage continues after the L0 stage's 2 epochs; fixed-stage density is not L0 density
    assert "gates: density at L0 end 1.2500%; scores by epoch 1: 10.0, 2: 20.0, 3: 25.0" in res.stdout
    assert "full: no gates; scores by epoch 1: 30.0" in res.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.with_suffix(".json").read_text())
    gates, full = data["runs"]
    assert gates["l0_density"][-1] == {"step": 40, "epoch": 2.0, "density": 0.0125}
    assert [p["score"] for p in gates["scores"]] == [10.0, 20.0, 25.0]
    assert full["l0_density"] == [] and full["scores"] == [{"epoch": 1, "score": 30.0}]
    assert "plot_l0_trajectory.py" in data["command"] and data["date"]


def test_plot_refuses_a_run_without_validation_records(tmp_path):
    _write_log(tmp_path / "empty", [{"event": "start", "settings": {"epochs": 1}}])
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "plot_l0_trajectory.py"), "--out", str(tmp_path / "x.png"),
         f"x={tmp_path / 'empty'}"], capture_output=True, text=True,
    )
    assert res.returncode != 0 and "no validation records" in res.stderr
