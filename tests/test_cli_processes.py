"""`diffprune train` as real processes: killed with SIGKILL and resumed, and data-parallel over two gloo
ranks started by `accelerate launch`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from diffprune import SparseDiff
from diffprune.training import STEP_SLEEP_ENV, TrainConfig, train

from .helpers_cli import ENV, REPO, glue, one_thread, tiny_base  # noqa: F401

RUN = dict(task="rte", max_train_samples=240, max_eval_samples=32, epochs=2, fixmask_epochs=1, batch_size=8,
           max_seq_length=64, target_sparsity=0.02, seed=0)


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def test_resume_after_kill9_ends_with_the_same_diff(tmp_path, tiny_base, glue):
    ref = train(TrainConfig(output_dir=str(tmp_path / "ref"), data_dir=str(glue), model=str(tiny_base),
                            progress=False, save_steps=0, **RUN))

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffprune", "train", "--data-dir", glue, "--model", tiny_base, "--output-dir", run_dir,
           "--save-steps", "3", "--no-progress", *_flags(RUN)]
    slow = {**ENV, STEP_SLEEP_ENV: "0.05"}  # so that the kill lands mid-run however fast the machine is
    proc = subprocess.Popen([str(c) for c in cmd], env=slow, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    pointer = run_dir / "checkpoint" / "latest.json"
    deadline = time.time() + 240
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err[-2000:]}"
    assert not (run_dir / "metrics.json").exists()

    rerun = subprocess.run([str(c) for c in cmd], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode != 0 and "--resume" in rerun.stderr  # a killed run is not silently replaced

    resumed = subprocess.run([str(c) for c in cmd + ["--resume"]], env=ENV, cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["nnz"] == ref["nnz"]
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" for r in log)
    a, b = SparseDiff.load(tmp_path / "ref"), SparseDiff.load(run_dir)
    assert a.nnz == b.nnz == metrics["nnz"]
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name]), name
        torch.testing.assert_close(a.values[name], b.values[name])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_ranks_stay_in_sync(tmp_path, tiny_base, glue):
    run_dir = tmp_path / "ddp"
    # On CPU, `accelerate launch --cpu --num_processes 2` starts ONE process (its simple launcher);
    # `--multi_gpu` selects the torchrun launcher, which gives two gloo ranks here.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "diffprune", "train", "--data-dir", glue, "--model", tiny_base, "--output-dir", run_dir,
           "--no-progress", "--debug-rank-hashes", *_flags({**RUN, "max_train_samples": 96, "max_seq_length": 32})]
    done = subprocess.run([str(c) for c in cmd], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    ranks = [json.loads((run_dir / "rank-hashes" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["hash"] == ranks[1]["hash"]  # every trainable tensor identical on both ranks
    assert ranks[0]["nnz"] == ranks[1]["nnz"] == metrics["nnz"] == SparseDiff.load(run_dir).nnz
