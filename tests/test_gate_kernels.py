"""benchmarks/gate_kernels.py: the per-entry kernel benchmark runs end to end and records what it says."""

import importlib.util
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gate_kernels", REPO / "benchmarks" / "gate_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gate_kernels_writes_every_row_and_its_baseline_step_is_the_old_arithmetic(tmp_path):
    gk = _module()
    threads = torch.get_num_threads()
    try:
        rec = gk.main(["--entries", str(3 * gk.BLOCK + 5), "--repeats", "1", "--no-compile", "--out", str(tmp_path / "gk")])
    finally:
        torch.set_num_threads(threads)
    kernels = rec["kernels"]
    assert set(kernels) == {"gate noise", "gate expression (noise excluded)", "recomputed weight + gates' backward", "AdamW step"}
    rows = [v for section in kernels.values() for v in section.values() if isinstance(v, float)]
    assert len(rows) == 11 and all(v > 0 for v in rows)
    assert set(kernels["AdamW step"]) >= {"diffprune.optim.AdamW, fp32 matrix x 768, factored moments",
                                          "diffprune.optim.AdamW, bf16 matrix x 768, factored moments"}
    saved = json.loads((tmp_path / "gk.json").read_text())
    assert saved["kernels"] == json.loads(json.dumps(kernels)) and saved["command"].startswith("python ")
    md = (tmp_path / "gk.md").read_text()
    assert "| AdamW step | diffprune.optim.AdamW, bf16 tensor and moments |" in md

    # the baseline row times the step the library replaced: same update as diffprune.optim.AdamW's
    # up to fp32 rounding (both round back stochastically from the same random words)
    from diffprune import optim

    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter((torch.randn(4096, generator=g) + 5).bfloat16())
    a.grad = (torch.randn(4096, generator=g) * 1e-2).bfloat16()
    b = torch.nn.Parameter(a.detach().clone())
    b.grad = a.grad.clone()
    opt = optim.AdamW([a], lr=0.1, weight_decay=0.0)
    m, v = torch.zeros(4096, dtype=torch.bfloat16), torch.zeros(4096, dtype=torch.bfloat16)
    for step in (1, 2, 3):
        opt.step()
        gk._eager_bf16_step(b, m, v, step)
    assert (a.detach().float() != b.detach().float()).float().mean() < 0.01
    torch.testing.assert_close(opt.state[a]["exp_avg"].float(), m.float(), rtol=0.01, atol=1e-6)


def test_gate_kernels_runs_only_the_sections_asked_for(tmp_path):
    gk = _module()
    threads = torch.get_num_threads()
    try:
        rec = gk.main(["--entries", "3000", "--repeats", "1", "--no-compile", "--sections", "adamw",
                       "--out", str(tmp_path / "gk")])
    finally:
        torch.set_num_threads(threads)
    assert set(rec["kernels"]) == {"AdamW step"}
    assert "diffprune.optim.AdamW, fp32 matrix x 768, factored moments" in (tmp_path / "gk.md").read_text()


def test_whole_step_comparison_times_every_arm_and_reports_it(monkeypatch):
    """--step-model: full finetuning and the lean L0 stage with eager and compiled gates, in one process,
    rotating; every step timed, the ratios from the medians, and a table in the report (a tiny model here,
    whose tensors are below the compiled kernels' size: the arms run, the flag toggles)."""
    gk = _module()
    threads = torch.get_num_threads()
    toggled = []
    from diffprune.model import DiffModel

    real = DiffModel.compile_gates.fset
    monkeypatch.setattr(DiffModel, "compile_gates", property(DiffModel.compile_gates.fget,
                                                             lambda self, v: toggled.append(v) or real(self, v)))
    try:
        ab = gk.lean_steps_ab("tiny", 2, 8, 3)
    finally:
        torch.set_num_threads(threads)
    assert ab["rounds"] == 3 and all(len(t) == 3 and min(t) > 0 for t in ab["steps_s"].values())
    assert ab["ratio_to_full"]["lean, eager gates"] == ab["median_s"]["lean, eager gates"] / ab["median_s"]["full"]
    assert ab["compiled_vs_eager"] == ab["median_s"]["lean, compiled gates"] / ab["median_s"]["lean, eager gates"]
    # set up eager (train_cost's l0_lean), then one warm-up step and 3 rounds of each lean arm
    assert toggled[0] is False and toggled[1:].count(True) == 4 and toggled[1:].count(False) == 4
    md = gk.report({"kernels": {"recomputed weight + gates' backward": {"tensor": [4, 4]}}, "lean_steps": ab,
                    "repeats": 1, "threads": 1, "command": "c", "date": "d", "machine": {"cpu": "x", "cores": 2,
                    "platform": "p"}, "versions": {}})
    assert "| lean, compiled gates |" in md and "Compiled against eager gates" in md
    w16 = gk.lean_steps_ab("tiny", 2, 8, 1, w16=True)
    torch.set_num_threads(threads)
    assert set(w16["ratio_to_full"]) == {"lean, eager gates", "lean, compiled gates", "lean --w-dtype bf16, eager gates",
                                         "lean --w-dtype bf16, compiled gates"}
    fac = gk.lean_steps_ab("tiny", 2, 8, 1, factored=True)
    torch.set_num_threads(threads)
    assert set(fac["ratio_to_full"]) == {"lean, eager gates", "lean, compiled gates",
                                         "lean --moments-dtype factored, eager gates"}
    import train_cost as tc

    more = gk.lean_steps_ab("tiny", 2, 8, 2, configs=("l0", "fixed", "lora_all32", "candidates"))
    torch.set_num_threads(threads)
    titles = [tc.TITLES[c] for c in ("l0", "fixed", "lora_all32", "candidates")]
    assert list(more["median_s"]) == ["full", "lean, eager gates", "lean, compiled gates", *titles]
    assert all(len(more["steps_s"][a]) == 2 and min(more["steps_s"][a]) > 0 for a in titles)


def test_step_configs_unknown_is_refused_before_any_work():
    import pytest

    gk = _module()
    with pytest.raises(SystemExit) as exc:
        gk.main(["--step-model", "minilm", "--step-configs", "l0", "nope", "--out", "/nonexistent/gk"])
    assert exc.value.code == 2


def test_step_comparison_refuses_no_compile():
    """--step-model compares against compiled gates: with --no-compile it is refused before any work."""
    import pytest

    gk = _module()
    with pytest.raises(SystemExit) as exc:
        gk.main(["--step-model", "minilm", "--no-compile", "--out", "/nonexistent/gk"])
    assert exc.value.code == 2
