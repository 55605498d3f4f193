"""The two comparison methods of the accuracy-per-stored-byte benchmark: BitFit (`--method bitfit`, the bias
terms and the head, stored as a sparse diff) and PEFT's SHiRA (`--method shira`, a fixed random sparse
mask on the LoRA targets, r sized to the diff budget), trained on a tiny random BERT and a few RTE rows."""

import json

import pytest
import torch

from diffprune import SparseDiff
from diffprune.methods import BitFitMethod, ShiraMethod, get_method, method_of_artefact, shira_rank
from diffprune.runs import load_run, load_run_base, read_task_info, run_method
from diffprune.training import TrainConfig, train

from .helpers_cli import assert_same_diff, cli, fast_args, glue, one_thread, tiny_base  # noqa: F401
from .tiny_models import tiny_bert

FAST = dict(max_train_samples=32, max_eval_samples=16, epochs=2, batch_size=16, max_seq_length=32, progress=False,
            save_steps=0)
PAIR = (["A cat sat on the mat.", "Nothing at all"], ["An animal sat.", "Something else entirely"])


def _cfg(tmp_path, base, glue_dir, name, **kw):
    return TrainConfig(**{**FAST, "output_dir": str(tmp_path / name), "task": "rte", "data_dir": str(glue_dir),
                          "model": str(base), **kw})


def _bias_names(model, head=("classifier",)):
    """The bias parameters counted independently of the library: every module's registered `bias`."""
    names = []
    for mname, module in model.named_modules():
        b = module._parameters.get("bias")
        if b is not None and not any(mname == h or mname.startswith(h + ".") for h in head):
            names.append(f"{mname}.bias")
    return names


def _capture_trained_logits(monkeypatch, cls, tokenizer_dir):
    """Wrap `cls.save` so the trained model's logits on PAIR are recorded right when the run is saved."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = tok(*PAIR, padding=True, truncation=True, max_length=32, return_tensors="pt")
    seen = {}
    original = cls.save

    def save(self, model, out, tokenizer, extra, cfg):
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(**enc).logits.clone()
        seen["model"] = model
        return original(self, model, out, tokenizer, extra, cfg)

    monkeypatch.setattr(cls, "save", save)
    return seen, enc


def test_registry_entries():
    bitfit, shira = get_method("bitfit"), get_method("shira")
    assert bitfit.artefact == "diff" and not bitfit.use_gates and not bitfit.projects
    assert shira.artefact == "adapter" and shira.peft_type == "SHIRA" and get_method("lora").peft_type == "LORA"
    assert bitfit.default_lr == 1e-3 and shira.default_lr == 1e-3
    cfg = TrainConfig(output_dir="x", method="bitfit", epochs=4, fixmask_epochs=2, target_sparsity=0.003)
    assert [(p.name, p.epochs, p.lr) for p in bitfit.phases(cfg)] == [("fixed", 4, 1e-3)]
    assert bitfit.target_sparsity(cfg) == 1.0
    assert bitfit.state_bytes_per_parameter(cfg) == 0
    assert "BitFit" in bitfit.description and "SHiRA" in shira.description
    # without a run directory to look at, an adapter still loads as lora (the first that writes one)
    assert method_of_artefact("adapter").name == "lora" and method_of_artefact("diff").name == "diff"


def test_bitfit_build_diffs_exactly_the_biases_and_stores_only_changed_entries(tmp_path):
    model = tiny_bert()
    biases = _bias_names(model)
    assert any("LayerNorm" in n for n in biases) and "bert.pooler.dense.bias" in biases
    cfg = TrainConfig(output_dir=str(tmp_path), method="bitfit", target_sparsity=0.001)
    dm = BitFitMethod("bitfit", "", 1e-3).build(model, ["classifier.weight", "classifier.bias"], cfg)
    params = dict(model.named_parameters())
    assert sorted(dm.diff_names) == sorted(biases)
    assert dm.n_diffed == sum(params[n].numel() for n in biases)
    assert set(dm.head_names) == {"classifier.weight", "classifier.bias"}
    assert dm.config.target_sparsity == 1.0 and not dm.config.use_gates
    # nothing but the L0 slots of the biases and the head trains
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert all(n.startswith("slots.") or n.startswith("model.classifier.") for n in trainable)
    dm.project()  # what the loop does before the "fixed" phase: every bias entry is kept
    assert dm.nnz() == dm.n_diffed
    with torch.no_grad():  # change 5 entries of one bias and 3 of another
        dm._slot(biases[0]).values[:5] = 0.5
        dm._slot(biases[-1]).values[-3:] = -0.25
    extra = {"base_model": "x", "task": "t", "task_type": "classification", "labels": ["a", "b", "c"],
             "text_columns": ["s"], "max_seq_length": 16, "method": "bitfit", "family": "classifier"}
    counts = get_method("bitfit").save(dm, tmp_path, None, extra, cfg)
    diff = SparseDiff.load(tmp_path)
    assert counts["nnz"] == diff.nnz == 8 and counts["n_diffed"] == dm.n_diffed == counts["bias_parameters"]
    assert counts["target_sparsity"] == 1.0
    assert counts["trainable_parameters"] == dm.n_diffed + sum(params[n].numel() for n in dm.head_names)
    assert {n for n in diff.indices if diff.nnz_of(n)} == {biases[0], biases[-1]}


def test_bitfit_trains_only_the_biases_and_reloads(tmp_path, tiny_base, glue, monkeypatch):
    seen, enc = _capture_trained_logits(monkeypatch, BitFitMethod, tiny_base)
    m = train(_cfg(tmp_path, tiny_base, glue, "bitfit", method="bitfit", target_sparsity=0.005))
    out = tmp_path / "bitfit"
    info = read_task_info(out)
    base, _ = load_run_base(info)
    base_params = dict(base.named_parameters())
    biases = _bias_names(base)
    n_bias = sum(base_params[n].numel() for n in biases)
    diff = SparseDiff.load(out)
    assert set(diff.shapes) == set(biases) and diff.n_diffed == n_bias == m["n_diffed"]
    assert m["method"] == "bitfit" and m["target_sparsity"] == 1.0 and m["density"] == m["nnz"] / n_bias
    assert [(e["phase"], e["epoch"]) for e in m["epochs"]] == [("fixed", 1), ("fixed", 2)]
    assert m["settings"]["lr"] == 1e-3 and "after_projection" not in m
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["nnz"] for r in log if r.get("event") == "project"] == [n_bias]  # projected once, every entry kept
    # reload: same logits as the trained model
    model, _, loaded_info = load_run(out)
    assert run_method(out) == "diff" and loaded_info["method"] == "bitfit"
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, seen["logits"], rtol=0, atol=1e-6)
    # merged: the non-bias, non-head tensors are the base's bit for bit; nnz = the bias entries that changed
    merged = dict(model.merge_and_unload().named_parameters())
    changed = 0
    for name, p in merged.items():
        if name.startswith("classifier."):
            continue
        if name in biases:
            changed += int((p != base_params[name]).sum())
        else:
            assert torch.equal(p, base_params[name]), name
    assert changed == m["nnz"] == diff.nnz > 0
    assert m["stored_bytes"] == (out / "diff.safetensors").stat().st_size
    assert "BitFit" in (out / "README.md").read_text()


def _targets(model):
    return [m for n, m in model.named_modules() if n.endswith((".query", ".value")) and isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("t, expected_r", [(0.0005, 1), (0.05, 3), (0.1, 6)])
def test_shira_rank_follows_the_budget(tmp_path, t, expected_r):
    pytest.importorskip("peft")
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    targets = _targets(model)
    sum_mn = sum(m.in_features + m.out_features for m in targets)
    r = max(1, round(t * total / sum_mn))
    assert r == expected_r  # (the tiny model's sizes: the formula is checked, not a constant)
    cfg = TrainConfig(output_dir=str(tmp_path), method="shira", target_sparsity=t)
    pm = get_method("shira").build(model, ["classifier.weight", "classifier.bias"], cfg)
    pcfg = pm.peft_config["default"]
    assert pcfg.r == r and pcfg.mask_type == "random" and pcfg.random_seed == 0
    assert set(pcfg.target_modules) == {"query", "value"}
    shira = {n: p for n, p in pm.named_parameters() if p.requires_grad and "shira_" in n}
    assert len(shira) == len(targets) and sum(p.numel() for p in shira.values()) == r * sum_mn
    head = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "shira_" not in n)
    assert head == 16 * 2 + 2  # the classifier (modules_to_save), nothing else


def test_shira_rank_is_capped_where_a_target_layer_is_too_small(capsys):
    pytest.importorskip("peft")
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    # a 16 x 16 target holds at most 16 * 16 // 32 = 8 ranks' entries; t = 0.5 asks for round(0.5 * total / 128)
    assert shira_rank(0.5, total, _targets(model)) == (8, round(0.5 * total / 128))
    cfg = TrainConfig(output_dir="x", method="shira", target_sparsity=0.5)
    pm = get_method("shira").build(model, ["classifier.weight", "classifier.bias"], cfg)
    assert pm.peft_config["default"].r == 8 and "r=8 is used" in capsys.readouterr().err


def test_shira_trains_saves_and_reloads_as_shira(tmp_path, tiny_base, glue, monkeypatch):
    pytest.importorskip("peft")
    import peft

    seen, enc = _capture_trained_logits(monkeypatch, ShiraMethod, tiny_base)
    t = 0.002
    m = train(_cfg(tmp_path, tiny_base, glue, "shira", method="shira", target_sparsity=t))
    out = tmp_path / "shira"
    base, _ = load_run_base(read_task_info(out))
    total = sum(p.numel() for p in base.parameters())
    targets = _targets(base)
    sum_mn = sum(mod.in_features + mod.out_features for mod in targets)
    r = max(1, round(t * total / sum_mn))
    head = 32 * 2 + 2
    assert m["method"] == "shira" and m["shira_r"] == r and m["total_parameters"] == total
    assert m["nnz"] == m["trainable_parameters"] == r * sum_mn + head and m["shira_parameters"] == r * sum_mn
    assert m["stored_bytes"] == (out / "adapter" / "adapter_model.safetensors").stat().st_size
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "SHIRA"
    # the adapter directory loads as shira, not lora
    assert run_method(out) == "shira" and method_of_artefact("adapter", out).name == "shira"
    model, _, info = load_run(out)
    assert info["method"] == "shira" and isinstance(model, peft.PeftModel)
    assert model.peft_config["default"].peft_type == peft.PeftType.SHIRA and model.peft_config["default"].r == r
    assert any(type(mod).__module__.startswith("peft.tuners.shira") for mod in model.modules())
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, seen["logits"], rtol=0, atol=1e-6)
    # the same random mask came back (PEFT stores its indices in the adapter file), with the trained values
    trained = {n: p for n, p in seen["model"].named_parameters() if "shira_weight" in n}
    loaded = dict(model.named_parameters())
    for n, p in trained.items():
        assert torch.equal(loaded[n], p.detach()) and bool((p != 0).any())
    idx = {n: mod.shira_indices["default"] for n, mod in seen["model"].named_modules() if hasattr(mod, "shira_indices")}
    assert idx and all(torch.equal(mod.shira_indices["default"], idx[n])
                       for n, mod in model.named_modules() if hasattr(mod, "shira_indices"))


@pytest.mark.parametrize("method", ["bitfit", "shira"])
def test_train_cli(method, tmp_path, tiny_base, glue):
    if method == "shira":
        pytest.importorskip("peft")
    out = tmp_path / method
    _, stdout, _ = cli(*fast_args(tiny_base, out, "--task", "rte", "--data-dir", glue, "--max-train-samples", 32,
                                  "--max-eval-samples", 16, "--epochs", 1, "--method", method,
                                  "--target-sparsity", 0.002))
    summary = json.loads(stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["method"] == metrics["method"] == method and summary["nnz"] == metrics["nnz"] > 0
    assert (out / ("diff.safetensors" if method == "bitfit" else "adapter")).exists()
    assert run_method(out) == ("diff" if method == "bitfit" else "shira")
    _, stdout, _ = cli("predict", out, "--text", "A man is playing a guitar.", "--text-pair", "A man plays music.")
    (pred,) = [json.loads(x) for x in stdout.splitlines()]
    assert pred["label"] in ("entailment", "not_entailment")
    _, stdout, _ = cli("eval", out, "--max-samples", 16)
    assert json.loads(stdout)["metrics"] == summary["final"]
    # merge: an ordinary checkpoint with the run's predictions
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cli("merge", out, "--output-dir", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    enc = AutoTokenizer.from_pretrained(tmp_path / "merged")(*PAIR, padding=True, return_tensors="pt")
    model, _, _ = load_run(out)
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, model(**enc).logits, rtol=0, atol=1e-5)


def test_bitfit_resumes_from_a_checkpoint(tmp_path, tiny_base, glue, monkeypatch):
    """A bitfit run stopped at a mid-run checkpoint (already in the fixed stage) resumes without projecting
    again, to the same diff as an uninterrupted run."""
    from diffprune.training import TrainError, checkpoints

    kw = dict(method="bitfit", save_steps=1)
    ref = train(_cfg(tmp_path, tiny_base, glue, "ref", **kw))
    real = checkpoints.write_checkpoint

    def stop(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_checkpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, tiny_base, glue, "res", **kw))
    monkeypatch.setattr(checkpoints, "write_checkpoint", real)
    with pytest.raises(TrainError, match="target_sparsity"):  # a resume-key setting, even if bitfit ignores it
        train(_cfg(tmp_path, tiny_base, glue, "res", resume=True, target_sparsity=0.5, **kw))
    res = train(_cfg(tmp_path, tiny_base, glue, "res", resume=True, **kw))
    assert res["nnz"] == ref["nnz"] and res["steps"] == ref["steps"] and res["final"] == ref["final"]
    assert_same_diff(tmp_path / "ref", tmp_path / "res", exact=False)
    log = [json.loads(x) for x in (tmp_path / "res" / "train_log.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "project" for r in log) == 1 and any(r.get("event") == "resume" for r in log)
