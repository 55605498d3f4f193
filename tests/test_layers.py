"""Per-layer diffs (`diffprune.layers`): the same loss and gradients as one functional call over the
whole model on theta + delta, with activation checkpointing, with recomputed weights, with tied
weights; generation equal to the merged model's."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch.func import functional_call

from diffprune import DiffModel, DiffPruningConfig, blocks, gates
from diffprune.model import _tensor_seed

from .tiny_models import CAUSAL_KINDS, bert_batch, causal_batch, tiny_bert, tiny_causal


def _randomise(dm: DiffModel, seed: int = 3) -> None:
    """Nonzero w and spread-out gate logits, so every gate regime (closed, open, in between) occurs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in dm.slots.values():
            slot.w.copy_(torch.randn(slot.w.shape, generator=g) * 0.05)
            if slot.alpha is not None:
                slot.alpha.copy_((torch.randn(slot.alpha.shape, generator=g) * 2).to(slot.alpha.dtype))
            if slot.alpha_group is not None:
                slot.alpha_group.fill_(0.7)


def _reference_loss(dm: DiffModel, batch: dict, seed: int) -> torch.Tensor:
    """What DiffModel computed before per-layer diffs: every theta + delta up front, one functional call."""
    c = dm.config
    torch.manual_seed(seed)
    base_seed = int(torch.randint(0, 2**62, (1,)).item())
    params, total = {}, None
    for i, name in enumerate(dm.diff_names):
        slot, t = dm._slot(name), dm._theta_of(name)
        params[name], e = gates.gated_diff_and_l0(t, slot.w, slot.alpha, slot.alpha_group, _tensor_seed(base_seed, i),
                                                  c.stretch_l, c.stretch_r, c.group_penalty)
        total = e if total is None else total + e
    dm._injector.enabled = False
    try:
        out = functional_call(dm.model, params, (), batch, tie_weights=True, strict=False)
    finally:
        dm._injector.enabled = True
    return out.loss + c.l0_lambda * total


def _loss_and_grads(dm: DiffModel, fn) -> tuple[float, dict[str, torch.Tensor]]:
    dm.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in dm.named_parameters() if p.requires_grad and p.grad is not None}
    dm.zero_grad(set_to_none=True)
    return float(loss), grads


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    loss_a, ga = a
    loss_b, gb = b
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert set(ga) == set(gb) and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol, msg=n)


def _model(kind):
    if kind == "bert":
        m = tiny_bert()
        return m, bert_batch(m)
    m = tiny_causal(kind)
    return m, causal_batch(m)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("kind", ["bert", *CAUSAL_KINDS])
def test_per_layer_equals_whole_model_functional_call(kind, structured):
    model, batch = _model(kind)
    dm = DiffModel(model, DiffPruningConfig(structured=structured, l0_lambda=1e-3)).train()
    _randomise(dm)
    ref = _loss_and_grads(dm, lambda: _reference_loss(dm, batch, seed=11))
    torch.manual_seed(11)
    got = _loss_and_grads(dm, lambda: dm(**batch).loss)
    _assert_same(got, ref)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind, reentrant):
    model, batch = _model(kind)
    dm = DiffModel(model, DiffPruningConfig(structured=True, l0_lambda=1e-3)).train()
    _randomise(dm)
    ref = _loss_and_grads(dm, lambda: _reference_loss(dm, batch, seed=5))
    dm.gradient_checkpointing_enable({"use_reentrant": reentrant})
    assert dm.checkpointing()
    torch.manual_seed(5)
    got = _loss_and_grads(dm, lambda: dm(**batch).loss)
    _assert_same(got, ref)


def test_torch_checkpoint_per_block_gives_the_same_loss_and_gradients():
    from torch.utils.checkpoint import checkpoint

    model, batch = _model("llama")
    dm = DiffModel(model, DiffPruningConfig(l0_lambda=1e-3)).train()
    _randomise(dm)
    ref = _loss_and_grads(dm, lambda: _reference_loss(dm, batch, seed=2))
    for layer in model.model.layers:  # wrap each decoder block's forward by hand
        inner = layer.forward
        layer.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    torch.manual_seed(2)
    got = _loss_and_grads(dm, lambda: dm(**batch).loss)
    _assert_same(got, ref)


@pytest.mark.parametrize("stage", ["l0", "fixed"])
def test_recomputed_weights_same_gradients_and_not_kept(stage, monkeypatch):
    model, batch = _model("llama")
    dm = DiffModel(model, DiffPruningConfig(l0_lambda=1e-3)).train()
    _randomise(dm)
    if stage == "fixed":
        dm.project(0.05)
    torch.manual_seed(4)
    plain = _loss_and_grads(dm, lambda: dm(**batch).loss)
    dm.recompute_weights = True
    torch.manual_seed(4)
    again = _loss_and_grads(dm, lambda: dm(**batch).loss)
    _assert_same(again, plain, rtol=0, atol=0)  # the same numbers: recomputed from the same noise
    if stage == "l0":
        _assert_recompute_hands_its_sample_to_the_backward(dm, batch, plain, monkeypatch)

    # After the forward, with recompute on autograd holds no reference to any layer's effective
    # weight (its storage's use count is what our own reference gives it); without, every one is held.
    made = []
    real = DiffModel.effective

    def spy(self, name, step, for_recompute=False):
        out = real(self, name, step, for_recompute)
        if not for_recompute and out.numel() >= 32 * 32:
            made.append(out)
        return out

    def refs(t):
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    monkeypatch.setattr(DiffModel, "effective", spy)
    counts = {}
    for recompute in (True, False):
        dm.recompute_weights = recompute
        made.clear()
        loss = dm(**batch).loss
        gc.collect()
        counts[recompute] = [refs(t) for t in made]
        loss.backward()
        dm.zero_grad(set_to_none=True)
    assert len(counts[True]) == len(counts[False]) > 0
    pairs = list(zip(counts[True], counts[False]))
    # every one but the embedding (whose backward needs only the token ids) is held without recompute; in
    # the L0 stage the embedding's looked-up rows do not come from `effective` (`DiffModel.gated_rows`)
    held = sum(a < b for a, b in pairs)
    assert all(a <= b for a, b in pairs) and held == len(pairs) - (stage == "fixed"), counts


def _assert_recompute_hands_its_sample_to_the_backward(dm, batch, plain, monkeypatch):
    """Every gate sample a recompute draws is read once by that tensor's backward (`ConcreteCache`), and
    the gradients are the ones drawn afresh (cache off)."""
    from diffprune import gates

    filled, hits = [], []
    put, take = gates.ConcreteCache.put, gates.ConcreteCache.take
    monkeypatch.setattr(gates.ConcreteCache, "put", lambda self, key, s: filled.append(key) or put(self, key, s))
    monkeypatch.setattr(gates.ConcreteCache, "take", lambda self, key: _record(hits, key, take(self, key)))
    torch.manual_seed(4)
    cached = _loss_and_grads(dm, lambda: dm(**batch).loss)
    monkeypatch.undo()
    # every diffed tensor (matrices and norm weights) but the embedding, whose backward needs no weight
    assert len(filled) == len(dm.diff_names) - 1 > 0
    assert sorted(hits) == sorted(filled)
    monkeypatch.setattr(gates.ConcreteCache, "max_entries", 0)  # nothing cached: every backward draws again
    torch.manual_seed(4)
    fresh = _loss_and_grads(dm, lambda: dm(**batch).loss)
    monkeypatch.undo()
    _assert_same(cached, plain, rtol=0, atol=0)
    _assert_same(fresh, plain, rtol=0, atol=0)


def _record(hits: list, key, s):
    if s is not None:
        hits.append(key)
    return s


def test_tied_weights_are_diffed_once_and_both_uses_see_the_diff():
    model, batch = _model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    dm = DiffModel(model, DiffPruningConfig(l0_lambda=1e-3)).train()
    assert "transformer.wte.weight" in dm.diff_names and "lm_head.weight" not in dm.diff_names
    assert sorted(dm._injector.owners["transformer.wte.weight"]) == ["lm_head.weight", "transformer.wte.weight"]
    _randomise(dm)
    ref = _loss_and_grads(dm, lambda: _reference_loss(dm, batch, seed=9))
    torch.manual_seed(9)
    got = _loss_and_grads(dm, lambda: dm(**batch).loss)
    _assert_same(got, ref)
    # the penalty counts the tied tensor once: loss - task loss == lambda * E[L0] of every tensor
    dm.eval()
    with torch.no_grad():
        merged = copy.deepcopy(dm).merge_and_unload().eval()
        assert merged.lm_head.weight is merged.transformer.wte.weight
        torch.testing.assert_close(dm(**batch).logits, merged(**batch).logits, rtol=1e-5, atol=1e-6)


def test_a_deep_copy_keeps_its_own_hooks():
    model, batch = _model("llama")
    dm = DiffModel(model, DiffPruningConfig()).eval()
    _randomise(dm)
    twin = copy.deepcopy(dm)
    with torch.no_grad():
        for slot in twin.slots.values():
            slot.w.zero_()  # the copy's diff is now zero: its outputs are the base model's
        base_out = copy.deepcopy(twin).merge_and_unload()(**batch).logits
        torch.testing.assert_close(twin(**batch).logits, base_out)
        assert not torch.allclose(dm(**batch).logits, base_out)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_generate_equals_the_merged_model_token_for_token(kind):
    model, batch = _model(kind)
    dm = DiffModel(model, DiffPruningConfig())
    _randomise(dm)
    prompt = batch["input_ids"][:, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    merged_l0 = copy.deepcopy(dm).merge_and_unload().eval()
    dm.eval()
    # L0 stage: each decoding step's modules compute theta + delta (deterministic gates)
    torch.testing.assert_close(dm.generate(prompt, **kwargs), merged_l0.generate(prompt, **kwargs), rtol=0, atol=0)
    dm.project(0.05)
    before = {n: p.detach().clone() for n, p in dm.model.named_parameters()}
    merged = copy.deepcopy(dm).merge_and_unload().eval()
    out = dm.generate(prompt, **kwargs)
    torch.testing.assert_close(out, merged.generate(prompt, **kwargs), rtol=0, atol=0)
    assert out.shape == (prompt.shape[0], prompt.shape[1] + 8) or out.shape[1] <= prompt.shape[1] + 8
    for n, p in dm.model.named_parameters():  # the in-place merge for generate was reverted bit-exactly
        assert torch.equal(p, before[n]), n
    # and differs from the base model's greedy output (the diff does something)
    base = tiny_causal(kind).eval()
    assert not torch.equal(base.generate(prompt, **kwargs), out) or not torch.allclose(
        base(input_ids=prompt).logits, dm(input_ids=prompt).logits)


def test_w_in_bf16_gates_in_fp32_and_gradients_of_the_fp32_path():
    """--w-dtype bf16: w is stored in bf16 but the gate arithmetic runs in fp32, so the loss and the
    gradients are those of the fp32 model holding the same (bf16-representable) values."""
    model, batch = _model("bert")
    dm = DiffModel(model, DiffPruningConfig(w_dtype="bf16", l0_lambda=1e-3, structured=True)).train()
    fp32 = DiffModel(tiny_bert(), DiffPruningConfig(l0_lambda=1e-3, structured=True)).train()
    for m in (dm, fp32):
        _randomise(m)
    with torch.no_grad():  # the same values in both: w rounded to bf16
        for (n, a), b in zip(dm.slots.named_parameters(), fp32.slots.parameters()):
            b.copy_(a.float())
    slot = next(iter(dm.slots.values()))
    assert slot.w.dtype == torch.bfloat16 and slot.alpha.dtype == torch.float32
    torch.manual_seed(1)
    l_bf, g_bf = _loss_and_grads(dm, lambda: dm(**batch).loss)
    torch.manual_seed(1)
    l_32, g_32 = _loss_and_grads(fp32, lambda: fp32(**batch).loss)
    assert l_bf == pytest.approx(l_32, rel=1e-6)
    for n in g_32:
        assert g_bf[n].dtype == (torch.bfloat16 if n.endswith(".w") else torch.float32), n
        torch.testing.assert_close(g_bf[n].float(), g_32[n].to(g_bf[n].dtype).float(), rtol=1e-5, atol=1e-7, msg=n)


def test_alpha_in_bf16_trains_and_stays_bf16():
    model, batch = _model("bert")
    dm = DiffModel(model, DiffPruningConfig(alpha_dtype="bf16", l0_lambda=1e-3)).train()
    slot = next(iter(dm.slots.values()))
    assert slot.alpha.dtype == torch.bfloat16 and slot.w.dtype == torch.float32
    fp32 = DiffModel(tiny_bert(), DiffPruningConfig(l0_lambda=1e-3)).train()
    for m in (dm, fp32):
        _randomise(m)
    torch.manual_seed(1)
    l_bf, g_bf = _loss_and_grads(dm, lambda: dm(**batch).loss)
    torch.manual_seed(1)
    l_32, g_32 = _loss_and_grads(fp32, lambda: fp32(**batch).loss)
    assert l_bf == pytest.approx(l_32, rel=1e-2)
    a = next(n for n in g_bf if n.endswith(".alpha"))
    assert g_bf[a].dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(g_bf[a].float().flatten(), g_32[a].flatten(), dim=0) > 0.99
    opt = torch.optim.AdamW(dm.param_groups(lr=1e-3, alpha_lr=0.1))
    dm(**batch).loss.backward()
    opt.step()
    assert slot.alpha.dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in opt.state[slot.alpha].values() if v.dim())


def test_candidates_everywhere_equal_the_dense_l0_stage():
    """With every entry a candidate, the candidate-restricted L0 stage is the dense one exactly."""
    model, batch = _model("llama")
    dense = DiffModel(copy.deepcopy(model), DiffPruningConfig(l0_lambda=1e-3, structured=True)).train()
    cand = DiffModel(model, DiffPruningConfig(l0_lambda=1e-3, structured=True, candidates=0.999)).train()
    assert cand.stage == "warmup" and not list(cand.slots.parameters())
    cand.set_candidates({n: torch.arange(dense._theta_of(n).numel()) for n in cand.diff_names})
    assert cand.stage == "l0"
    _randomise(dense)
    with torch.no_grad():
        for name in dense.diff_names:
            for attr in ("w", "alpha", "alpha_group"):
                getattr(cand._slot(name), attr).copy_(getattr(dense._slot(name), attr).reshape(-1)
                                                      if attr != "alpha_group" else getattr(dense._slot(name), attr))
    torch.manual_seed(3)
    ld, gd = _loss_and_grads(dense, lambda: dense(**batch).loss)
    torch.manual_seed(3)
    lc, gc_ = _loss_and_grads(cand, lambda: cand(**batch).loss)
    assert lc == pytest.approx(ld, rel=1e-6)
    for n in gd:
        torch.testing.assert_close(gc_[n].reshape(gd[n].shape), gd[n], rtol=1e-5, atol=1e-7, msg=n)
    dense.project(0.05)
    cand.project(0.05)
    a, b = dense.to_sparse_diff(), cand.to_sparse_diff()
    for n in dense.diff_names:
        assert torch.equal(a.indices[n], b.indices[n]), n
        torch.testing.assert_close(a.values[n], b.values[n])


def _candidate_model(kind: str, fraction: float = 0.05, seed: int = 0):
    """A DiffModel in the candidate L0 stage on a random `fraction` of each diffed tensor's entries."""
    model, batch = _model(kind)
    dm = DiffModel(model, DiffPruningConfig(l0_lambda=1e-3, structured=True, candidates=0.5)).train()
    g = torch.Generator().manual_seed(seed)
    picks = {}
    for n in dm.diff_names:
        numel = dm._theta_of(n).numel()
        # entry 0 always (so the padding row of a token embedding has a candidate)
        picks[n] = torch.cat([torch.zeros(1, dtype=torch.int64),
                              torch.randperm(numel, generator=g)[: max(1, round(fraction * numel))]]).unique()
    dm.set_candidates(picks)
    with torch.no_grad():
        for slot in dm.slots.values():
            slot.w.copy_(torch.randn(slot.w.shape, generator=g) * 0.05)
            slot.alpha.copy_(torch.randn(slot.alpha.shape, generator=g) * 2)
    return dm, batch


def test_candidate_positions_are_int32_and_int64_checkpoints_still_load():
    """The candidates' positions (and a matrix's CSR of them) are kept as int32, 4 bytes a candidate; a
    checkpoint written with int64 positions (before 2026-12-07) loads into the same state and the same
    loss; projection hands the fixed-mask stage int64 positions, as the dense stage does."""
    from diffprune.layers import csr_of

    dm, batch = _candidate_model("bert")
    slots = list(dm.slots.values())
    assert all(s.candidates.dtype == torch.int32 for s in slots)
    linear = next(n for n in dm.diff_names if dm._theta_of(n).dim() == 2)
    crow, col = dm._slot(linear).csr(tuple(dm._theta_of(linear).shape))
    assert crow.dtype == col.dtype == torch.int32
    assert all(t.dtype == torch.int64 for t in csr_of(torch.tensor([3]), (2**16, 2**15)))  # 2^31 entries
    state = dm.trainable_state_dict()
    old = {k: v.long() if k.endswith(".candidates") else v for k, v in state.items()}
    again, _ = _candidate_model("bert", seed=1)  # other candidates and values, overwritten by the load
    again.load_trainable_state_dict(old)
    assert all(s.candidates.dtype == torch.int32 for s in again.slots.values())
    for n in dm.diff_names:
        assert torch.equal(again._slot(n).candidates, dm._slot(n).candidates), n
    dm.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(dm(**batch).logits, again(**batch).logits)
    dm.project(0.01)
    assert all(s.positions.dtype == torch.int64 for s in dm.slots.values())


@pytest.mark.parametrize("setting", ["plain", "checkpointing", "recompute"])
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_candidate_weights_get_a_sampled_gradient_equal_to_the_dense_one(kind, setting, monkeypatch):
    """Candidate-restricted nn.Linear weights take their gradient from a sampled matmul at the
    candidates (SampledWeightGrad), nn.Embedding weights from the rows the batch looks up
    (SampledRowsGrad; a repeated id, the padding id, rows with and without candidates): the same loss
    and the same gradients for w and alpha as the dense weight gradient gathered at the candidates,
    with activation checkpointing and recomputed weights too. GPT-2's Conv1D layers keep the dense
    path; its LM head (an nn.Linear) and token embedding share one tied, diffed weight."""
    from diffprune import layers

    dm, batch = _candidate_model(kind)
    with torch.no_grad():  # entry 0 (a candidate everywhere: the padding row's first) with an open gate
        for slot in dm.slots.values():
            slot.alpha[0] = 6.0
    ids = batch["input_ids"]
    ids[0, :3] = torch.tensor([0, 5, 5])  # the padding id (BERT's is 0) and a repeated id
    if "labels" in batch and kind != "bert":
        batch["labels"] = ids.clone()
    if setting == "checkpointing":
        dm.gradient_checkpointing_enable({"use_reentrant": False})
    if setting == "recompute":
        dm.recompute_weights = True
    runs, row_runs = [], []
    real, real_rows = layers.SampledWeightGrad.backward, layers.SampledRowsGrad.backward

    def counting(ctx, dy):
        runs.append(ctx.shape)
        return real(ctx, dy)

    def counting_rows(ctx, dy):
        row_runs.append(ctx.n_rows)
        return real_rows(ctx, dy)

    monkeypatch.setattr(layers.SampledWeightGrad, "backward", staticmethod(counting))
    monkeypatch.setattr(layers.SampledRowsGrad, "backward", staticmethod(counting_rows))
    # default: sampled matmuls on the CPU only, looked-up rows everywhere
    assert dm.sampled_candidate_grad is None and dm._injector.samples(torch.zeros(1))
    assert not dm._injector.samples(torch.zeros(1, device="meta"))
    results = {}
    for sampled in (True, False):
        dm._injector.sampled_grad = sampled
        torch.manual_seed(7)
        results[sampled] = _loss_and_grads(dm, lambda: dm(**batch).loss)
        if sampled:
            n_sampled, runs[:] = len(runs), []
            n_rows, row_runs[:] = list(row_runs), []
    uses = [o for owners in dm._injector.owners.values() for o in owners if o.endswith(".weight")]
    linear_uses = [o for o in uses if type(dm.model.get_submodule(o.rsplit(".", 1)[0])) is torch.nn.Linear]
    embedding_uses = [o for o in uses if type(dm.model.get_submodule(o.rsplit(".", 1)[0])) is torch.nn.Embedding]
    assert not runs and not row_runs  # the reference run used the dense gradient only
    assert linear_uses and n_sampled == len(linear_uses)
    assert embedding_uses and len(n_rows) == len(embedding_uses)
    assert torch.unique(ids).numel() in n_rows  # the token embedding: only the batch's distinct ids
    _assert_same(results[True], results[False], rtol=1e-5, atol=1e-7)


def test_sampled_weight_grad_equals_the_dense_product_at_the_positions():
    from diffprune.layers import csr_of, sampled_weight_grad

    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(37, 24, generator=g), torch.randn(37, 16, generator=g)
    cand = torch.randperm(24 * 16, generator=g)[:40].sort().values
    want = (dy.t() @ x).reshape(-1)[cand]
    torch.testing.assert_close(sampled_weight_grad(dy, x, cand, (24, 16)), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sampled_weight_grad(dy, x, cand, (24, 16), csr_of(cand, (24, 16))), want,
                               rtol=1e-5, atol=1e-6)
    # rows without candidates, and a single candidate
    one = torch.tensor([24 * 16 - 1])
    torch.testing.assert_close(sampled_weight_grad(dy, x, one, (24, 16)), want.new_tensor([(dy[:, 23] * x[:, 15]).sum()]),
                               rtol=1e-5, atol=1e-6)


def _apply_setting(dm: DiffModel, setting: str) -> None:
    """"checkpointing", "recompute", or "bf16 alpha, expected_l0" (gate logits in bf16, the other group
    penalty); anything else: as built."""
    if setting == "checkpointing":
        dm.gradient_checkpointing_enable({"use_reentrant": False})
    if setting == "recompute":
        dm.recompute_weights = True
    if setting.startswith("bf16"):
        dm.config.group_penalty = "expected_l0"
        for slot in dm.slots.values():
            slot.alpha.data = slot.alpha.data.bfloat16()
            slot.alpha_group.data = slot.alpha_group.data.bfloat16()


def _assert_same_in_setting(a, b, setting: str) -> None:
    """Equal losses and gradients; with bf16 logits each gradient within a bf16 step of its tensor's largest
    (one path rounds alpha's gradient to bf16 twice, its gate part then with its L0 part added, the other
    once)."""
    if not setting.startswith("bf16"):
        _assert_same(a, b, rtol=1e-5, atol=1e-7)
        return
    (loss_a, ga), (loss_b, gb) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and set(ga) == set(gb)
    for n in ga:
        torch.testing.assert_close(ga[n].float(), gb[n].float(), rtol=1e-2, atol=1e-2 * float(gb[n].float().abs().max()), msg=n)


@pytest.mark.parametrize("setting", ["plain", "checkpointing", "recompute", "bf16 alpha, expected_l0"])
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_candidate_gates_in_one_pass_equal_the_per_tensor_gates(kind, setting, monkeypatch):
    """The candidate L0 stage computes every tensor's gates in one pass when the step starts
    (GatedSegments, blocks spanning many tensors): the same loss (L0 term included) and gradients for w,
    alpha and the group logits as the per-tensor GatedDiff, with activation checkpointing, recomputed
    weights, bf16 gate logits and the other group penalty; no per-tensor gate pass runs."""
    from diffprune import gates

    dm, batch = _candidate_model(kind)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # group gates strictly between 0 and 1, so that their logits get a gradient
        for slot in dm.slots.values():
            slot.alpha_group.fill_(float(torch.rand((), generator=g)) - 0.5)
    _apply_setting(dm, setting)
    monkeypatch.setattr(blocks, "CPU_BLOCK", 64)  # blocks that span tensors and tensors over several blocks
    calls = []
    real = gates.GatedDiff.forward

    def counting(ctx, *args):
        calls.append(1)
        return real(ctx, *args)

    monkeypatch.setattr(gates.GatedDiff, "forward", staticmethod(counting))
    results = {}
    for batched in (True, False):
        dm.batched_gates = batched
        calls.clear()
        torch.manual_seed(7)
        results[batched] = _loss_and_grads(dm, lambda: dm(**batch).loss)
        assert bool(calls) != batched
    _assert_same_in_setting(results[True], results[False], setting)


def _embeddings_of(kind):
    return [m for m in _model(kind)[0].modules() if type(m) is torch.nn.Embedding]


@pytest.mark.parametrize("setting", ["plain", "checkpointing", "recompute", "bf16 alpha, expected_l0"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_dense_embedding_rows_equal_the_whole_tensors_gates(kind, setting, monkeypatch):
    """In the dense L0 stage an nn.Embedding's gates run at the rows the batch looks up only (GatedRows;
    a repeated id, the padding id): the same loss (L0 term of every entry included) and gradients for
    w, alpha and the group logit as the gate pass over the whole tensor; GPT-2's token embedding is
    tied to its LM head, whose nn.Linear use keeps the whole tensor's pass."""
    from diffprune import gates

    model, batch = _model(kind)
    dm = DiffModel(model, DiffPruningConfig(l0_lambda=1e-3, structured=True)).train()
    _randomise(dm)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for slot in dm.slots.values():
            slot.alpha_group.fill_(float(torch.rand((), generator=g)) - 0.5)
            slot.alpha[0] = 6.0  # the padding row (BERT's 0) with open gates
    batch["input_ids"][0, :4] = torch.tensor([0, 5, 5, 5])
    if kind != "bert":
        batch["labels"] = batch["input_ids"].clone()
    _apply_setting(dm, setting)
    calls = []
    real = gates.GatedRows.forward

    def counting(ctx, *args):
        calls.append(args[1].shape)
        return real(ctx, *args)

    results = {}
    embeddings = [m for m in dm.model.modules() if type(m) is torch.nn.Embedding]
    monkeypatch.setattr(gates.GatedRows, "forward", staticmethod(counting))
    for rows in (True, False):
        dm._injector.sampled_grad = None if rows else False
        calls.clear()
        torch.manual_seed(7)
        results[rows] = _loss_and_grads(dm, lambda: dm(**batch).loss)
        assert (len(calls) >= len(embeddings)) if rows else not calls  # (checkpointing reruns some)
    assert [m.padding_idx for m in embeddings] == [m.padding_idx for m in _embeddings_of(kind)]
    _assert_same_in_setting(results[True], results[False], setting)
