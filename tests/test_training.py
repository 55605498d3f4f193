"""`diffprune.training.train` on a tiny random BERT (MiniLM tokenizer) and real RTE / STS-B subsets:
every method, the metrics contract, the output directory rules, checkpoints and data sharding."""

import json
import os

import pytest

from diffprune import SparseDiff
from diffprune.errors import ConfigError
from diffprune.runs import TASK_INFO_KEYS, load_run
from diffprune.training import TrainConfig, TrainError, train
from diffprune.training.distributed import local_indices as _local_indices

from .helpers_cli import assert_same_diff, glue, interrupt_after_checkpoints, one_thread, tiny_base  # noqa: F401

FAST = dict(max_train_samples=48, max_eval_samples=24, epochs=1, fixmask_epochs=1, batch_size=16, max_seq_length=32,
            progress=False, save_steps=0)


def _cfg(tmp_path, base, glue_dir, name, **kw):
    args = dict(FAST, output_dir=str(tmp_path / name), task="rte", data_dir=str(glue_dir), model=str(base))
    args.update(kw)
    return TrainConfig(**args)


@pytest.mark.parametrize("method", ["diff", "structured", "magnitude"])
def test_diff_methods_reach_the_exact_sparsity(method, tmp_path, tiny_base, glue):
    cfg = _cfg(tmp_path, tiny_base, glue, method, method=method, target_sparsity=0.02)
    m = train(cfg)
    out = tmp_path / method
    diff = SparseDiff.load(out)
    assert m["nnz"] == diff.nnz == round(0.02 * diff.n_diffed)
    assert m["stored_bytes"] == os.path.getsize(out / "diff.safetensors")
    for key in ("task", "method", "seed", "final", "score", "epochs", "nnz", "trainable_parameters", "stored_bytes",
                "train_seconds", "base_model"):
        assert key in m
    assert m["method"] == method and m["task"] == "rte" and m["base_model"] == str(tiny_base.resolve())
    assert [(e["phase"], e["epoch"]) for e in m["epochs"]] == [("l0", 1), ("fixed", 1)]
    assert m["final"] == m["epochs"][-1]["metrics"] and m["score"] == pytest.approx(100 * m["final"]["accuracy"])
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    # the keys the serving code relies on
    assert set(TASK_INFO_KEYS) <= set(diff.extra)
    assert diff.extra["labels"] == ["entailment", "not_entailment"] and diff.extra["task_type"] == "classification"
    assert diff.extra["text_columns"] == ["sentence1", "sentence2"] and diff.extra["method"] == method
    assert diff.config.structured == (method == "structured") and diff.config.use_gates == (method != "magnitude")
    # the freshly initialised classifier is the head, so a fresh load of the base has the same fingerprint
    assert set(diff.head) == {"classifier.weight", "classifier.bias"}
    model, _, info = load_run(out)
    assert info["task"] == "rte" and model.nnz() == m["nnz"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[-1]["event"] == "end"
    assert any(r.get("event") == "project" and r["nnz"] == m["nnz"] for r in log)
    assert any("loss" in r and "examples_per_s" in r for r in log)
    assert not (out / "checkpoint").exists()
    card = (out / "README.md").read_text()
    assert diff.base_fingerprint in card and f"{m['nnz']:,}" in card


def test_full_and_lora(tmp_path, tiny_base, glue):
    full = train(_cfg(tmp_path, tiny_base, glue, "full", method="full"))
    assert (tmp_path / "full" / "model" / "config.json").exists()
    assert full["nnz"] == full["trainable_parameters"] == full["total_parameters"]
    assert full["stored_bytes"] == os.path.getsize(tmp_path / "full" / "model" / "model.safetensors")
    assert [e["phase"] for e in full["epochs"]] == ["train"]
    pytest.importorskip("peft")
    lora = train(_cfg(tmp_path, tiny_base, glue, "lora", method="lora"))
    adapter = tmp_path / "lora" / "adapter"
    assert lora["stored_bytes"] == os.path.getsize(adapter / "adapter_model.safetensors")
    # r=8 on query and value of 2 layers (hidden 32) + the classifier (32*2 + 2)
    assert lora["nnz"] == lora["trainable_parameters"] == 2 * 2 * (8 * 32 + 32 * 8) + 66
    model, _, info = load_run(tmp_path / "lora")
    assert info["method"] == "lora" and type(model).__name__.startswith("Peft")


def test_regression_task(tmp_path, tiny_base, glue):
    m = train(_cfg(tmp_path, tiny_base, glue, "stsb", task="stsb", fixmask_epochs=0))
    assert set(m["final"]) == {"pearson", "spearmanr"} and m["task_type"] == "regression"
    # no fixed-mask epochs: the final metrics are those right after projection
    assert m["final"] == m["after_projection"]["metrics"]
    diff = SparseDiff.load(tmp_path / "stsb")
    assert diff.extra["labels"] == [] and diff.head["classifier.weight"].shape == (1, 32)


def test_output_dir_rules(tmp_path, tiny_base, glue):
    cfg = _cfg(tmp_path, tiny_base, glue, "run", epochs=1, fixmask_epochs=0)
    train(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    with pytest.raises(TrainError, match="already exists; pass --overwrite"):
        train(cfg)
    with pytest.raises(TrainError, match="finished run"):
        train(_cfg(tmp_path, tiny_base, glue, "run", epochs=1, fixmask_epochs=0, resume=True))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(TrainError, match="not a diffprune run directory"):
        train(_cfg(tmp_path, tiny_base, glue, "mine", overwrite=True))
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="--method"):
        train(_cfg(tmp_path, tiny_base, glue, "x", method="adapters"))
    with pytest.raises(ConfigError, match="target_sparsity"):
        train(_cfg(tmp_path, tiny_base, glue, "x", target_sparsity=0.0))
    assert not (tmp_path / "x").exists()


def test_checkpoint_and_resume_in_process(tmp_path, tiny_base, glue, monkeypatch):
    """A run stopped right after a mid-epoch checkpoint resumes to the same diff as an uninterrupted run."""
    kw = dict(epochs=2, fixmask_epochs=1, save_steps=2, target_sparsity=0.02, max_train_samples=64)
    ref = train(_cfg(tmp_path, tiny_base, glue, "ref", **kw))

    calls = interrupt_after_checkpoints(monkeypatch, lambda: train(_cfg(tmp_path, tiny_base, glue, "res", **kw)))
    state = json.loads((tmp_path / "res" / "checkpoint" / "latest.json").read_text())
    assert state["dir"] == f"step-{calls[-1]:09d}" and calls == [2, 4]
    with pytest.raises(TrainError, match="written with seed=0, now seed=1"):
        train(_cfg(tmp_path, tiny_base, glue, "res", seed=1, resume=True, **kw))
    # a checkpoint from before group_penalty was recorded was trained with that era's expected_l0,
    # not today's default, so resuming it under the default is refused
    trainer_state = tmp_path / "res" / "checkpoint" / state["dir"] / "trainer_state.json"
    written = trainer_state.read_text()
    old = json.loads(written)
    del old["settings"]["group_penalty"]
    trainer_state.write_text(json.dumps(old))
    with pytest.raises(TrainError, match="written with group_penalty='expected_l0', now group_penalty='per_gate'"):
        train(_cfg(tmp_path, tiny_base, glue, "res", resume=True, **kw))
    trainer_state.write_text(written)
    res = train(_cfg(tmp_path, tiny_base, glue, "res", resume=True, **kw))
    assert res["nnz"] == ref["nnz"] and res["steps"] == ref["steps"] and res["final"] == ref["final"]
    assert_same_diff(tmp_path / "ref", tmp_path / "res", exact=False)
    log = [json.loads(x) for x in (tmp_path / "res" / "train_log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in log if r.get("event") == "resume"] == [4]


def test_the_run_logs_its_memory_estimate_and_peaks(tmp_path, tiny_base, glue, monkeypatch):
    """The memory check's estimate is logged after the start event; each evaluation logs the process's
    peak so far, and metrics.json the run's, which a resumed run carries over from its checkpoint."""
    from diffprune.training import memory

    m = train(_cfg(tmp_path, tiny_base, glue, "run", target_sparsity=0.02))
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in log[:2]] == ["start", "memory_estimate"]
    est = log[1]
    assert est["estimate_bytes"] > 0 and est["in_use_bytes"] > 0 and "diffed parameters" in est["state"]
    assert est["available_bytes"] is None or est["available_bytes"] >= est["estimate_bytes"]
    peaks = [r["peak_memory_bytes"] for r in log if r.get("event") == "eval"]
    assert len(peaks) == 2 and peaks == sorted(peaks) and peaks[0] > 0
    # the resident set's high-water mark of this (test) process, read after the run: not below the run's
    assert peaks[-1] <= m["peak_memory_bytes"] <= memory.peak_bytes("cpu")
    assert log[-1]["event"] == "end" and log[-1]["peak_memory_bytes"] == m["peak_memory_bytes"]
    from diffprune.modelcard import _bytes

    assert f"peak memory {_bytes(m['peak_memory_bytes'])}" in (tmp_path / "run" / "README.md").read_text()

    # a resumed run keeps the larger of its checkpoint's peak and its own
    kw = dict(epochs=2, fixmask_epochs=1, save_steps=2, target_sparsity=0.02, max_train_samples=64)
    interrupt_after_checkpoints(monkeypatch, lambda: train(_cfg(tmp_path, tiny_base, glue, "res", **kw)))
    state = json.loads((tmp_path / "res" / "checkpoint" / "latest.json").read_text())
    trainer_state = tmp_path / "res" / "checkpoint" / state["dir"] / "trainer_state.json"
    saved = json.loads(trainer_state.read_text())
    saved["position"]["peak_memory_bytes"] = 1 << 50  # more than this process will ever reach
    trainer_state.write_text(json.dumps(saved))
    res = train(_cfg(tmp_path, tiny_base, glue, "res", resume=True, **kw))
    assert res["peak_memory_bytes"] == 1 << 50


def test_local_indices_partition_every_global_batch():
    perm = list(range(37))
    for world in (1, 2, 3):
        for step in range(-(-37 // (8 * world))):
            parts = [_local_indices(perm, step, 8, r, world) for r in range(world)]
            assert len({len(p) for p in parts}) == 1  # equal shares, so averaged gradients are exact
            flat = sorted(i for p in parts for i in p)
            expected = perm[step * 8 * world : (step + 1) * 8 * world]
            assert set(expected) <= set(flat) and len(flat) - len(expected) < world
