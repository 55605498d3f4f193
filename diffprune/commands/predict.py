"""`diffprune predict RUN_DIR`: labels and probabilities (JSON lines) for texts or a file; for a causal-LM
run, a generated continuation of --prompt (or of the conversation in --messages), streamed."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Predict with a trained run; prints one JSON object per input:
classification {"label": ..., "label_id": ..., "probabilities": {label: p, ...}}, regression {"score": ...}.

  diffprune predict runs/sst2 --text "a gorgeous, witty, seductive movie"
  diffprune predict runs/rte --text "A cat sat on the mat." --text-pair "An animal is sitting."
  diffprune predict runs/rte --file pairs.tsv          (columns: the run's text columns)

Causal-LM runs generate, streaming tokens to the terminal as they come (greedy unless --temperature):

  diffprune predict runs/qa --prompt "question: is the sky blue? answer:" --max-new-tokens 32
  diffprune predict runs/chat --messages chat.jsonl   (one {"role": ..., "content": ...} per line)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_base_mismatch_flag

    p = subparsers.add_parser("predict", help="predict labels for texts or a file (JSON lines)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="output directory of diffprune train")
    p.add_argument("--text", help="the input text (the first text of a pair)")
    p.add_argument("--text-pair", help="the second text, for sentence-pair tasks")
    p.add_argument("--file", help="a .csv, .tsv or .jsonl file of inputs, one prediction per row")
    p.add_argument("--text-columns", nargs="+", metavar="COLUMN", help="text columns of --file (default: the run's)")
    p.add_argument("--batch-size", type=int, default=64)
    g = p.add_argument_group("causal-LM runs")
    g.add_argument("--prompt", help="the text to continue")
    g.add_argument("--messages", metavar="FILE", help="a conversation to answer: JSON Lines of {\"role\", \"content\"} "
                   "messages, or one JSON object with \"messages\"")
    g.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, finish_reason, token counts) "
                   "at the end instead of streaming the text")
    p.add_argument("--output", help="write the JSON lines to this file instead of standard output")
    add_base_mismatch_flag(p)
    p.set_defaults(run=run)
    return p


def predictions(model, tokenizer, info: dict, rows: list[list[str]], batch_size: int = 64) -> list[dict]:
    """One dict per row: label, label_id and probabilities (classification) or score (regression)."""
    import torch

    from ..batching import encode_texts, pad_id, predict_outputs

    enc = encode_texts(tokenizer, rows, int(info["max_seq_length"]))
    outputs = predict_outputs(model, enc, pad_id(tokenizer), batch_size)
    if info["task_type"] == "regression":
        return [{"score": float(v)} for v in outputs.reshape(len(rows))]
    labels = [str(x) for x in info["labels"]]
    probs = torch.softmax(outputs, dim=-1)
    out = []
    for p in probs:
        i = int(p.argmax())
        out.append({"label": labels[i], "label_id": i, "probabilities": {n: float(x) for n, x in zip(labels, p)}})
    return out


def _read_messages(path: str) -> list[dict]:
    """A conversation from a file: JSON Lines of messages, or one JSON object {"messages": [...]} / a list."""
    from ..tasks import DataError

    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise DataError(f"--messages {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"--messages {path} is not UTF-8 text ({e})") from None
    try:
        whole = json.loads(text)
        msgs = (whole.get("messages", [whole] if "role" in whole else None)) if isinstance(whole, dict) else whole
    except json.JSONDecodeError:
        msgs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    msgs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"--messages {path}, line {n}: not JSON ({e.msg})") from None
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"--messages {path}: expected messages ({{\"role\": ..., \"content\": ...}} per line)")
    for n, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"--messages {path}: message {n} needs a string \"role\" and \"content\"")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"--messages {path}: message {n} has role {m['role']!r}; use system, user or assistant")
    return msgs


def _generate(args, info) -> int:
    import torch

    from ..errors import UsageError
    from ..generation import TextDeltaStreamer
    from ..lmdata import render_prompt
    from ..lmeval import generate
    from ..runs import load_run

    if args.file or args.text is not None or args.text_pair is not None or args.text_columns:
        raise UsageError(f"{args.run_dir} is a causal-LM run: give --prompt \"...\" or --messages FILE "
                         "(--text, --text-pair and --file are for classifier runs)")
    if (args.prompt is None) == (args.messages is None):
        raise UsageError("give one of --prompt \"...\" or --messages FILE")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0 or not (0 < args.top_p <= 1):
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    messages = _read_messages(args.messages) if args.messages else None
    model, tokenizer, info = load_run(args.run_dir, allow_base_mismatch=args.allow_base_mismatch)
    ids = render_prompt(tokenizer, prompt=args.prompt, messages=messages)
    limit = int(info.get("max_seq_length") or 0)
    if limit and len(ids) > limit:
        print(f"diffprune predict: warning: the prompt is {len(ids)} tokens, longer than the {limit} the run "
              "trained on", file=sys.stderr)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    def write(piece):
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()

    # the text as it comes, never a stop string nor what follows it (`diffprune.generation`)
    stream = None if args.json else TextDeltaStreamer(tokenizer, args.stop or (), callback=write)
    out = generate(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, stop=args.stop, streamer=stream)
    if args.json:
        print(json.dumps({"text": out["text"], "finish_reason": out["finish_reason"], "prompt_tokens": len(ids),
                          "completion_tokens": out["completion_tokens"]}))
    else:
        sys.stdout.write("\n")
    return 0


def run(args) -> int:
    from ..errors import UsageError
    from ..families import family_of_info
    from ..runs import load_run, read_task_info
    from ..tasks import read_texts

    info = read_task_info(args.run_dir)
    if not family_of_info(info).has_head:
        return _generate(args, info)
    if args.prompt is not None or args.messages is not None:
        raise UsageError(f"--prompt and --messages are for causal-LM runs; {args.run_dir} is a "
                         f"{info['task_type']} run: give --text or --file")
    n_texts = len(info["text_columns"])
    if args.file:
        if args.text is not None or args.text_pair is not None:
            raise UsageError("give either --file or --text (and --text-pair), not both")
        cols = args.text_columns or info["text_columns"]
        if len(cols) != n_texts:
            raise UsageError(f"the run takes {n_texts} text(s) per example; --text-columns names {len(cols)}")
        rows = read_texts(args.file, cols)
    else:
        if args.text is None:
            raise UsageError("give --text \"...\" (and --text-pair for sentence pairs) or --file PATH")
        if args.text_columns:
            raise UsageError("--text-columns describes --file; pass --file too")
        if n_texts == 2 and args.text_pair is None:
            raise UsageError(f"task {info.get('task')} takes sentence pairs ({', '.join(info['text_columns'])}): "
                             "pass --text-pair too")
        if n_texts == 1 and args.text_pair is not None:
            raise UsageError(f"task {info.get('task')} takes one text ({info['text_columns'][0]}); leave out --text-pair")
        rows = [[args.text] + ([args.text_pair] if n_texts == 2 else [])]
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be >= 1")
    model, tokenizer, info = load_run(args.run_dir, allow_base_mismatch=args.allow_base_mismatch)
    results = predictions(model, tokenizer, info, rows, args.batch_size)
    lines = [json.dumps({"index": i, **r}) if args.file else json.dumps(r) for i, r in enumerate(results)]
    text = "\n".join(lines) + "\n"
    if args.output:
        from .._io import atomic_write_text

        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0
