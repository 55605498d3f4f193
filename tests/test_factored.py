"""`--moments-dtype factored`: Adam with Adafactor's factored second moment (`diffprune.factored`), stepped by
`diffprune.optim.AdamW` for the groups that ask for it, resumable, inside backward, and in `diffprune train`."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from diffprune import DiffModel, DiffPruningConfig, SparseDiff, blocks
from diffprune.errors import ConfigError
from diffprune.lean import OptimizerInBackward
from diffprune.methods import get_method
from diffprune.optim import AdamW
from diffprune.training import TrainConfig, train

from .helpers_cli import assert_same_diff, glue, interrupt_after_checkpoints, tiny_base  # noqa: F401
from .tiny_models import bert_batch, tiny_bert


def _reference(p0, grads, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.0):
    """The update written out on whole tensors in float64: Adam, with the second moment of Shazeer & Stern
    2018 (Algorithm 4) and its update clipping; no row blocks, no bf16 first moment."""
    b1, b2 = betas
    p, _reference.clipped = p0.double().clone(), 0
    rows, cols = p.numel() // p.shape[-1], p.shape[-1]
    R, C, m = torch.zeros(rows, dtype=torch.float64), torch.zeros(cols, dtype=torch.float64), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double().reshape(rows, cols)
        R = b2 * R + (1 - b2) * ((g ** 2).mean(1) + 1e-30)
        C = b2 * C + (1 - b2) * ((g ** 2).mean(0) + 1e-30)
        v = torch.outer(R, C) / R.mean() / (1 - b2 ** t)
        m = b1 * m + (1 - b1) * g.reshape(p.shape)
        u = m / (1 - b1 ** t) / (v.sqrt().reshape(p.shape) + eps)
        _reference.clipped += math.sqrt((u ** 2).mean()) > 1
        u = u / max(1.0, math.sqrt((u ** 2).mean()))
        p = p * (1 - lr * wd) - lr * u
    return p


def _run(p0, grads, group=None, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = AdamW([{"params": [p], "state_dtype": "factored", **(group or {})}], **kw)
    for g in grads:
        p.grad = g.clone().to(p.dtype)
        opt.step()
    return p, opt


@pytest.mark.parametrize("block", [2**17, 40])  # one block; row blocks of 40 // 12 = 3 rows, the last ragged
@pytest.mark.parametrize("first_moment", ["fp32", "bf16"])
def test_the_step_equals_the_update_written_out_on_whole_tensors(monkeypatch, block, first_moment):
    from diffprune import factored

    monkeypatch.setattr(blocks, "CPU_BLOCK", block)
    if first_moment == "fp32":  # the arithmetic alone, without the bf16 first moment's rounding
        init = factored.init_state
        monkeypatch.setattr(factored, "init_state", lambda p: {**init(p), "exp_avg": torch.zeros_like(p)})
    torch.manual_seed(0)
    p0 = torch.randn(2, 13, 12) * 0.1  # three dimensions: factored as 26 x 12
    grads = [torch.randn(2, 13, 12) * torch.rand(2, 13, 1) * 3 for _ in range(5)]
    grads[3][0, 4, 7] = 200.0  # an outlier: the factored estimate is far below its g**2, the update is clipped
    got, opt = _run(p0, grads, lr=1e-2, weight_decay=0.1)
    ref = _reference(p0, grads, lr=1e-2, wd=0.1)
    assert _reference.clipped >= 1  # (from the outlier's step on)
    moved = (ref - p0.double()).abs().max()
    assert moved > 5e-2
    err = (got.detach().double() - ref).abs().max()
    assert err < (1e-6 if first_moment == "fp32" else 2**-7 * moved)  # bf16: within its rounding (2**-9 a step)
    st = opt.state[got]
    assert st["exp_avg"].dtype == getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[first_moment])
    assert st["exp_avg"].shape == got.shape
    assert st["exp_avg_sq_row"].shape == (26,) and st["exp_avg_sq_col"].shape == (12,)
    assert st["exp_avg_sq_row"].dtype == st["exp_avg_sq_col"].dtype == torch.float32 and "exp_avg_sq" not in st


def test_a_rank_one_squared_gradient_steps_as_adam():
    """Where g**2 is an outer product the factored estimate is exact: the steps are AdamW's."""
    torch.manual_seed(1)
    a, b = torch.rand(30) + 0.1, torch.rand(20) + 0.1
    signs = torch.randint(0, 2, (30, 20)) * 2 - 1
    grads = [torch.outer(a, b) * signs * s for s in (1.0, 0.5, 2.0, 1.0)]  # (update RMS stays <= 1)
    p0 = torch.randn(30, 20)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
    got, _ = _run(p0, grads, lr=1e-3, weight_decay=0.0)
    torch.testing.assert_close(got.detach() - p0, ref.detach() - p0, rtol=5e-3, atol=1e-6)


def test_bf16_parameters_round_stochastically_and_vectors_keep_bf16_moments():
    torch.manual_seed(2)
    p0 = torch.full((64, 32), 5.0)
    grads = [torch.randn(64, 32) * 1e-2 + 2e-2 for _ in range(40)]
    ref = _reference(p0, grads, lr=1e-3)  # 1e-3 a step: a 32nd of bf16's spacing at 5 (2**-5)
    got, opt = _run(p0.bfloat16(), grads, lr=1e-3, weight_decay=0.0)
    again, _ = _run(p0.bfloat16(), grads, lr=1e-3, weight_decay=0.0)
    assert torch.equal(got, again)  # deterministic: the bits are keyed by (seed, step, tensor)
    moved, want = (got.detach().double() - 5.0).mean(), (ref - 5.0).mean()
    assert want < -0.03 and abs(moved - want) < 0.1 * abs(want)  # round-to-nearest would have stayed at 5.0
    vec = torch.nn.Parameter(torch.zeros(10))
    o = AdamW([{"params": [vec], "state_dtype": "factored"}], lr=1e-2, weight_decay=0.0)
    vec.grad = torch.ones(10)
    o.step()
    assert o.state[vec]["exp_avg_sq"].dtype == torch.bfloat16  # nothing to factor: bf16 moments
    torch.testing.assert_close(vec.detach(), torch.full((10,), -1e-2))


def test_state_dict_round_trip_and_in_backward_continue_bit_for_bit():
    torch.manual_seed(3)
    a = DiffModel(tiny_bert(), DiffPruningConfig(l0_lambda=1e-3, structured=True, alpha_dtype="bf16")).train()
    b, c = copy.deepcopy(a), copy.deepcopy(a)

    def groups(dm):
        gs = dm.param_groups(lr=1e-2, alpha_lr=0.1, fused=False)
        for g in gs[:2]:
            g["state_dtype"] = "factored"
        return gs

    def steps(dm, opt, seeds):
        for s in seeds:
            torch.manual_seed(7)
            dm(**bert_batch(dm.model, seed=s)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    opt_a = AdamW(groups(a), weight_decay=0.0)
    steps(a, opt_a, range(3))
    opt_b = AdamW(groups(b), weight_decay=0.0)
    steps(b, opt_b, range(2))
    state = copy.deepcopy(opt_b.state_dict())
    opt_b = AdamW(groups(b), weight_decay=0.0)
    opt_b.load_state_dict(state)
    sums = [st for st in opt_b.state.values() if "exp_avg_sq_row" in st]
    assert sums and all(st["exp_avg_sq_row"].dtype == torch.float32 for st in sums)  # not cast to bf16 alpha's
    steps(b, opt_b, [2])
    steps(c, OptimizerInBackward(groups(c), max_grad_norm=None, weight_decay=0.0), range(3))
    factored = [p for p, st in opt_a.state.items() if "exp_avg_sq_row" in st]
    assert any(p.dtype == torch.bfloat16 for p in factored) and any(p.dtype == torch.float32 for p in factored)
    ref = {n: p.detach() for n, p in a.named_parameters() if p.requires_grad}
    for other, what in ((b, "resumed"), (c, "in backward")):
        got = {n: p.detach() for n, p in other.named_parameters() if p.requires_grad}
        for n in ref:
            assert torch.equal(got[n], ref[n]), f"{n} ({what})"


def test_the_state_estimate_and_the_settings_that_cannot_work():
    m = get_method("structured")
    # w (4) and its bf16 first moment (2), alpha (2) and its first moment (2): the factored sums are rows + columns
    assert m.state_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean", moments_dtype="factored")) == 10
    assert m.state_bytes_per_parameter(TrainConfig(output_dir="x", moments_dtype="factored")) == 4 + 4 + 2 + 4 + 4 + 2 + 4
    with pytest.raises(ConfigError, match="use --moments-dtype bf16 with --candidates"):
        TrainConfig(output_dir="x", task="rte", memory="lean", moments_dtype="factored", candidates=0.05).validate()
    with pytest.raises(ConfigError, match="--fsdp with --moments-dtype factored"):
        TrainConfig(output_dir="x", task="rte", moments_dtype="factored", fsdp=True).validate()
    with pytest.raises(ConfigError, match="not one of fp32, bf16, factored"):
        TrainConfig(output_dir="x", task="rte", moments_dtype="fp16").validate()


def test_train_with_factored_moments_end_to_end_and_resume(tmp_path, tiny_base, glue, monkeypatch):
    kw = dict(task="rte", data_dir=str(glue), model=str(tiny_base), method="structured", memory="lean",
              moments_dtype="factored", target_sparsity=0.02, max_train_samples=48, max_eval_samples=24, epochs=2,
              fixmask_epochs=1, batch_size=16, max_seq_length=32, progress=False, save_steps=2)
    ref = train(TrainConfig(output_dir=str(tmp_path / "ref"), **kw))
    diff = SparseDiff.load(tmp_path / "ref")
    assert ref["nnz"] == diff.nnz == round(0.02 * diff.n_diffed)
    start = json.loads((tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["settings"]["moments_dtype"] == "factored"

    stopped = interrupt_after_checkpoints(monkeypatch, lambda: train(TrainConfig(output_dir=str(tmp_path / "res"), **kw)))
    assert stopped == [2, 3]  # every 2 steps and at the epoch's end (48 examples, batches of 16): mid-L0
    res = train(TrainConfig(output_dir=str(tmp_path / "res"), resume=True, **kw))
    assert res["nnz"] == ref["nnz"] and res["final"] == ref["final"]
    assert_same_diff(tmp_path / "ref", tmp_path / "res")


def test_the_memory_check_names_only_settings_the_run_could_take(monkeypatch):
    from diffprune.training import TrainError, memory

    base = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 2))
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    monkeypatch.setattr(memory, "activation_bytes", lambda base, cfg: 2**20)

    def refusal(**kw) -> str:
        with pytest.raises(TrainError) as e:
            memory.check_memory(get_method("structured"), base, torch.device("cpu"),
                                TrainConfig(output_dir="x", batch_size=2, max_seq_length=8, **kw))
        return str(e.value)

    assert "--memory lean --moments-dtype factored: about" in refusal()
    sharded = refusal(fsdp=True)
    assert "--memory lean --w-dtype bf16: about" in sharded
    assert "factored" not in sharded and "--candidates" not in sharded  # both refused with --fsdp
