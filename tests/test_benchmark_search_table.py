"""benchmarks/glue_search_table.py groups runs by their recorded settings and tunes per task."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ["rte", "mrpc"]


def _rec(task, method, score, seed=0, gpu=None, date="d", stored_bytes=None, **settings):
    machine = {"cpu": "x"} | ({"gpu": gpu} if gpu else {})
    base = {"batch_size": 16, "max_seq_length": 128, "epochs": 3}
    return {"task": task, "method": method, "seed": seed, "score": score, "machine": machine, "date": date,
            "settings": base | settings, "stored_bytes": stored_bytes}


def _run(tmp_path, *files, extra=()):
    paths = []
    for i, records in enumerate(files):
        paths.append(tmp_path / f"in{i}.json")
        paths[-1].write_text(json.dumps(records))
    out = tmp_path / "res" / "search"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "glue_search_table.py"), "--out", str(out),
                          *map(str, paths), "--tasks", *TASKS, *extra], capture_output=True, text=True)
    return res, out


def test_tuned_row_takes_the_best_lr_per_task_for_each_method(tmp_path):
    grid = [_rec("rte", "full", 56.0, gpu="H100", lr=5e-5), _rec("mrpc", "full", 83.0, gpu="H100", lr=5e-5),
            # an old structured run: no group_penalty recorded, so it had the value of its time (expected_l0)
            _rec("rte", "structured", 49.0, gpu="H100", lr=5e-4, alpha_lr=0.1, l0_lambda=1.25e-7,
                 fixmask_epochs=3, fixmask_lr=5e-4),
            _rec("rte", "full", 99.0, seed=1, lr=5e-5)]  # another seed: not in the seed-0 table
    study = [_rec("rte", "full", 58.0, lr=1e-4), _rec("mrpc", "full", 81.0, lr=1e-4)]
    per_gate = dict(alpha_lr=0.1, l0_lambda=1.25e-7, fixmask_epochs=3, fixmask_lr=5e-4, group_penalty="per_gate")
    study += [_rec("rte", "structured", 53.0, lr=5e-4, **per_gate), _rec("mrpc", "structured", 76.0, lr=5e-4, **per_gate),
              _rec("rte", "structured", 51.0, lr=1e-4, **per_gate), _rec("mrpc", "structured", 82.0, lr=1e-4, **per_gate)]
    res, out = _run(tmp_path, grid, study)
    assert res.returncode == 0, res.stderr
    rows = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    full_tuned = rows["full finetuning, best lr per task of {5e-5, 1e-4}"]
    assert full_tuned["scores"] == {"rte": 58.0, "mrpc": 83.0} and full_tuned["chosen"] == {"rte": "1e-4", "mrpc": "5e-5"}
    assert full_tuned["average"] == 70.5 and full_tuned["devices"] == ["CPU", "H100"]
    st = rows["structured diff pruning 0.5%, best lr per task of {1e-4, 5e-4}"]
    assert st["scores"] == {"rte": 53.0, "mrpc": 82.0} and st["average"] == 67.5
    # the expected_l0 run is its own config with one lr: a row without an average, no tuned row
    old = rows["structured diff pruning 0.5% (group_penalty=expected_l0, lr=5e-4)"]
    assert old["scores"] == {"rte": 49.0} and old["average"] is None and old["settings"]["group_penalty"] == "expected_l0"
    assert rows["full finetuning (lr=5e-5)"]["scores"]["rte"] == 56.0  # seed 1's 99.0 left out
    md = out.with_suffix(".md").read_text()
    assert "| *tuned:* full finetuning, best lr per task of {5e-5, 1e-4} | 58.0 (1e-4) | 83.0 (5e-5) | **70.5** | — | CPU, H100 |" in md
    assert "glue_search_table.py" in md


def test_bytes_per_task_follow_the_runs_a_row_holds(tmp_path):
    runs = [_rec("rte", "lora", 54.0, lr=1e-3, stored_bytes=300_000), _rec("mrpc", "lora", 82.0, lr=1e-3, stored_bytes=302_000),
            _rec("rte", "lora", 56.0, lr=5e-4, stored_bytes=300_000), _rec("mrpc", "lora", 81.0, lr=5e-4, stored_bytes=302_000),
            _rec("rte", "lora", 57.0, lr=1e-3, lora_r=20, stored_bytes=740_000),
            _rec("mrpc", "lora", 84.0, lr=1e-3, lora_r=20, stored_bytes=742_000)]
    res, out = _run(tmp_path, runs, extra=("--axis", "lora_r", "--methods", "lora"))
    assert res.returncode == 0, res.stderr
    rows = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    tuned = rows["LoRA (q,v) + head, best lora_r per task of {8, 20}"]
    assert tuned["chosen"] == {"rte": "20", "mrpc": "20"} and tuned["stored_bytes"] == {"rte": 740_000, "mrpc": 742_000}
    md = out.with_suffix(".md").read_text()
    assert "| LoRA (q,v) + head (lora_r=20) | 57.0 | 84.0 | 70.5 | 741 kB | CPU |" in md
    assert "| LoRA (q,v) + head (lora_r=8, lr=5e-4) | 56.0 | 81.0 | 68.5 | 301 kB | CPU |" in md


def test_a_rerun_in_a_second_file_is_named_not_averaged(tmp_path):
    first = [_rec("rte", "full", 56.0, lr=5e-5, date="a")]
    second = [_rec("rte", "full", 60.0, lr=5e-5, date="b"), _rec("rte", "full", 56.0, lr=5e-5, date="a")]
    res, out = _run(tmp_path, first, second)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["scores"] == {"rte": 56.0}
    assert res.stderr.count("another rte seed-0 run") == 1 and "(score 60.0)" in res.stderr


def test_several_seeds_give_mean_and_spread_per_cell_and_no_tuned_rows(tmp_path):
    per_gate = dict(alpha_lr=0.1, l0_lambda=1.25e-7, fixmask_epochs=3, fixmask_lr=5e-4, group_penalty="per_gate")
    runs = [_rec("rte", "full", score, seed=seed, lr=1e-4) for seed, score in ((0, 54.0), (1, 58.0), (2, 59.0))]
    runs += [_rec("mrpc", "full", 83.0, seed=0, lr=1e-4), _rec("mrpc", "full", 99.0, seed=3, lr=1e-4)]  # seed 3 not asked
    runs += [_rec("rte", "full", 60.0, seed=1, lr=5e-5)]
    runs += [_rec(t, "structured", score, seed=seed, lr=1e-4, **per_gate)
             for t, seed, score in (("rte", 0, 55.0), ("rte", 1, 57.0), ("mrpc", 0, 84.0), ("mrpc", 1, 82.0))]
    res, out = _run(tmp_path, runs, extra=("--seeds", "0", "1", "2"))
    assert res.returncode == 0, res.stderr
    rows = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert all(r["kind"] == "setting" for r in rows.values())  # no tuned rows over unequal seed counts
    full = rows["full finetuning (lr=1e-4)"]
    assert full["seed_scores"] == {"rte": {"0": 54.0, "1": 58.0, "2": 59.0}, "mrpc": {"0": 83.0}}
    assert full["scores"] == {"rte": 57.0, "mrpc": 83.0} and full["average"] == 70.0
    assert abs(full["std"]["rte"] - 7 ** 0.5) < 1e-12 and "mrpc" not in full["std"]
    st = rows["structured diff pruning 0.5% (lr=1e-4)"]
    assert st["scores"] == {"rte": 56.0, "mrpc": 83.0} and st["average"] == 69.5
    md = out.with_suffix(".md").read_text()
    assert "# GLUE over seeds" in md
    assert "| full finetuning (lr=1e-4) | 57.0 ± 2.6 (n=3) | 83.0 | 70.0 | — | CPU |" in md
    assert "| full finetuning (lr=1e-4) | rte | 54.0 | 58.0 | 59.0 |" in md
    assert "| structured diff pruning 0.5% (lr=1e-4) | mrpc | 84.0 | 82.0 | — |" in md


def test_missing_input_is_refused(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "glue_search_table.py"), "--out", str(tmp_path / "o"),
                          str(tmp_path / "nope.json")], capture_output=True, text=True)
    assert res.returncode != 0 and "no such results file" in res.stderr and not (tmp_path / "o.md").exists()
