"""The optimised training path (issue 6) against a plain reference, and the cost benchmark's plumbing.

The reference recomputes one training step of `DiffModel` with ordinary autograd ops: the same
gate noise (`gates._uniform` with the step's seeds), delta = z * z_g * w materialised per tensor,
the wrapped model called on theta + delta, and the L0 penalty from `gates.expected_nonzeros`.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from diffprune import DiffModel, DiffPruningConfig, blocks, gates
from diffprune.model import _tensor_seed

from .conftest import tiny_bert, tiny_gpt2

REPO = Path(__file__).resolve().parents[1]


def _randomise(dm, seed=0):
    """Nonzero w and spread-out gate logits, so every gate regime (0, in between, 1) occurs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in dm.slots.values():
            slot.w.copy_(torch.randn(slot.w.shape, generator=g) * 0.05)
            if slot.alpha is not None:
                slot.alpha.copy_(torch.randn(slot.alpha.shape, generator=g) * 2 + 0.5)
            if slot.alpha_group is not None:
                slot.alpha_group.fill_(0.8)


def _plain_step(dm, batch, step_seed):
    """Loss of one training step computed the plain way; gates drawn as DiffModel draws them."""
    c = dm.config
    l, r = c.stretch_l, c.stretch_r
    torch.manual_seed(step_seed)
    base_seed = int(torch.randint(0, 2**62, (1,)).item())
    params, penalty = {}, torch.zeros(())
    theta = dict(dm.model.named_parameters())
    for i, name in enumerate(dm.diff_names):
        slot, seed = dm._slot(name), _tensor_seed(base_seed, i)
        u = gates._uniform(slot.alpha.shape, seed, slot.alpha.device, slot.alpha.dtype)
        d = (torch.sigmoid(torch.logit(u) + slot.alpha) * (r - l) + l).clamp(0, 1) * slot.w
        if slot.alpha_group is not None:
            ug = gates._uniform((), seed + 1_000_003, slot.alpha.device, slot.alpha.dtype)
            d = d * (torch.sigmoid(torch.logit(ug) + slot.alpha_group) * (r - l) + l).clamp(0, 1)
        params[name] = theta[name] + d
        penalty = penalty + gates.expected_nonzeros(slot.alpha, slot.alpha_group, l, r, c.group_penalty)
    dm._injector.enabled = False  # the plain way: no per-layer hooks, theta + delta passed in whole
    try:
        out = functional_call(dm.model, params, (), batch, tie_weights=True, strict=False)
    finally:
        dm._injector.enabled = True
    return out.loss + c.l0_lambda * penalty


def _grads(dm):
    return {n: p.grad.detach().clone() for n, p in dm.named_parameters() if p.grad is not None}


def _assert_close_grads(got, ref):
    assert got.keys() == ref.keys()
    for n in ref:
        scale = float(ref[n].abs().max()) or 1.0
        err = float((got[n] - ref[n]).abs().max())
        assert err <= 1e-5 * scale + 1e-7, (n, err, scale)


@pytest.mark.parametrize("structured,group_penalty", [(False, "per_gate"), (True, "per_gate"), (True, "expected_l0")])
@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2-tied"])
def test_l0_step_gradients_match_plain_reference(structured, group_penalty, factory, monkeypatch):
    """Every gradient of the optimised L0 step (fused gates + L0 term, blocked, noise regenerated in
    backward) equals plain autograd through theta + z * z_g * w plus the L0 term (either group penalty)."""
    monkeypatch.setattr(blocks, "CPU_BLOCK", 97)  # several blocks per tensor, ragged ends
    model = factory()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 10), generator=g)
    batch = {"input_ids": ids, "labels": torch.randint(0, 3, (4,), generator=g) if factory is tiny_bert else ids}
    dm = DiffModel(model, DiffPruningConfig(structured=structured, group_penalty=group_penalty, l0_lambda=1e-3)).train()
    _randomise(dm)

    torch.manual_seed(123)
    loss = dm(**batch).loss
    loss.backward()
    got = _grads(dm)
    dm.zero_grad(set_to_none=True)

    ref_loss = _plain_step(dm, batch, 123)
    ref_loss.backward()
    ref = _grads(dm)
    assert math.isclose(float(loss.detach()), float(ref_loss.detach()), rel_tol=1e-6)
    _assert_close_grads(got, ref)
    # the L0 term reaches alpha everywhere, and the gate part reaches it too
    slot = dm._slot(dm.diff_names[0])
    assert bool((got[f"slots.{dm.diff_names[0].replace('.', '-')}.alpha"] != 0).all())
    assert slot.w.grad is not None


def test_fixed_stage_gradients_match_plain_reference():
    torch.manual_seed(0)
    dm = DiffModel(tiny_bert(), DiffPruningConfig(structured=True))
    _randomise(dm)
    dm.project(0.05).train()
    g = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(0, 120, (4, 10), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
    dm(**batch).loss.backward()
    got = _grads(dm)
    dm.zero_grad(set_to_none=True)
    # plain: dense delta tensors (leaves), gradient read at the kept positions
    deltas = {n: d.requires_grad_() for n, d in dm.delta().items()}
    theta = dict(dm.model.named_parameters())
    dm._injector.enabled = False  # the plain way, without the per-layer hooks
    try:
        out = functional_call(dm.model, {n: theta[n] + deltas[n] for n in dm.diff_names}, (), batch,
                              tie_weights=True, strict=False)
    finally:
        dm._injector.enabled = True
    out.loss.backward()
    ref = {n: p.grad.detach().clone() for n, p in dm.named_parameters() if p.grad is not None}
    for n in dm.diff_names:
        if dm._slot(n).positions.numel():
            ref[f"slots.{n.replace('.', '-')}.values"] = deltas[n].grad.reshape(-1)[dm._slot(n).positions]
    _assert_close_grads(got, ref)


def test_param_groups_use_fused_adamw_with_the_same_updates():
    def run(fused):
        torch.manual_seed(0)
        dm = DiffModel(tiny_bert(), DiffPruningConfig(structured=True)).train()
        groups = dm.param_groups(lr=1e-2, fused=fused)
        assert all(grp.get("fused") is (True if fused is None else None) for grp in groups)
        opt = torch.optim.AdamW(groups)
        g = torch.Generator().manual_seed(1)
        batch = {"input_ids": torch.randint(0, 120, (8, 10), generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}
        for step in range(3):
            torch.manual_seed(step)
            dm(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        return dm.trainable_state_dict()

    fused, plain = run(None), run(False)
    for k in plain:
        assert torch.allclose(fused[k], plain[k], rtol=1e-5, atol=1e-6), k


def _bench_module():
    spec = importlib.util.spec_from_file_location("train_cost", REPO / "benchmarks" / "train_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("config", ["full", "l0", "l0_structured", "fixed", "lora_qv8", "lora_all32", "l0_lean",
                                    "candidates", "candidates_in_backward"])
def test_benchmark_configurations_train(config):
    bench = _bench_module()
    model = bench.build_model("tiny")
    batch = bench.make_batch(model, 2, 16, torch.device("cpu"))
    module, opt, params = bench.setup(config, model, "fused", batch=batch)
    # as `diffprune train --memory lean` does: the step inside backward, except with candidates
    assert hasattr(opt, "clipped_steps") == (config in ("l0_lean", "candidates_in_backward"))
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        module(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    if config == "fixed":
        assert module.stage == "fixed" and module.nnz() == round(0.005 * module.n_diffed)


@pytest.mark.slow
def test_benchmark_cli_quick_prints_ratios_last():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_cost.py"), "--model", "tiny", "--quick", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("step_time_ratio_l0", "step_time_ratio_fixmask", "peak_memory_ratio_l0", "peak_memory_ratio_fixmask"):
        assert result[key] > 0
    for c in result["configs"].values():  # the memory in use when a forward ended, within the peak
        assert 0 < c["after_forward_bytes"] <= c["peak_bytes"]


@pytest.mark.parametrize("config,targets", [("lora_qv8", {"query", "value"}),
                                            ("lora_all32", {"query", "key", "value", "dense"})])
def test_benchmark_lora_trains_adapters_and_head_only(config, targets):
    """LoRA on a sequence classifier: adapters on the chosen projections plus PEFT's trained copy of
    the head; nothing else trainable; the breakdown's diff state is exactly those new tensors."""
    bench = _bench_module()
    model = bench.build_model("tiny")
    batch = bench.make_batch(model, 2, 16, torch.device("cpu"))
    module, opt, params = bench.setup(config, model, "fused")
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert {n for n in names if "lora_" not in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias"}
    lora_targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_" in n}
    assert lora_targets == targets
    assert not any("classifier" in n and "lora_" in n for n in names)  # the head is trained, not adapted
    r = bench.LORA[config]["r"]
    assert all(min(p.shape) == r for n, p in module.named_parameters() if "lora_" in n)
    module(**batch).loss.backward()
    opt.step()
    b = bench._breakdown(module, model, opt, params)
    assert b["diff_state"] == b["gradients"] == sum(p.numel() * 4 for p in params)
    assert b["optimizer_state"] >= 2 * b["gradients"]


def test_benchmark_llama_tiny_causal_lm():
    """llama-tiny is a causal LM trained on labels = input_ids (loss about ln(vocab) at random init);
    LoRA on it takes task type CAUSAL_LM: adapters on every linear layer but lm_head, no head trained."""
    bench = _bench_module()
    model = bench.build_model("llama-tiny")
    assert bench.is_causal_lm(model) and not bench.is_causal_lm(bench.build_model("tiny"))
    batch = bench.make_batch(model, 2, 16, torch.device("cpu"))
    assert torch.equal(batch["labels"], batch["input_ids"])
    with torch.no_grad():
        loss = float(model(**batch).loss)
    assert abs(loss - math.log(model.config.vocab_size)) < 0.5
    module, opt, params = bench.setup("lora_all32", model, "fused")
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    losses = []
    for _ in range(3):
        out = module(**batch)
        losses.append(float(out.loss.detach()))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(loss, rel=1e-5)  # B starts at zero: LoRA begins at the base model
    assert losses[-1] < losses[0]


def test_benchmark_bf16_llama_keeps_bf16_weights_and_each_configurations_own_state():
    """--dtype bf16 (the GPU rows): the model's weights in bf16 for every method; the lean L0 stage with
    bf16 moments keeps w in fp32, alpha and every moment in bf16, and trains."""
    bench = _bench_module()

    class Args:
        dtype = "bf16"

    model = bench.build_model("llama-tiny").to(dtype=bench._dtype(Args))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = bench.make_batch(model, 2, 16, torch.device("cpu"))
    module, opt, params = bench.setup("l0_lean_m16", model, "fused")
    ws = [p for n, p in module.named_parameters() if n.endswith(".w")]
    alphas = [p for n, p in module.named_parameters() if n.endswith(".alpha")]
    assert ws and all(p.dtype == torch.float32 for p in ws) and all(p.dtype == torch.bfloat16 for p in alphas)
    assert all(t.dtype == torch.bfloat16 for t in module._theta().values())
    before = [p.detach().clone() for p in ws]
    for _ in range(2):
        module(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert any(not torch.equal(a, b) for a, b in zip(before, ws))
    state = opt.state
    assert {state[p]["exp_avg"].dtype for p in ws + alphas} == {torch.bfloat16}


def test_benchmark_lora_qv_targets_by_module_name():
    """lora_qv8 finds the query/value pair by module name: BERT's query/value, Llama's q_proj/v_proj."""
    bench = _bench_module()
    pm = bench.lora_model("lora_qv8", bench.build_model("llama-tiny"))
    assert set(pm.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    pm = bench.lora_model("lora_qv8", bench.build_model("tiny"))
    assert set(pm.peft_config["default"].target_modules) == {"query", "value"}


def test_benchmark_ratio_keys_for_every_configuration():
    bench = _bench_module()
    one = {"step_time_ratio": 1.5, "cpu_time_ratio": 1.4, "peak_memory_ratio": 0.5}
    keys = bench.ratio_keys({"full": {}, "l0": one, "fixed": one, "lora_all32": one})
    for suffix in ("l0", "fixmask", "lora_all32"):
        for metric in ("step_time_ratio", "cpu_time_ratio", "peak_memory_ratio"):
            assert keys[f"{metric}_{suffix}"] == one[metric]
    assert len(keys) == 9


def _cli(*args):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_cost.py"), *args, "--batch", "2", "--seq-len", "16",
         "--warmup", "1", "--steps", "1", "--rounds", "1", "--parallel-start", "--json-only"],
        capture_output=True, text=True, timeout=300, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # worker subprocesses: each imports torch, transformers and peft (tens of seconds)
def test_benchmark_cli_tiny_lora_ratios():
    result = _cli("--model", "tiny", "--configs", "full", "lora_qv8", "lora_all32")
    for cfg in ("lora_qv8", "lora_all32"):
        for metric in ("step_time_ratio", "peak_memory_ratio"):
            assert result[f"{metric}_{cfg}"] > 0
        b = result["configs"][cfg]["breakdown"]
        assert b["diff_state"] == b["gradients"] > 0
    assert result["configs"]["lora_qv8"]["trainable"] < result["configs"]["lora_all32"]["trainable"]
    for cfg in ("full", "lora_qv8", "lora_all32"):  # the memory in use when a forward ended, within the peak
        c = result["configs"][cfg]
        assert 0 < c["after_forward_bytes"] <= c["peak_bytes"]
    assert result["configs"]["lora_all32"]["trainable"] < result["configs"]["full"]["trainable"]


@pytest.mark.slow
def test_benchmark_cli_llama_tiny_full_and_lora():
    result = _cli("--model", "llama-tiny", "--configs", "full", "lora_all32", "--live-memory")
    assert result["step_time_ratio_lora_all32"] > 0 and result["peak_memory_ratio_lora_all32"] > 0
    assert result["memory"] == "live tensors (--live-memory)"
    assert result["configs"]["lora_all32"]["trainable"] == 65536  # 2 layers x 7 projections x r 32 x (in + out)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_benchmark_base_holds_a_memory_mapped_checkpoint(tmp_path):
    """A safetensors checkpoint loads memory-mapped: its weights only become resident when read. The
    worker reads them before taking its base, so they do not land in the first step's peak."""
    from safetensors.torch import load_file, save_file

    bench = _bench_module()
    save_file({f"w{i}": torch.randn(512, 1024) for i in range(8)}, tmp_path / "w.safetensors")  # 16 MiB
    model = torch.nn.Module()
    for name, t in load_file(tmp_path / "w.safetensors").items():
        model.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    before = _rss_file_kib()
    bench._make_resident(model)
    assert _rss_file_kib() - before > 0.9 * 16 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_benchmark_live_memory_returns_freed_tensors():
    """--live-memory: once a large block has been freed, glibc serves 256 KiB tensors from its heap and
    keeps part of them resident after they are freed (8 MiB of 64 on this machine without the option);
    with --live-memory each is mapped on its own and the resident set is back where it was, so a peak
    counts live tensors only."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); import train_cost as tc\n"
        "tc._map_large_allocations()\n"
        "rss = lambda: tc._status_kib('VmRSS')\n"
        "big = torch.ones(1 << 20); del big\n"  # a freed 4 MiB block raises glibc's dynamic mmap threshold
        "before = rss(); ts, pins = [], []\n"
        "for _ in range(256): ts.append(torch.ones(64 * 1024)); pins.append(torch.ones(16))\n"
        "grown = rss() - before; del ts\n"
        "print(grown, rss() - before)\n" % str(REPO / "benchmarks"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    grown, left = map(int, out.stdout.split())
    assert grown > 60 * 1024 and left < 1024, (grown, left)


def test_benchmark_profiles_are_grouped_by_model_and_shape(tmp_path):
    """Profiles of one model at two shapes get a section each; a file that grouped them by model alone
    (before 2026-12-07) is regrouped on the next write."""
    bench = _bench_module()

    def prof(cfg, batch, seq):
        return {"profile": cfg, "model": "minilm", "batch": batch, "seq_len": seq, "threads": 1, "profile_steps": 2,
                "command": f"cmd {cfg} {batch}", "date": "d", "ms_per_step": {"forward": 1.0, "backward": 2.0},
                "top_ops": []}

    (tmp_path / "train_cost.json").write_text(json.dumps({"runs": {}, "profiles": {"minilm": {"full": prof("full", 32, 128)}}}))
    bench.write_results(profile=prof("candidates", 8, 64), results_dir=tmp_path)
    data = json.loads((tmp_path / "train_cost.json").read_text())
    assert data["profiles"] == {"minilm batch 32 x 128": {"full": prof("full", 32, 128)},
                                "minilm batch 8 x 64": {"candidates": prof("candidates", 8, 64)}}
    md = (tmp_path / "train_cost.md").read_text()
    assert "### minilm: batch 32, sequence length 128" in md and "### minilm: batch 8, sequence length 64" in md


def test_benchmark_memory_split_shows_the_memory_after_forward_only_where_measured():
    """The split table gets an "in use after forward" column when a run measured it, "-" for a configuration
    without it, and no column for runs recorded before it existed."""
    bench = _bench_module()

    def run(after):
        full = {"trainable": 10, "peak_bytes": 3 << 20, "breakdown": {"diff_state": 0, "gradients": 1 << 20,
                                                                      "optimizer_state": 2 << 20}}
        lean = dict(full, step_time_s=2.0, step_time_ref_s=1.0, step_time_ratio=2.0, cpu_time_ratio=2.0,
                    step_time_ratio_rounds=[2.0], peak_memory_ratio=1.5, peak_bytes=(9 << 19))
        full["step_time_s"] = 1.0
        if after is not None:
            full["after_forward_bytes"] = after
        return {"model": "tiny", "batch": 2, "seq_len": 16, "device": "cpu", "threads": 1, "seconds": 1.0,
                "adamw": "fused", "rounds": 1, "steps_per_round": 1, "configs": {"full": full, "l0_lean": lean}}

    with_column = bench.render_md({"runs": {"a": run(5 << 20)}, "profiles": {}})
    assert "in use after forward |" in with_column
    assert "| full finetuning (AdamW) | 0 | 1 | 2 | 0 | 3 | 5 |" in with_column
    assert "| 4 | - |" in with_column  # l0_lean: 4.5 MiB peak shown rounded, its after-forward not measured
    assert "in use after forward" not in bench.render_md({"runs": {"a": run(None)}, "profiles": {}})


def test_benchmark_lean_factored_keeps_two_bytes_of_moments_per_matrix_entry():
    """l0_lean_factored: w's and alpha's matrices keep a bf16 first moment and the row and column sums only;
    vectors (biases, LayerNorm) bf16 moments; the breakdown counts exactly that."""
    bench = _bench_module()
    model = bench.build_model("tiny")
    batch = bench.make_batch(model, 2, 16, torch.device("cpu"))
    module, opt, params = bench.setup("l0_lean_factored", model, "fused")
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        module(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(not torch.equal(a, b) for a, b in zip(before, params) if a.dim() >= 2)
    slot_params = {id(p) for p in module.slots.parameters()}
    expected = 0
    for p in params:
        if id(p) not in slot_params:  # the head: torch's fp32 moments
            expected += 8 * p.numel() + 4
        elif p.dim() >= 2:
            expected += 2 * p.numel() + 4 * (p.numel() // p.shape[-1] + p.shape[-1]) + 4
        else:
            expected += 4 * p.numel() + 4
    assert bench._breakdown(module, model, opt, params)["optimizer_state"] == expected
