"""Tiny random models built in-process (no download): encoders and decoder-only causal LMs."""

from __future__ import annotations

import torch


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def tiny_causal(kind: str, vocab_size: int = 101, **config):
    """A tiny random decoder-only LM: "llama", "qwen2" or "gpt2" (GPT-2 ties lm_head to wte)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **config)
        return tf.LlamaForCausalLM(cfg)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **config)
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, **config)
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


# ---- an offline tokenizer and saved tiny causal LMs (what `--model FOLDER` loads) ----------------------
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. question: is the sky blue? answer: yes. "
    "question: is fire cold? answer: no. translate to french: cat -> chat. dog -> chien. "
    "user: hello assistant: hi, how can i help? positive negative great terrible film movie "
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 , . ! ? : ; - > < / ' "
)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained in-process on a small corpus (no download), as a transformers fast
    tokenizer with <pad>, <s> (bos), </s> (eos) and <unk>; 256 byte tokens, the four specials and merges up to `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    return fast


def save_tiny_causal(kind: str, path, chat_template: str | None = None):
    """A tiny random causal LM of `kind` and the offline tokenizer saved as an ordinary model folder."""
    from pathlib import Path

    tok = tiny_tokenizer()
    model = tiny_causal(kind, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    if chat_template is not None:
        tok.chat_template = chat_template
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
