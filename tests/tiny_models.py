"""Tiny random models built in-process (no download): encoders and decoder-only causal LMs."""

from __future__ import annotations

import torch

from diffprune.tiny import (  # noqa: F401  (the causal models and their tokenizer live in the library)
    CAUSAL_KINDS, QUESTIONS, qa_rows, save_tiny_causal, tiny_causal, tiny_tokenizer)


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def causal_batch(model, batch: int = 2, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def bert_batch(model, batch: int = 3, seq: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=g)}
