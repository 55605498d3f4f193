"""Model families: what kind of model a run trains, and how a base checkpoint of that kind is loaded.

    from diffprune.families import get_family, family_of_info
    fam = get_family("causal-lm")      # fam.auto_class == "AutoModelForCausalLM"

* ``classifier``  ``AutoModelForSequenceClassification``: a new task head (trained densely, stored
                  whole) on an encoder or decoder; classification or regression (`diffprune.tasks`).
* ``causal-lm``   ``AutoModelForCausalLM`` of a decoder-only model: no new head (the LM head, tied or
                  not, is frozen or diffed like any other tensor); prompt/completion, chat or plain-text
                  data (`diffprune.lmdata`), loss on completion tokens only.

A run records its family in its task metadata (``task_info["family"]``; runs made before families
existed are classifiers). The training loop, `load_run`, `predict`, `merge` and the server ask the
family; adding one is one entry in `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

CLASSIFIER = "classifier"
CAUSAL_LM = "causal-lm"
GENERATION = "generation"
"""The task_type of causal-LM runs (classifier runs: classification or regression)."""


@dataclass(frozen=True)
class Family:
    """How runs of one model family load their data and base, batch, score and describe themselves."""

    name: str
    auto_class: str
    """The transformers Auto class a base checkpoint of this family is loaded with."""
    description: str
    has_head: bool
    """Whether the family adds a freshly initialised task head (trained densely, stored whole)."""

    def auto(self):
        import transformers

        return getattr(transformers, self.auto_class)

    # ---- training ---------------------------------------------------------------------------------
    def check_model(self, base_model: str) -> None:
        """Refuse a base model this family cannot train, before any weights are read."""

    def load_data(self, cfg, name: str):
        """`TaskData` (spec, train, validation, source) of a TrainConfig."""
        raise NotImplementedError

    def load_base(self, base_model: str, spec, seed: int):
        """(model, tokenizer, names of newly initialised parameters) for a task."""
        raise NotImplementedError

    def encode(self, tokenizer, split, spec, max_seq_length: int):
        raise NotImplementedError

    def collate(self, encoded, indices, pad_token_id: int, spec) -> dict:
        raise NotImplementedError

    def evaluate(self, model, encoded, spec, *, tokenizer, batch_size: int, pad_token_id: int, device,
                 indices, cfg) -> dict:
        """Partial validation results of `indices` (`combine` turns every process's parts into metrics)."""
        raise NotImplementedError

    def combine(self, parts: list, encoded, spec) -> dict:
        raise NotImplementedError

    def score(self, spec, metrics: dict) -> float:
        from .metrics import score_of

        return score_of(spec, metrics)

    def selection(self, model, missing: list[str], cfg) -> dict:
        """`DiffPruningConfig` keyword arguments choosing what is diffed, trained densely (head) and frozen."""
        raise NotImplementedError

    def task_info(self, spec, base_model: str, max_seq_length: int, method: str, data) -> dict:
        return {
            "base_model": base_model,
            "task": spec.name,
            "task_type": spec.task_type,
            "labels": list(spec.labels),
            "text_columns": list(spec.text_columns),
            "max_seq_length": int(max_seq_length),
            "method": method,
            "label_column": spec.label_column,
            "glue": bool(spec.glue),
            "family": self.name,
        }


@dataclass(frozen=True)
class ClassifierFamily(Family):
    def load_data(self, cfg, name):
        from .tasks import load_task

        return load_task(cfg.task, cfg.data_dir, cfg.train_file, cfg.validation_file, cfg.text_columns,
                         cfg.label_column, cfg.max_train_samples, cfg.max_eval_samples, name, task_type=cfg.task_type)

    def load_base(self, base_model, spec, seed):
        from .runs import load_base

        return load_base(base_model, spec.num_labels, spec.labels, spec.task_type, seed=seed)

    def encode(self, tokenizer, split, spec, max_seq_length):
        from .batching import encode_dataset

        return encode_dataset(tokenizer, split, spec.text_columns, max_seq_length)

    def collate(self, encoded, indices, pad_token_id, spec):
        from .batching import collate

        return collate(encoded, indices, pad_token_id, spec.is_regression)

    def evaluate(self, model, encoded, spec, *, tokenizer, batch_size, pad_token_id, device, indices, cfg):
        from .batching import predict_outputs

        outputs = predict_outputs(model, encoded, pad_token_id, batch_size, indices=indices, device=device)
        return list(indices), outputs.tolist()

    def combine(self, parts, encoded, spec):
        from .metrics import task_metrics

        merged: dict[int, list] = {}
        for idx, outs in parts:
            merged.update(zip(idx, outs))
        return task_metrics(spec, [merged[i] for i in range(len(encoded))], encoded.labels)

    def selection(self, model, missing, cfg):
        import re

        from .config import DEFAULT_HEAD_PATTERNS

        out = {"head_parameters": list(DEFAULT_HEAD_PATTERNS) + [re.escape(n) for n in missing]}
        if getattr(cfg, "target_modules", None) is not None:
            out["diff_parameters"] = list(cfg.target_modules)
        return out


@dataclass(frozen=True)
class CausalLMFamily(Family):
    def check_model(self, base_model):
        from .errors import ConfigError
        from .runs import model_config

        config = model_config(base_model)
        if not is_decoder_only(config):
            raise ConfigError(
                f"--model {base_model} is a {getattr(config, 'model_type', '?')} model, not a decoder-only causal LM; "
                "prompt/completion, messages and text data train a decoder-only --model (Llama, Qwen2, Mistral, "
                "GPT-2, ...). To classify with this model give labelled data (--text-columns / --label-column)"
            )

    def load_data(self, cfg, name):
        """Prompt/completion, messages or text rows: the validation file in the training file's shape."""
        from pathlib import Path

        from .lmdata import read_lm_file
        from .tasks import DataError, TaskData, TaskSpec

        if cfg.train_file is None or cfg.validation_file is None:
            raise DataError("a causal LM trains on --train-file and --validation-file (JSON Lines or CSV/TSV with "
                            "prompt + completion, messages or text)")
        for flag, value in (("--text-columns", cfg.text_columns), ("--label-column", cfg.label_column),
                            ("--task-type", cfg.task_type), ("--data-dir", cfg.data_dir)):
            if value:
                raise DataError(f"{flag} describes classification data; a causal LM's rows are prompt + completion, "
                                "messages or text: leave it out")
        train = read_lm_file(cfg.train_file, "training file", max_rows=cfg.max_train_samples)
        val = read_lm_file(cfg.validation_file, "validation file", fmt=train.format, max_rows=cfg.max_eval_samples)
        refs = train.format != "text"
        spec = TaskSpec(name=name, text_columns=(), label_column="", task_type=GENERATION, labels=(),
                        metrics=("loss", "perplexity") + (("exact_match",) if refs else ()),
                        score_metrics=("exact_match",) if refs else ("perplexity",))
        source = {"train_file": str(Path(cfg.train_file).resolve()),
                  "validation_file": str(Path(cfg.validation_file).resolve()), "format": train.format,
                  "task_type": GENERATION, "task_type_from": f"{train.format} rows in the training file"}
        return TaskData(spec, train, val, source)

    def load_base(self, base_model, spec, seed):
        from .runs import load_base

        return load_base(base_model, seed=seed, family=self.name)

    def encode(self, tokenizer, split, spec, max_seq_length):
        from .lmdata import encode_lm

        return encode_lm(tokenizer, split, max_seq_length)

    def collate(self, encoded, indices, pad_token_id, spec):
        from .lmdata import collate_lm

        return collate_lm(encoded, indices, pad_token_id)

    def evaluate(self, model, encoded, spec, *, tokenizer, batch_size, pad_token_id, device, indices, cfg):
        from .lmeval import lm_partial_metrics

        return lm_partial_metrics(model, encoded, tokenizer, indices, batch_size=batch_size, pad_token_id=pad_token_id,
                                  device=device, max_new_tokens=cfg.generation_max_new_tokens)

    def combine(self, parts, encoded, spec):
        from .lmeval import combine_lm_metrics

        return combine_lm_metrics(parts)

    def score(self, spec, metrics):
        """Exact match x 100 when the validation rows carry references, else the perplexity (lower is better)."""
        if "exact_match" in metrics:
            return 100.0 * float(metrics["exact_match"])
        return float(metrics["perplexity"])

    def selection(self, model, missing, cfg):
        """No head. Diffed by default: every parameter except the token / position embeddings and the LM
        head (tied or not), i.e. the attention and MLP projections and norms of the blocks (README,
        "Causal language models": for a 128k-token vocabulary those tensors are a fifth to a quarter
        of a small model's entries and would take the budget's state for rows that few tasks move)."""
        import re

        out = {"head_parameters": []}
        if getattr(cfg, "target_modules", None) is not None:
            out["diff_parameters"] = list(cfg.target_modules)
        else:
            out["frozen_parameters"] = [re.escape(n) for n in embedding_parameters(model)]
        return out

    def task_info(self, spec, base_model, max_seq_length, method, data):
        info = super().task_info(spec, base_model, max_seq_length, method, data)
        info["data_format"] = data.source.get("format")
        return info


def embedding_parameters(model) -> list[str]:
    """Names of the parameters of a model's embedding modules (token, position) and its output
    embedding (the LM head), tied ones included: what causal-LM diff pruning freezes by default."""
    import torch.nn as nn

    owners = {id(m) for m in model.modules() if isinstance(m, nn.Embedding)}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        owners.add(id(out_emb))
    names = []
    for mname, module in model.named_modules(remove_duplicate=False):
        if id(module) in owners:
            names += [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
    return sorted(set(names))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        ClassifierFamily(CLASSIFIER, "AutoModelForSequenceClassification", "sequence classification / regression", True),
        CausalLMFamily(CAUSAL_LM, "AutoModelForCausalLM", "decoder-only causal language model", False),
    )
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model family {name!r} is not one of {', '.join(FAMILIES)}") from None


def family_or_default(family: Family | None) -> Family:
    return family if family is not None else FAMILIES[CLASSIFIER]


def family_of_info(info: dict | None) -> Family:
    """The family of a run from its task metadata (runs written before families were recorded: classifier)."""
    return get_family((info or {}).get("family") or CLASSIFIER)


def is_decoder_only(config) -> bool:
    """Whether a transformers config is a decoder-only causal LM (Llama, Qwen2, Mistral, GPT-2, ...).

    An encoder with an LM head (BERT's ``BertLMHeadModel``) and encoder-decoders (T5) are not."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return not any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)
    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
