"""Tiny random causal LMs with an offline tokenizer: try the causal-LM path with no download.

    python -m diffprune.tiny llama demo/          # demo/model (Llama, 39k parameters) + demo/*.jsonl

writes a random decoder-only model folder (``llama``, ``qwen2`` or ``gpt2`` with tied embeddings)
that ``--model`` loads like any checkpoint, its byte-level BPE tokenizer (trained in-process on a small
corpus) and a small prompt/completion data set. The weights are random: what such a run prints is a
check that the pipeline works, never an accuracy. The test suite builds its causal models here too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CAUSAL_KINDS = ("llama", "qwen2", "gpt2")


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


QUESTIONS = [("is the sky blue", "yes"), ("is fire cold", "no"), ("is a cat an animal", "yes"),
             ("is the dog a fish", "no"), ("is one less than two", "yes"), ("is ice hot", "no")]


def qa_rows(n: int, offset: int = 0) -> list[dict]:
    """n prompt/completion rows of yes/no questions (cycling over six)."""
    return [{"prompt": f"question: {q}? answer:", "completion": f" {a}"}
            for q, a in (QUESTIONS[(i + offset) % len(QUESTIONS)] for i in range(n))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffprune.tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=CAUSAL_KINDS)
    p.add_argument("out", help="folder to write: OUT/model, OUT/train.jsonl, OUT/validation.jsonl")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_tiny_causal(args.kind, out / "model")
    for name, rows in (("train.jsonl", qa_rows(48)), ("validation.jsonl", qa_rows(12, offset=1))):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    n = sum(p.numel() for p in tiny_causal(args.kind, vocab_size=len(tiny_tokenizer())).parameters())
    print(f"wrote a random {args.kind} ({n:,} parameters) to {out / 'model'} and 48 + 12 question/answer rows "
          f"to {out}/train.jsonl, {out}/validation.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
