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


def test_input_axes_of_linear_conv1d_and_tied_weights():
    import candidate_overlap
    import torch

    from diffprune import DiffModel, DiffPruningConfig

    from .tiny_models import tiny_bert, tiny_causal

    bert = DiffModel(tiny_bert(), DiffPruningConfig(candidates=0.1))
    axes = candidate_overlap.input_axes(bert)
    linears = {f"{n}.weight" for n, m in bert.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(axes) == linears & set(bert.diff_names) and set(axes.values()) == {1}  # not embeddings, norms, biases
    assert "classifier.weight" not in bert.diff_names  # (the new head trains whole, undiffed)
    gpt2 = DiffModel(tiny_causal("gpt2"), DiffPruningConfig(candidates=0.1))
    axes = candidate_overlap.input_axes(gpt2)
    conv = {f"{n}.weight" for n, m in gpt2.model.named_modules() if type(m).__name__ == "Conv1D"}
    assert conv and {axes[n] for n in conv} == {0}  # Conv1D stores (in, out)
    # the token embedding is tied to the LM head, an nn.Linear reading the hidden state: diffed once, axis 1
    assert axes["transformer.wte.weight"] == 1 and "transformer.wpe.weight" not in axes


def test_per_input_ranking_spreads_an_outlier_input():
    import candidate_overlap
    import torch

    # |dL/dW[i, j]| ~ |dy_i| |x_j|: input 0 carries 100x the others' activation
    g = torch.Generator().manual_seed(2)
    col = torch.ones(12)
    col[0] = 100.0
    a = torch.rand(30, 12, generator=g) * col
    by_grad = candidate_overlap.top({"w": a}, 0.05)["w"]
    assert by_grad.any(dim=0).nonzero().squeeze(1).tolist() == [0]
    for rms in (False, True):
        s = candidate_overlap._per_input(a, 1, rms)
        ref = a.double() / (a.double().square().mean(0).sqrt() if rms else a.double().mean(0))
        ref = ref * (a.double().square().mean().sqrt() if rms else a.double().mean())
        torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=0)
        assert int(candidate_overlap.top({"w": s}, 0.05)["w"].any(dim=0).sum()) >= 4
        torch.testing.assert_close(candidate_overlap._per_input(a.t(), 0, rms), s.t())  # Conv1D layout
    assert candidate_overlap._per_input(a, None, False) is a
