"""benchmarks/optimizer_updates.py: its comparison arithmetic on hand-made updates, and a run on a tiny random
BERT where the shadow optimisers get the reference model's gradients (bf16 moments step like Adam's, factored
ones do not) and the record says so."""

import json
import sys
from pathlib import Path

import pytest
import torch

from .helpers_cli import glue, one_thread, tiny_base  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_compare_sizes_and_direction():
    import optimizer_updates

    a = torch.tensor([1.0, -2.0, 0.0, 4.0])
    b = torch.tensor([0.25, -5.0, 7.0, 4.0])  # the third entry: the reference did not move it, so it is left out
    c = optimizer_updates._compare(a, b)
    assert c["entries"] == 3
    assert c["median_ratio"] == pytest.approx(1.0)  # ratios 0.25, 2.5, 1
    assert c["under_half"] == pytest.approx(1 / 3) and c["over_twice"] == pytest.approx(1 / 3)
    assert c["rms_ratio"] == pytest.approx(((0.25**2 + 25 + 16) / (1 + 4 + 16)) ** 0.5)
    assert c["cosine"] == pytest.approx((0.25 + 10 + 16) / (21**0.5 * (0.25**2 + 25 + 16) ** 0.5))
    flipped = optimizer_updates._compare(a, -a)
    assert flipped["cosine"] == pytest.approx(-1.0) and flipped["rms_ratio"] == pytest.approx(1.0)


def test_sums_over_steps_equal_one_comparison_of_all_entries():
    import optimizer_updates

    g = torch.Generator().manual_seed(0)
    a1, b1, a2, b2 = (torch.randn(n, generator=g) for n in (50, 50, 30, 30))
    a1[:5] = 0  # entries the reference did not move are left out
    sums = optimizer_updates._Sums(per_step=1000)
    sums.add(a1, b1, 1)
    sums.add(a2, b2, 2)
    got, want = sums.result(), optimizer_updates._compare(torch.cat([a1, a2]), torch.cat([b1, b2]))
    assert got["entries"] == want["entries"] == 75 and got["sampled_ratios"] == 75
    for key in ("cosine", "rms_ratio", "median_ratio", "under_half", "over_twice"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    # past `per_step` entries a step, the ratios are sampled; the sums still cover every entry
    few = optimizer_updates._Sums(per_step=10).add(a1, b1, 1).result()
    assert few["sampled_ratios"] == 10 and few["entries"] == 45
    assert few["rms_ratio"] == pytest.approx(optimizer_updates._compare(a1, b1)["rms_ratio"], rel=1e-12)


def test_run_on_a_tiny_model(tmp_path, tiny_base, glue):
    import optimizer_updates

    out = tmp_path / "results"
    assert optimizer_updates.main(["--task", "rte", "--data-dir", str(glue), "--model", str(tiny_base), "--steps", "4",
                                   "--batch", "4", "--seq-len", "32", "--results-dir", str(out)]) == 0
    rec = json.loads((out / "optimizer_updates.json").read_text())
    assert [r["step"] for r in rec["per_step"]] == [1, 2, 3, 4]
    assert set(rec["overall"]) == {"bf16:w", "factored:w", "factored:alpha"}
    # the tiny BERT's encoder and pooler: 2 layers x 6 matrices + the pooler's
    assert rec["matrices"] == 13
    # Adam's first step moves every entry with a gradient by about lr (g / (|g| + eps))
    assert 0.5 < rec["per_step"][0]["reference_w_rms_over_lr"] <= 1.0 + 1e-6
    # bf16 moments: the same steps up to their rounding; were the shadow not given the gradients, it would not move
    bf16 = rec["overall"]["bf16:w"]
    assert bf16["rms_ratio"] == pytest.approx(1.0, abs=0.02) and bf16["cosine"] > 0.999
    assert bf16["entries"] > 0
    # factored second moments: other steps, entry by entry
    assert rec["overall"]["factored:w"]["cosine"] < 0.99
    text = (out / "optimizer_updates.md").read_text()
    assert "| factored | w |" in text and "| bf16 | w |" in text
