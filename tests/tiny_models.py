"""Tiny random models built in-process (no download): encoders and decoder-only causal LMs."""

from __future__ import annotations

import torch


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def tiny_causal(kind: str):
    """A tiny random decoder-only LM: "llama", "qwen2" or "gpt2" (GPT-2 ties lm_head to wte)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return tf.LlamaForCausalLM(cfg)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        return tf.GPT2LMHeadModel(cfg)
    raise ValueError(kind)


CAUSAL_KINDS = ("llama", "qwen2", "gpt2")


def causal_batch(model, batch: int = 2, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def bert_batch(model, batch: int = 3, seq: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=g)}
