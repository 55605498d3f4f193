"""`--stop-after l0` / `--from-l0`: one L0 stage feeds several budgets. A run started from another
run's L0 state must be the run that would have gone straight on (same diff, bit for bit), and every
setting that shapes the L0 stage must be refused when it differs."""

import json

import pytest

from diffprune import SparseDiff
from diffprune.errors import ConfigError
from diffprune.training import TrainConfig, TrainError, train

from .helpers_cli import assert_same_diff, cli, glue, one_thread, tiny_base  # noqa: F401

FAST = dict(max_train_samples=48, max_eval_samples=24, epochs=2, fixmask_epochs=1, batch_size=16, max_seq_length=32,
            progress=False, save_steps=0, task="rte")


def _cfg(tmp_path, base, glue_dir, name, **kw):
    return TrainConfig(**{**FAST, "output_dir": str(tmp_path / name), "data_dir": str(glue_dir), "model": str(base),
                          **kw})


@pytest.mark.parametrize("method", ["structured", "magnitude"])
def test_from_l0_equals_the_straight_run_at_every_budget(method, tmp_path, tiny_base, glue):
    stopped = train(_cfg(tmp_path, tiny_base, glue, "l0", method=method, stop_after="l0"))
    l0_dir = tmp_path / "l0"
    assert stopped["stopped_after"] == "l0" and (l0_dir / "checkpoint" / "latest.json").exists()
    assert not (l0_dir / "metrics.json").exists() and not (l0_dir / "diff.safetensors").exists()
    log = [json.loads(x) for x in (l0_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "stop" and not any(r.get("event") == "project" for r in log)
    assert log[-1]["peak_memory_bytes"] == stopped["peak_memory_bytes"] > 0

    for t in (0.01, 0.05):
        straight = train(_cfg(tmp_path, tiny_base, glue, f"straight-{t}", method=method, target_sparsity=t))
        forked = train(_cfg(tmp_path, tiny_base, glue, f"fork-{t}", method=method, target_sparsity=t,
                            from_l0=str(l0_dir)))
        assert forked["nnz"] == straight["nnz"] == round(t * straight["n_diffed"])
        assert forked["final"] == straight["final"] and forked["epochs"] == straight["epochs"]
        assert forked["after_projection"] == straight["after_projection"]
        assert_same_diff(tmp_path / f"straight-{t}", tmp_path / f"fork-{t}")
        assert forked["settings"]["from_l0"] == str(l0_dir)
        events = [json.loads(x)["event"] for x in (tmp_path / f"fork-{t}" / "train_log.jsonl").read_text().splitlines()
                  if "event" in json.loads(x)]
        assert events[:2] == ["start", "from_l0"] and "project" in events
    # the L0 run itself is untouched by its forks and resumes to the end of the run it would have been
    straight = train(_cfg(tmp_path, tiny_base, glue, "straight-0.005", method=method))
    done = train(_cfg(tmp_path, tiny_base, glue, "l0", method=method, resume=True))
    assert done["final"] == straight["final"] and not (l0_dir / "checkpoint").exists()
    assert_same_diff(l0_dir, tmp_path / "straight-0.005")


def test_from_l0_refuses_what_would_change_the_l0_stage(tmp_path, tiny_base, glue):
    train(_cfg(tmp_path, tiny_base, glue, "l0", method="structured", stop_after="l0"))
    src = str(tmp_path / "l0")
    for change, named in ((dict(lr=3e-4), "lr=0.0001"), (dict(seed=1), "seed=0"), (dict(epochs=1), "epochs=2"),
                          (dict(method="diff"), "method='structured'")):
        out = tmp_path / f"bad-{named}"
        with pytest.raises(TrainError, match=f"written with {named}.*--from-l0 may change only target_sparsity"):
            train(_cfg(tmp_path, tiny_base, glue, out.name, **{"method": "structured", **change}, from_l0=src))
        assert not out.exists()  # refused before anything is written
    # a run whose checkpoint is not at the L0 boundary, a finished run, a method without an L0 stage
    finished = _cfg(tmp_path, tiny_base, glue, "finished", method="structured", epochs=1)
    train(finished)
    with pytest.raises(TrainError, match="holds no checkpoint .*finished run.*--stop-after l0"):
        train(_cfg(tmp_path, tiny_base, glue, "x", method="structured", epochs=1, from_l0=str(tmp_path / "finished")))
    with pytest.raises(ConfigError, match="--from-l0 needs a method with an L0"):
        _cfg(tmp_path, tiny_base, glue, "y", method="full", from_l0=src).validate()
    with pytest.raises(ConfigError, match="no such run directory"):
        _cfg(tmp_path, tiny_base, glue, "y", method="structured", from_l0=str(tmp_path / "nope")).validate()
    with pytest.raises(ConfigError, match="use one of them"):
        _cfg(tmp_path, tiny_base, glue, "y", method="structured", from_l0=src, stop_after="l0").validate()


def test_budget_sweep_through_the_cli(tmp_path, tiny_base, glue):
    common = ["--task", "rte", "--data-dir", str(glue), "--model", str(tiny_base), "--method", "structured",
              "--max-train-samples", "32", "--max-eval-samples", "16", "--epochs", "1", "--fixmask-epochs", "1",
              "--batch-size", "16", "--max-seq-length", "32", "--no-progress"]
    _, out, _ = cli("train", *common, "--stop-after", "l0", "--output-dir", tmp_path / "l0")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_after"] == "l0" and summary["l0_score"] is not None
    assert summary["checkpoint"].startswith(str(tmp_path / "l0" / "checkpoint"))
    for t in (0.01, 0.02):
        _, out, _ = cli("train", *common, "--from-l0", tmp_path / "l0", "--target-sparsity", t,
                        "--output-dir", tmp_path / str(t))
        diff = SparseDiff.load(tmp_path / str(t))
        assert json.loads(out.strip().splitlines()[-1])["nnz"] == diff.nnz == round(t * diff.n_diffed)
    code, _, err = cli("train", *common, "--lr", "0.01", "--from-l0", tmp_path / "l0", "--output-dir",
                       tmp_path / "bad", check=False)
    assert code == 2 and "--from-l0 may change only" in err and not (tmp_path / "bad").exists()
