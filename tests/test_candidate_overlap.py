"""benchmarks/candidate_overlap.py end to end on a tiny random BERT: the library's own warm-up, stopped after
it, its float32 sums ranking the same entries as the library's bf16 pick, coverage and mask overlaps."""

import json
import sys
from pathlib import Path

from diffprune.diff_file import SparseDiff
from diffprune.training import TrainConfig, train

from .helpers_cli import glue, one_thread, tiny_base  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_candidate_overlap_on_a_tiny_model(tmp_path, tiny_base, glue):
    import candidate_overlap

    run = tmp_path / "dense"
    train(TrainConfig(output_dir=str(run), task="rte", data_dir=str(glue), model=str(tiny_base), method="structured",
                      target_sparsity=0.02, max_train_samples=48, max_eval_samples=16, epochs=1, fixmask_epochs=1,
                      batch_size=16, max_seq_length=32, progress=False, save_steps=0))
    results = tmp_path / "results"
    assert candidate_overlap.main(["--task", "rte", "--data-dir", str(glue), "--model", str(tiny_base),
                                   "--fraction", "0.1", "--warmup-steps", "3", "--masks", f"dense={run}",
                                   "--pairs", f"rte:a={run},b={run}", "--results-dir", str(results)]) == 0
    record = json.loads((results / "candidate_overlap.json").read_text())
    diff = SparseDiff.load(run)
    assert record["entries"] == diff.n_diffed
    rows = {r["ranking"]: r for r in record["rankings"]}
    assert set(rows) == set(candidate_overlap.RANKINGS)
    # the float32 sum of |g| picks what the library's stochastically rounded bf16 sum picked
    assert rows["grad"]["same_as_library"] > 0.95
    for r in rows.values():
        assert r["candidates"] >= round(0.1 * diff.n_diffed) and 0 <= r["coverage"]["dense"] <= 1
    # shares per parameter group sum to one; a mask shares all of itself
    for where in [*record["where"].values(), *record["by_layer"].values()]:
        assert abs(sum(where.values()) - 1) < 1e-6
    assert set(record["by_layer"]["mask:dense"]) <= {"0", "1", "no layer"}  # the tiny BERT has 2 layers
    # every Linear weight of the encoder and pooler has an input axis; the dense mask's reach is a share
    reach = record["input_reach"]
    assert 0 < reach["mask:dense"]["weights"] <= 13 and reach["grad"]["weights"] <= 13
    for r in reach.values():
        assert 0 <= r["inputs_touched"] <= 1 and 0 <= r["in_top_10pct_inputs"] <= 1
    # a random 10% of a (16, 16) or (32, 16) matrix reaches most of its inputs
    assert reach["random"]["inputs_touched"] > 0.5
    assert record["pairs"][0]["shared"] == 1.0
    assert "| rte | a | b | 100.0% |" in (results / "candidate_overlap.md").read_text()
