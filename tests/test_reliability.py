"""The probes of the reliability issue, each as a test: settings that cannot work fail before training,
ambiguous labels are refused and an explicit --task-type decides, a bad --base-model is one line, resume
without a checkpoint is said or refused, the CLI has --allow-base-mismatch, the whole run's ETA."""

from __future__ import annotations

import json
import time

import pytest

from diffprune import BaseModelMismatchError, DiffModel, DiffPruningConfig, MultiTaskModel, SparseDiff
from diffprune.errors import ConfigError
from diffprune.tasks import DataError, load_task
from diffprune.training import Phase, Position, TrainConfig, TrainError, train
from diffprune.training.progress import RunClock as _RunClock

from .conftest import tiny_sequential
from .helpers_cli import cli, fast_args, glue, one_thread, tiny_base  # noqa: F401
from .serving_fixtures import serving_env  # noqa: F401


def _labels_csv(path, labels):
    path.write_text("text,label\n" + "".join(f"sentence {i},{v}\n" for i, v in enumerate(labels)), encoding="utf-8")
    return path


# 1. a budget of 0 entries is known before any training ------------------------------------------------------
def test_a_budget_of_zero_entries_fails_before_training(tmp_path, tiny_base, glue):
    with pytest.raises(ConfigError, match=r"keeps round\(1e-09 \* [\d,]+\) = 0 .* raise it to at least"):
        DiffModel(tiny_sequential(), DiffPruningConfig(target_sparsity=1e-9))
    out = tmp_path / "q"
    t0 = time.monotonic()
    code, _, err = cli(*fast_args(tiny_base, out, "--task", "rte", "--data-dir", glue, "--max-train-samples", 16,
                                  "--target-sparsity", 1e-9), check=False)
    assert code == 2 and "--target-sparsity" in err and "raise it to at least" in err
    assert err.strip().splitlines()[-1].startswith("diffprune train: error: target_sparsity=1e-09") and "Traceback" not in err
    assert not out.exists()  # nothing written: no run, no checkpoint
    assert time.monotonic() - t0 < 60


# 2. labels: inferred, and what was inferred is said; ambiguous ones refused; --task-type decides --------------
def test_mostly_integer_labels_with_a_few_floats_are_refused_naming_the_lines(tmp_path):
    labels = [i % 2 for i in range(40)]
    labels[7] = 1.5
    f = _labels_csv(tmp_path / "t.csv", labels)
    with pytest.raises(DataError, match=r"integer class ids except 1 of 40 \(1\.5 on line\(s\) 9\).*--task-type"):
        load_task(train_file=f, validation_file=f, text_columns=["text"])
    reg = load_task(train_file=f, validation_file=f, text_columns=["text"], task_type="regression")
    assert reg.spec.is_regression and reg.train["labels"][7] == 1.5
    assert reg.source["task_type_from"] == "given (--task-type regression)"
    cls = load_task(train_file=f, validation_file=f, text_columns=["text"], task_type="classification")
    assert cls.spec.labels == ("0", "1", "1.5") and cls.spec.task_type == "classification"


def test_task_type_inference_is_recorded(tmp_path):
    ints = _labels_csv(tmp_path / "ints.csv", [0, 1, 1, 0])
    d = load_task(train_file=ints, validation_file=ints, text_columns=["text"])
    assert d.spec.task_type == "classification" and d.source["task_type"] == "classification"
    assert d.source["task_type_from"] == "inferred: the labels are 2 integer class ids (0, 1)"
    floats = _labels_csv(tmp_path / "floats.csv", [0.5, 3.25, 1.0, 4.8])
    d = load_task(train_file=floats, validation_file=floats, text_columns=["text"])
    assert d.spec.is_regression and d.source["task_type_from"].startswith("inferred: 3 of 4 labels are non-integer")
    whole = _labels_csv(tmp_path / "whole.csv", ["1.0", "2.0", "1.0"])
    with pytest.raises(DataError, match="whole number but some are written as decimals.*--task-type"):
        load_task(train_file=whole, validation_file=whole, text_columns=["text"])
    with pytest.raises(DataError, match="contradicts GLUE rte, a classification task"):
        load_task("rte", "/nonexistent", task_type="regression")


def test_train_says_what_it_inferred_first_and_records_it(tmp_path, tiny_base):
    f = _labels_csv(tmp_path / "t.csv", [i % 2 for i in range(16)])
    out = tmp_path / "run"
    args = [a for a in fast_args(tiny_base, out) if a != "--no-progress"]  # with progress: what a user sees
    code, _, err = cli(*args, "--train-file", f, "--validation-file", f, "--text-columns", "text",
                       "--epochs", 1, "--fixmask-epochs", 0, "--target-sparsity", 0.05)
    assert err.splitlines()[0] == "task run: classification (inferred: the labels are 2 integer class ids (0, 1))"
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["task_type"] == "classification"
    assert run["data"]["task_type_from"].startswith("inferred")
    assert run["settings"]["task_type"] is None


# 3. a bad --base-model is one line -----------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["no/such/folder", "./missing-model", "nosuchorg/nosuchmodel"])
def test_serve_with_a_bad_base_model_is_one_line(serving_env, base, capsys):
    from diffprune.cli import main

    assert main(["serve", str(serving_env["runs"]["sent"]), "--base-model", base, "--port", "0"]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "error" in x]
    assert len(line) == 1 and f"cannot load model {base!r}" in line[0] and "Traceback" not in err


# 6. --resume without a checkpoint ----------------------------------------------------------------------------------
def test_resume_without_any_run_is_refused_and_a_run_without_checkpoint_is_said(tmp_path, tiny_base, glue, capsys):
    kw = dict(task="rte", data_dir=str(glue), model=str(tiny_base), max_train_samples=16, max_eval_samples=8,
              epochs=1, fixmask_epochs=0, batch_size=16, max_seq_length=32, save_steps=0, resume=True)
    with pytest.raises(TrainError, match="no run in .* to resume .* leave out --resume"):
        train(TrainConfig(output_dir=str(tmp_path / "typo"), **kw))
    assert not (tmp_path / "typo").exists()
    started = tmp_path / "started"  # a run killed before its first checkpoint: run.json only
    started.mkdir()
    (started / "run.json").write_text(json.dumps({"format": "diffprune.run", "status": "training"}))
    train(TrainConfig(output_dir=str(started), progress=True, **kw))
    err = capsys.readouterr().err
    assert "has no checkpoint yet (the run stopped before its first one); starting from the beginning" in err
    assert (started / "metrics.json").exists()


# 7. --allow-base-mismatch on the command line ------------------------------------------------------------------------
def test_cli_allow_base_mismatch(serving_env, tmp_path):
    diff = SparseDiff.load(serving_env["foreign"])
    diff.extra = {**diff.extra, "base_model": str(serving_env["base"])}  # names a base it was not trained on
    run = tmp_path / "mismatched"
    diff.save(run)
    code, _, err = cli("predict", run, "--text", "hello", check=False)
    assert code == 2 and "different base model" in err and "--allow-base-mismatch (command line)" in err
    code, out, _ = cli("predict", run, "--text", "hello", "--allow-base-mismatch")
    assert code == 0 and json.loads(out)["label"] in ("negative", "positive")
    with pytest.raises(BaseModelMismatchError, match="--allow-base-mismatch on the command line"):
        MultiTaskModel(str(serving_env["base"])).add_task("m", run)
    mtm = MultiTaskModel(str(serving_env["base"]), allow_base_mismatch=True)
    assert mtm.add_task("m", run)["name"] == "m"
    code, _, err = cli("merge", run, "--output-dir", tmp_path / "merged", check=False)
    assert code == 2 and "--allow-base-mismatch" in err


# 8. the whole run's ETA -----------------------------------------------------------------------------------------------
def test_run_clock_counts_every_phase_and_validation():
    phases = [Phase("l0", 3, 1e-4), Phase("fixed", 3, 5e-4)]
    pos = Position()
    clock = _RunClock(phases, steps_per_epoch=10, pos=pos, has_projection=True)
    assert clock.total_steps == 60 and clock.total_evals == 7 and clock.eta(pos) is None
    pos.global_step, pos.train_seconds = 10, 20.0  # 2 s a step, no validation timed yet
    assert clock.eta(pos) == pytest.approx(50 * 2.0)
    pos.epoch_records.append({"phase": "l0", "epoch": 1})
    pos.eval_seconds = 5.0  # one validation took 5 s: 6 more to come
    assert clock.eta(pos) == pytest.approx(50 * 2.0 + 6 * 5.0)
    resumed = _RunClock(phases, 10, pos, True)  # a resumed process measures its own pace
    assert resumed.eta(pos) is None
    assert "60 steps in all (l0 3 x 10, fixed 3 x 10 epochs x steps) and 7 validations" == clock.describe(phases, 10)


# memory that cannot fit is refused before training (issue 16's "estimate its state before it starts") ----------
def test_training_state_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, tiny_base, glue, monkeypatch):
    from diffprune.training import memory
    from diffprune.methods import get_method

    assert get_method("structured").state_bytes_per_parameter() == 36
    assert get_method("magnitude").state_bytes_per_parameter() == 20
    assert get_method("full").state_bytes_per_parameter() == 12
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    out = tmp_path / "big"
    cfg = TrainConfig(output_dir=str(out), task="rte", data_dir=str(glue), model=str(tiny_base), max_train_samples=16,
                      epochs=1, fixmask_epochs=0, progress=False)
    # 34.3 MiB of state, of which 7.6 MiB gradients (8 bytes per diffed parameter, 4 per head one), which backward
    # makes as it frees the 9.2 MiB of activations: 34.3 + 9.2 - 7.6 = 35.9
    with pytest.raises(TrainError, match=r"--method structured needs about 35.9 MiB: 34.3 MiB of training state \(36 bytes "
                       r"for each of the 999,072 diffed parameters, 12 for each of the 66 head parameters\) \+ about 9.2 MiB "
                       r"of activations at batch 8 x 128 - 7.6 MiB \(the state's gradients are made in backward as the "
                       r"activations and effective weights are freed\), and 0.0 MiB is available; --memory lean: about 26.4 MiB; "
                       r"--memory lean --w-dtype bf16: about 20.7 MiB; --memory lean --moments-dtype factored: about "
                       r"18.8 MiB; --memory lean --candidates 0.05: about 11.2 MiB.*--skip-memory-check"):
        train(cfg)
    assert not out.exists()
    cfg.check_memory = False
    train(cfg)
    assert (out / "metrics.json").exists()
