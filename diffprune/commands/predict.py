"""`diffprune predict RUN_DIR`: labels and probabilities (JSON lines) for texts or a file."""

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


def run(args) -> int:
    from ..cli import UsageError
    from ..runs import load_run, read_task_info
    from ..tasks import read_texts

    info = read_task_info(args.run_dir)
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
