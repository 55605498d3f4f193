"""Memory-lean training (issue 16): the optimiser step inside backward, candidate-restricted L0, the
memory options of `diffprune train`, and the settings refused before any work."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from diffprune import DiffModel, DiffPruningConfig, SparseDiff
from diffprune import candidates as cand
from diffprune.errors import ConfigError
from diffprune.lean import OptimizerInBackward
from diffprune.methods import get_method
from diffprune.training import TrainConfig, train

from .helpers_cli import assert_same_diff, glue, interrupt_after_checkpoints, one_thread, tiny_base  # noqa: F401
from .tiny_models import bert_batch, tiny_bert


def _steps(dm, batches, opt, clip=None):
    for batch in batches:
        torch.manual_seed(7)
        dm(**batch).loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in dm.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _pair(**config):
    a = DiffModel(tiny_bert(), DiffPruningConfig(l0_lambda=1e-3, **config)).train()
    b = copy.deepcopy(a)
    return a, b


def _state(dm):
    return {n: p.detach().clone() for n, p in dm.named_parameters() if p.requires_grad}


def _assert_same_state(got, ref, rtol, atol):
    sa, sb = _state(ref), _state(got)
    assert sa.keys() == sb.keys() and sa
    for n in sa:
        torch.testing.assert_close(sb[n], sa[n], rtol=rtol, atol=atol, msg=n)


def test_optimizer_in_backward_equals_adamw_without_clipping():
    a, b = _pair(structured=True)
    batches = [bert_batch(a.model, seed=s) for s in range(3)]
    _steps(a, batches, torch.optim.AdamW(a.param_groups(lr=1e-2, alpha_lr=0.1, fused=False), weight_decay=0.0))
    oib = OptimizerInBackward(b.param_groups(lr=1e-2, alpha_lr=0.1, fused=False), max_grad_norm=None, weight_decay=0.0)
    _steps(b, batches, oib)
    assert all(p.grad is None for p in b.parameters())
    _assert_same_state(b, a, rtol=1e-6, atol=1e-7)


def test_optimizer_in_backward_clips_with_the_previous_steps_norm():
    a, b = _pair()
    batches = [bert_batch(a.model, seed=s) for s in range(2)]
    params = [p for p in a.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(a.param_groups(lr=1e-2, fused=False), weight_decay=0.0)
    # reference: step 1 unclipped, step 2 scaled by min(1, c / ||g_1||)
    clip = 1e-4  # far below the gradient norm, so the scale matters
    norms = []
    for i, batch in enumerate(batches):
        torch.manual_seed(7)
        a(**batch).loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
        if i == 1:
            for p in params:
                p.grad.mul_(min(1.0, clip / (norms[0] + 1e-6)))
        norms.append(norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    oib = OptimizerInBackward(b.param_groups(lr=1e-2, fused=False), max_grad_norm=clip, weight_decay=0.0)
    _steps(b, batches, oib)
    assert oib.last_norm == pytest.approx(norms[1], rel=1e-4) and oib.clipped_steps == 2
    _assert_same_state(b, a, rtol=1e-5, atol=1e-7)


def test_optimizer_in_backward_state_round_trip_continues_identically():
    a, b = _pair()
    batches = [bert_batch(a.model, seed=s) for s in range(4)]
    oa = OptimizerInBackward(a.param_groups(lr=1e-2, fused=False), max_grad_norm=1.0)
    _steps(a, batches, oa)
    ob = OptimizerInBackward(b.param_groups(lr=1e-2, fused=False), max_grad_norm=1.0)
    _steps(b, batches[:2], ob)
    sd = ob.state_dict()
    ob.close()
    ob2 = OptimizerInBackward(b.param_groups(lr=1e-2, fused=False), max_grad_norm=1.0)
    ob2.load_state_dict(copy.deepcopy(sd))
    _steps(b, batches[2:], ob2)
    _assert_same_state(b, a, rtol=1e-6, atol=1e-8)


def test_diffmodel_optimizer_builds_the_lean_step_for_a_loop_of_your_own():
    """`DiffModel.optimizer` (the library's one call for the memory options in a custom loop) with factored
    moments inside backward trains exactly as an OptimizerInBackward over groups tagged by hand, frees every
    gradient, and keeps a factored state for matrices and bf16 moments for vectors."""
    a, b = _pair(structured=True, alpha_dtype="bf16")
    batches = [bert_batch(a.model, seed=s) for s in range(3)]
    groups = a.param_groups(lr=1e-2, alpha_lr=0.1)
    for g in groups[:2]:  # w's and alpha's
        g["state_dtype"] = "factored"
    _steps(a, batches, OptimizerInBackward(groups, max_grad_norm=1e-3, weight_decay=0.0))
    opt = b.optimizer(lr=1e-2, alpha_lr=0.1, moments_dtype="factored", in_backward=True, max_grad_norm=1e-3)
    _steps(b, batches, opt)
    assert all(p.grad is None for p in b.parameters()) and opt.clipped_steps == 3
    _assert_same_state(b, a, rtol=0, atol=0)
    w_group, alpha_group = opt.param_groups[:2]
    assert w_group["state_dtype"] == alpha_group["state_dtype"] == "factored"
    matrix = next(p for p in w_group["params"] if p.dim() == 2)
    vector = next(p for p in w_group["params"] if p.dim() == 1)
    assert {"exp_avg_sq_row", "exp_avg_sq_col"} <= set(opt.state[matrix])
    assert opt.state[matrix]["exp_avg"].dtype == torch.bfloat16 and "exp_avg_sq" not in opt.state[matrix]
    assert opt.state[vector]["exp_avg_sq"].dtype == torch.bfloat16


def test_diffmodel_optimizer_bf16_moments_after_backward_and_its_refusals():
    """bf16 moments are w's only (alpha's follow alpha_dtype); clipping is the caller's, as with torch's
    AdamW; a moments_dtype that is not one, or one asked of the fixed-mask stage, is refused with the fix."""
    from diffprune import optim

    a, b = _pair()
    batches = [bert_batch(a.model, seed=s) for s in range(2)]
    groups = a.param_groups(lr=1e-2, alpha_lr=0.1)
    groups[0]["state_dtype"] = "bf16"
    _steps(a, batches, optim.AdamW(groups, lr=1e-2, weight_decay=0.0), clip=1.0)
    opt = b.optimizer(lr=1e-2, alpha_lr=0.1, moments_dtype="bf16")
    assert isinstance(opt, optim.AdamW)
    _steps(b, batches, opt, clip=1.0)
    _assert_same_state(b, a, rtol=0, atol=0)
    w, alpha = opt.param_groups[0]["params"][0], opt.param_groups[1]["params"][0]
    assert opt.state[w]["exp_avg_sq"].dtype == torch.bfloat16 and opt.state[alpha]["exp_avg_sq"].dtype == torch.float32
    with pytest.raises(ConfigError, match="not one of fp32, bf16, factored"):
        b.param_groups(moments_dtype="fp16")
    b.project(0.05)
    with pytest.raises(ConfigError, match="L0 stage.*moments_dtype='fp32'"):
        b.optimizer(moments_dtype="factored")
    assert "state_dtype" not in b.optimizer(lr=1e-3).param_groups[0]


def test_the_train_loops_groups_carry_the_moments_dtype_in_the_l0_stage_only():
    from diffprune.methods import Phase

    method = get_method("structured")
    cfg = TrainConfig(task="rte", output_dir="unused", memory="lean", moments_dtype="factored")
    dm = DiffModel(tiny_bert(), DiffPruningConfig(structured=True))
    tags = [g.get("state_dtype") for g in method.param_groups(dm, Phase("l0", 1, 1e-4), cfg)]
    assert tags == ["factored", "factored", None]  # w, alpha, head
    dm.project(0.05)
    assert all("state_dtype" not in g for g in method.param_groups(dm, Phase("fixed", 1, 5e-4), cfg))


def test_select_keeps_exactly_the_top_fraction_across_tensors():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(50, 7, generator=g).to(torch.bfloat16), "b": torch.rand(300, generator=g).to(torch.bfloat16),
              "c": torch.zeros(40, dtype=torch.bfloat16)}
    chosen = cand.select(scores, 0.1)
    flat = torch.cat([scores[n].float().reshape(-1) for n in scores])
    k = round(0.1 * flat.numel())
    assert sum(v.numel() for v in chosen.values()) == k and chosen["c"].numel() == 0
    kept = torch.cat([scores[n].float().reshape(-1)[chosen[n]] for n in scores])
    dropped_max = max(float(scores[n].float().reshape(-1)[[i for i in range(scores[n].numel())
                                                            if i not in set(chosen[n].tolist())]].max())
                      for n in scores if scores[n].numel() > chosen[n].numel())
    assert float(kept.min()) >= dropped_max
    for v in chosen.values():
        assert torch.equal(v, torch.sort(v).values) and v.unique().numel() == v.numel()


def test_select_per_tensor_ranks_within_each_tensor():
    # "a" has gradients 100x larger than "b": ranked globally it takes every candidate; divided by its root
    # mean square each tensor competes on its entries' importance within it
    g = torch.Generator().manual_seed(1)
    raw = {"a": (100 * torch.rand(200, generator=g)).to(torch.bfloat16), "b": torch.rand(10, 30, generator=g).to(torch.bfloat16),
           "z": torch.zeros(50, dtype=torch.bfloat16)}
    by_grad = cand.select({k: v.clone() for k, v in raw.items()}, 0.1)
    assert by_grad["a"].numel() == 55 and by_grad["b"].numel() == 0  # k = round(0.1 * 550)
    chosen = cand.select({k: v.clone() for k, v in raw.items()}, 0.1, importance="grad_per_tensor")
    assert sum(v.numel() for v in chosen.values()) == 55 and chosen["z"].numel() == 0
    # reference in float64: each tensor over its RMS; the kept entries are the largest across tensors up to
    # the bfloat16 rounding of the rescaled scores (one part in 2^8)
    ref = {k: (v.double() / v.double().square().mean().sqrt()).reshape(-1) for k, v in raw.items() if k != "z"}
    kept = torch.cat([ref[k][chosen[k]] for k in ref])
    dropped = torch.cat([ref[k][[i for i in range(ref[k].numel()) if i not in set(chosen[k].tolist())]] for k in ref])
    assert float(kept.min()) >= float(dropped.max()) * (1 - 2 ** -8)
    assert 15 < chosen["b"].numel() < 40  # both tensors compete (b holds 300 of the 550 entries)
    with pytest.raises(ValueError, match="importance 'fisher' is not one of"):
        cand.select(raw, 0.1, importance="fisher")


def test_importance_accumulates_abs_gradients_without_keeping_them():
    model = tiny_bert()
    for m in model.modules():  # no dropout: the reference below draws no noise of its own
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    base = copy.deepcopy(model)
    dm = DiffModel(model, DiffPruningConfig(candidates=0.1))
    batches = [bert_batch(dm.model, seed=s) for s in range(2)]
    scores = cand.importance(dm, batches)
    assert all(not t.requires_grad and t.grad is None for t in dm._theta().values())
    # reference: plain autograd on the base model, |grad| summed in float32
    params = dict(base.named_parameters())
    ref = {n: torch.zeros_like(params[n]) for n in scores}
    base.train()
    for batch in batches:
        base.zero_grad()
        base(**batch).loss.backward()
        for n in ref:
            ref[n] += params[n].grad.abs()
    for n in ref:
        assert scores[n].dtype == torch.bfloat16
        torch.testing.assert_close(scores[n].float(), ref[n], rtol=2e-2, atol=1e-8, msg=n)


def test_importance_of_an_embedding_from_its_looked_up_rows_equals_the_dense_gradients_bit_for_bit(monkeypatch):
    """The warm-up gives a diffed nn.Embedding the gradient of the rows the batch looks up only (repeated
    ids, the padding id, rows never looked up): the same bfloat16 scores, bit for bit, as the dense
    gradient, and the module is left as it was."""
    model = tiny_bert()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    other = copy.deepcopy(model)
    batches = [bert_batch(model, seed=s) for s in range(3)]
    batches[0]["input_ids"][0, :4] = torch.tensor([0, 7, 7, 7])  # the padding id and a repeated id
    grads = []
    real = torch.Tensor.coalesce

    def seen(self):  # the sparse path ran
        grads.append(self.shape)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "coalesce", seen)
    rows = cand.importance(DiffModel(model, DiffPruningConfig(candidates=0.1)), batches)
    n_sparse, grads[:] = len(grads), []
    dense = cand.importance(DiffModel(other, DiffPruningConfig(candidates=0.1)), batches, embedding_rows=False)
    embeddings = [m for m in model.modules() if type(m) is torch.nn.Embedding]
    assert n_sparse == 3 * len(embeddings) and not grads  # word, position, token type; each batch
    assert not any(m.sparse for m in embeddings)
    word = "bert.embeddings.word_embeddings.weight"
    assert (dense[word] == 0).all(dim=1).any() and (dense[word] != 0).any()  # rows never looked up stay 0
    for n in dense:
        assert torch.equal(rows[n], dense[n]), n


@pytest.mark.parametrize("kw, match", [
    (dict(candidates=1.0), "fraction in \\(0, 1\\)"),
    (dict(candidates=0.001, target_sparsity=0.005), "below target_sparsity"),
    (dict(candidates=0.05, method="magnitude"), "--method magnitude has none"),
    (dict(theta_dtype="bf16"), "300x slower"),
    (dict(memory="tiny"), "--memory 'tiny' is not one of standard, lean"),
    (dict(candidate_warmup_steps=0, candidates=0.05), "--candidate-warmup-steps 0"),
    (dict(candidate_importance="fisher", candidates=0.05), "--candidate-importance 'fisher' is not one of grad, grad_per"),
])
def test_bad_memory_settings_fail_before_any_work(kw, match, tmp_path, tiny_base, glue):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), task="rte", data_dir=str(glue), model=str(tiny_base),
                      method=kw.pop("method", "structured"), progress=False, **kw)
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_lean_keeps_the_step_after_backward_with_candidates():
    """--memory lean with --candidates: bf16 gate logits and recomputed weights, but the AdamW step after
    backward (the candidates' gradients are small; exact clipping, one multi-tensor call), unless
    --optimizer-in-backward says otherwise; the dense lean stage keeps it inside backward."""
    from diffprune.lean import resolve

    dense = resolve("lean", {}, accelerator=False)
    cand = resolve("lean", {}, accelerator=False, candidates=0.05)
    assert dense["optimizer_in_backward"] and not cand["optimizer_in_backward"]
    assert {k: v for k, v in cand.items() if k != "optimizer_in_backward"} == \
        {k: v for k, v in dense.items() if k != "optimizer_in_backward"}
    assert cand["alpha_dtype"] == "bf16" and cand["recompute_weights"]
    assert resolve("lean", {"optimizer_in_backward": True}, accelerator=False, candidates=0.05)["optimizer_in_backward"]
    assert not resolve("standard", {}, accelerator=False, candidates=0.05)["optimizer_in_backward"]
    cfg = TrainConfig(output_dir="unused", task="rte", memory="lean", candidates=0.05)
    assert not cfg.memory_options(accelerator=False)["optimizer_in_backward"]


def test_lean_preset_holds_only_options_measured_on_glue():
    """--memory lean turns on what the 5-task GLUE grid measured (in-backward AdamW, bf16 gate logits,
    recomputed weights) on every device alike; bf16 frozen weights (not measured: no GPU yet), bf16 moments or
    w and factored moments only when asked for, and bf16 frozen weights still refused on a CPU."""
    from diffprune.lean import LEAN, resolve

    for accelerator in (False, True):
        opts = resolve("lean", {}, accelerator=accelerator)
        assert opts == LEAN
        assert opts["optimizer_in_backward"] and opts["alpha_dtype"] == "bf16" and opts["recompute_weights"]
        assert (opts["theta_dtype"], opts["w_dtype"], opts["moments_dtype"]) == ("fp32", "fp32", "fp32")
    assert resolve("lean", {"theta_dtype": "bf16"}, accelerator=True)["theta_dtype"] == "bf16"
    with pytest.raises(ConfigError, match="300x slower"):
        resolve("lean", {"theta_dtype": "bf16"}, accelerator=False)


def test_state_estimate_follows_the_memory_options():
    m = get_method("structured")
    base = TrainConfig(output_dir="x")
    assert m.state_bytes_per_parameter(base) == 36
    assert m.state_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean")) == 4 + 8 + 2 + 4
    assert m.state_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean", moments_dtype="bf16")) == 4 + 4 + 2 + 4
    assert m.state_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean", w_dtype="bf16")) == 2 + 4 + 2 + 4
    assert m.state_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean", candidates=0.05)) == 2.0
    # at 10%: w (4), its gradient (4) and moments (8), alpha (2), its gradient (2) and moments (4), the int32
    # position and CSR column (8), and the step's theta + delta (4) per candidate
    assert m.state_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean", candidates=0.1)) == pytest.approx(3.6)
    assert get_method("full").state_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean")) == 8
    # of which gradients (made in backward as the activations are freed: `check_memory` counts the larger)
    assert m.gradient_bytes_per_parameter(base) == 4 + 4
    assert m.gradient_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean")) == 0  # stepped in backward
    assert m.gradient_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean", candidates=0.1)) == \
        pytest.approx(0.1 * (4 + 2))  # candidates: the step after backward, w's and alpha's gradients
    assert m.gradient_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean", candidates=0.05)) == 0  # warm-up
    assert get_method("full").gradient_bytes_per_parameter(base) == 4
    assert get_method("bitfit").gradient_bytes_per_parameter(base) == 0
    assert get_method("lora").gradient_bytes_per_parameter(base) == 0
    # and effective weights (theta + delta per layer, from its forward to its backward) unless recomputed
    assert m.effective_bytes_per_parameter(base) == 4
    assert m.effective_bytes_per_parameter(TrainConfig(output_dir="x", memory="lean")) == 0
    assert get_method("full").effective_bytes_per_parameter(base) == 0


def test_memory_check_counts_the_larger_of_gradients_and_activations(monkeypatch):
    """Backward makes the gradients while it frees the activations, and zero_grad drops them before the next
    forward: a step holds the larger of the two, and the estimate refuses on that, not on their sum."""
    from diffprune.training import TrainError, memory

    base = torch.nn.Linear(1024, 1024)  # 1,049,600 parameters; full finetuning: 4 MiB of gradients, 8 of moments
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    cfg = TrainConfig(output_dir="x", batch_size=2, max_seq_length=8)

    def needs(acts_mib: float) -> str:
        monkeypatch.setattr(memory, "activation_bytes", lambda base, cfg: int(acts_mib * 2**20))
        with pytest.raises(TrainError) as e:
            memory.check_memory(get_method("full"), base, torch.device("cpu"), cfg)
        return str(e.value).split("needs about ")[1].split(":")[0]

    assert needs(2) == "12.0 MiB"  # the 4 MiB of gradients outweigh the activations: state alone
    assert needs(8) == "16.0 MiB"  # 8 MiB of moments + the activations
    assert needs(0) == "12.0 MiB"


def test_train_lean_with_candidates_end_to_end_and_resume(tmp_path, tiny_base, glue, monkeypatch):
    kw = dict(task="rte", data_dir=str(glue), model=str(tiny_base), method="structured", memory="lean",
              optimizer_in_backward=True,  # (lean alone keeps the step after backward with candidates)
              moments_dtype="bf16", w_dtype="bf16", candidates=0.1, candidate_warmup_steps=3,
              candidate_importance="grad_per_tensor", target_sparsity=0.02, max_train_samples=64,
              max_eval_samples=24, epochs=2, fixmask_epochs=1, batch_size=16, max_seq_length=32, progress=False,
              save_steps=2)
    ref = train(TrainConfig(output_dir=str(tmp_path / "ref"), **kw))
    diff = SparseDiff.load(tmp_path / "ref")
    assert ref["nnz"] == diff.nnz == round(0.02 * diff.n_diffed)
    assert diff.config.candidates == 0.1 and diff.config.alpha_dtype == diff.config.w_dtype == "bf16"
    log = [json.loads(x) for x in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    ev = next(r for r in log if r.get("event") == "candidates")
    assert ev["candidates"] == round(0.1 * diff.n_diffed) and ev["warmup_steps"] == 3
    assert ev["importance"] == "grad_per_tensor"
    assert [r["phase"] for r in log if r.get("event") == "optimizer_in_backward"] == ["l0", "fixed"]

    interrupt_after_checkpoints(monkeypatch, lambda: train(TrainConfig(output_dir=str(tmp_path / "res"), **kw)))
    res = train(TrainConfig(output_dir=str(tmp_path / "res"), resume=True, **kw))
    assert res["nnz"] == ref["nnz"] and res["final"] == ref["final"]
    assert_same_diff(tmp_path / "ref", tmp_path / "res", exact=False)


def test_gradient_checkpointing_trains_to_the_same_diff(tmp_path, tiny_base, glue):
    kw = dict(task="rte", data_dir=str(glue), model=str(tiny_base), method="structured", target_sparsity=0.02,
              max_train_samples=32, max_eval_samples=16, epochs=1, fixmask_epochs=1, batch_size=16,
              max_seq_length=32, progress=False, save_steps=0)
    plain = train(TrainConfig(output_dir=str(tmp_path / "plain"), **kw))
    ckpt = train(TrainConfig(output_dir=str(tmp_path / "ckpt"), gradient_checkpointing=True, **kw))
    assert ckpt["nnz"] == plain["nnz"] and ckpt["final"] == pytest.approx(plain["final"])
    a, b = SparseDiff.load(tmp_path / "plain"), SparseDiff.load(tmp_path / "ckpt")
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name]), name
        torch.testing.assert_close(b.values[name], a.values[name], rtol=1e-4, atol=1e-6)


def test_a_lean_candidate_run_from_before_the_step_moved_after_backward_resumes(tmp_path, tiny_base, glue, monkeypatch):
    """Until 2026-12-07 `--memory lean --candidates` stepped AdamW inside backward; since then after it, with
    the same stored settings (optimizer_in_backward unset). A run checkpointed the old way resumes with the
    new step: the in-backward optimiser's per-tensor state (torch's format) loads into the one AdamW, whose
    moments and step counts continue from the checkpoint, and the run ends with a diff of the budget."""
    from diffprune.training import checkpoints

    kw = dict(task="rte", data_dir=str(glue), model=str(tiny_base), method="structured", memory="lean",
              candidates=0.1, candidate_warmup_steps=2, target_sparsity=0.02, max_train_samples=64,
              max_eval_samples=16, epochs=2, fixmask_epochs=1, batch_size=16, max_seq_length=32, progress=False,
              save_steps=2)
    run = tmp_path / "run"
    real = checkpoints.write_checkpoint
    seen = []

    def stop_after_second(acc, run_dir, model, optimizer, pos, settings):
        real(acc, run_dir, model, optimizer, pos, settings)
        seen.append(type(optimizer).__name__)
        if len(seen) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_checkpoint", stop_after_second)
    with pytest.raises(KeyboardInterrupt):  # the old way: inside backward
        train(TrainConfig(output_dir=str(run), optimizer_in_backward=True, **kw))
    assert seen == ["OptimizerInBackward"] * 2
    # what such a run had stored: the option unset
    for path in [*run.glob("checkpoint/step-*/trainer_state.json"), run / "run.json"]:
        data = json.loads(path.read_text())
        assert data["settings"]["optimizer_in_backward"] is True
        data["settings"]["optimizer_in_backward"] = None
        path.write_text(json.dumps(data))
    (step_dir,) = run.glob("checkpoint/step-*")
    saved = checkpoints.load_safetensors(step_dir / "optimizer.safetensors")
    saved_sd = checkpoints.optimizer_from_safetensors(*saved)
    resumed = []

    def record(acc, run_dir, model, optimizer, pos, settings):
        if not resumed:
            inner = getattr(optimizer, "optimizer", optimizer)  # (accelerate's wrapper)
            resumed.append((type(inner).__name__, pos.global_step, copy.deepcopy(optimizer.state_dict())))
        real(acc, run_dir, model, optimizer, pos, settings)

    monkeypatch.setattr(checkpoints, "write_checkpoint", record)
    res = train(TrainConfig(output_dir=str(run), resume=True, **kw))
    name, step, sd = resumed[0]
    assert name == "AdamW" and step == 6  # the L0 stage continued after backward, from step 4
    w = 0  # the first tensor's w: its moments came from the checkpoint and moved on for two more steps
    assert float(saved_sd["state"][w]["step"]) == 4 and float(sd["state"][w]["step"]) == 6
    assert not torch.equal(sd["state"][w]["exp_avg"], saved_sd["state"][w]["exp_avg"])
    assert res["nnz"] == round(0.02 * SparseDiff.load(run).n_diffed)
