"""benchmarks/pareto.py end to end on a tiny random BERT and 32 RTE examples: the learning-rate search,
one first stage per learning rate feeding every budget, every stored form scored, the report and plot."""

import json
import sys
from pathlib import Path

import pytest

from .helpers_cli import glue, one_thread, tiny_base  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_pareto_grid_on_a_tiny_model(tmp_path, tiny_base, glue):
    import pareto

    work, results = tmp_path / "work", tmp_path / "results"
    rc = pareto.main(["--tasks", "rte", "--methods", "structured", "lora", "bitfit", "--model", str(tiny_base),
                      "--data-dir", str(glue), "--train-samples", "32", "--epochs", "1", "--no-progress",
                      "--no-extra-seeds", "--work-dir", str(work), "--results-dir", str(results)])
    assert rc == 0
    records = json.loads((results / "pareto.json").read_text())["records"]
    by = {(r["method"], r["size"], r["lr"], pareto.fixmask_lr_of(r), r["value_dtype"]): r for r in records}
    flr0 = pareto.COMMON["fixmask_lr"]

    def fp32(method, size, lr, flr=None):
        return by[(method, size, lr, flr, "fp32")]["score"]

    # the first-stage search: both learning rates at the reference budget (common fixed-mask lr); every budget
    # then from the better one only, at both fixed-mask rates; LoRA every lr at every rank; BitFit both
    ref = pareto.REFERENCE["structured"]
    first = {lr: fp32("structured", ref, lr, flr0) for lr in pareto.LRS["structured"]}
    lr_s = max(sorted(first), key=lambda lr: first[lr])
    tried = {(k[1], k[2], k[3]) for k in by if k[0] == "structured" and k[4] == "fp32"}
    assert tried == {(ref, lr, flr0) for lr in pareto.LRS["structured"]} | {
        (size, lr_s, f) for size in pareto.BUDGETS for f in pareto.FIXMASK_LRS}
    assert {(k[1], k[2]) for k in by if k[0] == "lora" and k[4] == "fp32"} == {
        (r, lr) for r in pareto.SIZES["lora"] for lr in pareto.LRS["lora"]}
    assert {k[2] for k in by if k[0] == "bitfit"} == set(pareto.LRS["bitfit"])
    # each point of the curve is its own better rate, every stored form of that run
    runs = pareto.chosen_runs(records)
    for size in pareto.BUDGETS:
        scores = {f: fp32("structured", size, lr_s, f) for f in pareto.FIXMASK_LRS}
        best = max(sorted(scores), key=lambda f: scores[f])
        assert runs[("structured", size, "rte")] == by[("structured", size, lr_s, best, "fp32")]["run"]
        for dtype in pareto.VALUE_DTYPES["structured"]:
            assert ("structured", size, lr_s, best, dtype) in by
    for r in pareto.SIZES["lora"]:
        scores = {lr: fp32("lora", r, lr) for lr in pareto.LRS["lora"]}
        assert runs[("lora", r, "rte")] == by[("lora", r, max(sorted(scores), key=lambda lr: scores[lr]), None, "fp32")]["run"]
    curve = {(row["method"], row["size"], row["value_dtype"]): row for row in
             json.loads((results / "pareto.json").read_text())["curve"]}
    assert curve[("structured", 0.001, "int8")]["tasks"]["rte"] == by[
        (*next(k for k, v in by.items() if v["run"] == runs[("structured", 0.001, "rte")])[:4], "int8")]["score"]
    # one first stage per learning rate, stopped after L0, and every budget forked from it
    l0_dirs = sorted(p.name for p in work.glob("rte-structured-l0-*"))
    assert l0_dirs == [f"rte-structured-l0-lr{lr:g}-s0" for lr in sorted(pareto.LRS["structured"])]
    for size in pareto.BUDGETS:
        for f in pareto.FIXMASK_LRS:
            r = by[("structured", size, lr_s, f, "fp32")]
            assert r["settings"]["from_l0"] == str(work / f"rte-structured-l0-lr{lr_s:g}-s0")
            assert r["settings"]["fixmask_lr"] == f and r["run"].endswith("-s0")
            assert r["nnz"] == round(size * json.loads((work / r["run"] / "metrics.json").read_text())["n_diffed"])
            # smaller stored forms; int8 below bf16 below fp32 on the same diff
            assert by[("structured", size, lr_s, f, "int8")]["stored_bytes"] < by[("structured", size, lr_s, f, "bf16")][
                "stored_bytes"] < r["stored_bytes"]
    lora = by[("lora", 8, pareto.LRS["lora"][0], None, "bf16")]
    assert lora["stored_bytes"] < by[("lora", 8, lora["lr"], None, "fp32")]["stored_bytes"]
    # a re-scored form is what `diffprune eval` says about that directory
    form = work / f"{lora['run']}@bf16"
    assert pareto.evaluate(form, type("A", (), {"data_dir": str(glue)}))["score"] == pytest.approx(lora["score"])
    text = (results / "pareto.md").read_text()
    assert "Tasks with every point: rte" in text and "## Learning-rate search" in text
    assert "## Learning-rate choice per point" in text and "| structured diff pruning | 0.1% | " in text
    # bits per nonzero of every stored diff, as `SparseDiff.summary` reads the file
    from diffprune.diff_file import SparseDiff
    r = by[("structured", 0.001, lr_s, pareto.FIXMASK_LRS[1], "int8")]
    summary = SparseDiff.load(work / f"{r['run']}@int8").summary()
    assert r["bits"]["bits_per_nonzero"] == summary["bits_per_nonzero"] < by[
        ("structured", 0.001, lr_s, pareto.FIXMASK_LRS[1], "fp32")]["bits"]["bits_per_nonzero"]
    assert "lora" not in {x["method"] for x in records if "bits" in x} and "## Bits per nonzero" in text
    assert "| LoRA (q,v) | r=8 | bf16 |" in text and "Structured against LoRA" in text
    assert (results / "pareto.png").stat().st_size > 10_000
    # finished points are not trained again; another protocol in the same work dir is refused
    assert pareto.main(["--tasks", "rte", "--methods", "lora", "--model", str(tiny_base), "--data-dir", str(glue),
                        "--train-samples", "32", "--epochs", "1", "--no-progress", "--no-extra-seeds",
                        "--work-dir", str(work), "--results-dir", str(results)]) == 0
    with pytest.raises(SystemExit, match="use another --work-dir"):
        pareto.main(["--tasks", "rte", "--methods", "lora", "--model", str(tiny_base), "--data-dir", str(glue),
                     "--train-samples", "16", "--epochs", "1", "--no-progress", "--no-extra-seeds",
                     "--work-dir", str(work), "--results-dir", str(results)])
    # a fresh checkout (its work dir gone) resumes from the published records, only those of its protocol
    before = (results / "pareto.md").read_text()
    fresh = tmp_path / "fresh"
    assert pareto.main(["--tasks", "rte", "--methods", "structured", "lora", "bitfit", "--model", str(tiny_base),
                        "--data-dir", str(glue), "--train-samples", "32", "--epochs", "1", "--no-extra-seeds",
                        "--report-only", "--work-dir", str(fresh), "--results-dir", str(results)]) == 0
    assert (results / "pareto.md").read_text() == before
    assert sorted(p.parent.name for p in fresh.glob("*/pareto_records.json")) == sorted({r["run"] for r in records})
    other = dict(results_dir=str(results), work_dir=str(tmp_path / "other"), tasks=["rte"], model=str(tiny_base),
                 sst2_train_samples=None)
    assert pareto.restore_published(type("A", (), {**other, "train_samples": 16, "epochs": 1})) == 0
    assert pareto.restore_published(type("A", (), {**other, "train_samples": 32, "epochs": 2})) == 0
    assert pareto.restore_published(type("A", (), {**other, "train_samples": 32, "epochs": 1})) == len(
        {r["run"] for r in records})


def test_restore_trains_again_the_diffs_stored_in_an_older_file_format(tmp_path):
    """Published records restore a fresh work dir, except the diff methods' records whose bytes are an older
    diff file format's (records from before v3 carry no file_format): those points are trained again."""
    import pareto

    def record(method, run, fmt):
        r = {"task": "rte", "method": method, "run": run, "model": pareto.PACKAGED_MODEL, "train_samples": 32,
             "settings": {"epochs": 1}}
        return {**r, "file_format": fmt} if fmt else r

    results = tmp_path / "results"
    results.mkdir()
    (results / "pareto.json").write_text(json.dumps({"records": [
        record("structured", "rte-structured-0.005-lr0.0001-s0", None),                       # v2 era
        record("bitfit", "rte-bitfit-lr0.001-s0", "diffprune diff v2"),
        record("magnitude", "rte-magnitude-0.005-lr5e-05-s0", pareto.current_diff_format()),
        record("lora", "rte-lora-r8-lr0.001-s0", None),                                        # not a diff file
    ]}))
    args = type("A", (), {"results_dir": str(results), "work_dir": str(tmp_path / "work"), "tasks": ["rte"],
                          "model": None, "train_samples": 32, "sst2_train_samples": None, "epochs": 1})
    assert pareto.restore_published(args) == 2
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["rte-lora-r8-lr0.001-s0",
                                                                     "rte-magnitude-0.005-lr5e-05-s0"]
