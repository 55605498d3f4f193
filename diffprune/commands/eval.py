"""`diffprune eval RUN_DIR`: score a trained run on its validation set or on a labelled file."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Score a trained run and print the metrics as JSON. Without options it uses the validation data the
run was trained with; --task/--data-dir picks a GLUE validation set, --file any labelled
.csv/.tsv/.jsonl file (columns: the run's, or --text-columns/--label-column).

  diffprune eval runs/rte
  diffprune eval runs/rte --data-dir ../shared/glue
  diffprune eval runs/reviews --file test.csv --label-column stars --output test-metrics.json

Causal-LM runs report loss and perplexity over the completion tokens, and exact match of greedy
generations where the rows carry a reference (--file: rows in the run's data format).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_base_mismatch_flag

    p = subparsers.add_parser("eval", help="score a trained run on validation data or a file", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="output directory of diffprune train")
    p.add_argument("--task", help="GLUE task whose validation set to use (default: the run's task)")
    p.add_argument("--data-dir", help="folder with <task>/validation.tsv (default: the run's data, else the HF hub)")
    p.add_argument("--file", help="a labelled .csv, .tsv or .jsonl file to score instead")
    p.add_argument("--text-columns", nargs="+", metavar="COLUMN", help="text columns of --file (default: the run's)")
    p.add_argument("--label-column", help="label column of --file (default: the run's)")
    p.add_argument("--max-samples", type=int, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="also write the JSON to this file")
    add_base_mismatch_flag(p)
    p.set_defaults(run=run)
    return p


def _validation_data(args, info: dict, spec):
    from pathlib import Path

    from ..runs import RUN_FILE, read_json
    from ..tasks import DataError, GLUE_TASKS, glue_task, load_split, load_validation

    if args.file:
        if args.task or args.data_dir:
            raise DataError("--file scores a file; leave out --task and --data-dir")
        ds = load_split(args.file, spec, "--file", hint="pass --text-columns and --label-column naming its columns")
        return ds, str(Path(args.file).resolve())
    if args.text_columns or args.label_column:
        raise DataError("--text-columns and --label-column describe --file; pass --file too")
    if args.task or args.data_dir:
        task = args.task or info.get("task")
        other = glue_task(task)
        if other.task_type != spec.task_type or list(other.labels) != list(spec.labels):
            raise DataError(
                f"the run was trained for {info.get('task')} ({spec.task_type}, labels {list(spec.labels)}); "
                f"{task} has {other.task_type} labels {list(other.labels)}: its predictions cannot be scored there"
            )
        ds = load_validation(other, args.data_dir, args.max_samples)
        return ds, f"{task} validation" + (f" from {Path(args.data_dir).resolve()}" if args.data_dir else " (hub)")
    run_file = Path(args.run_dir) / RUN_FILE
    source = read_json(run_file, "run metadata").get("data", {}) if run_file.exists() else {}
    if source.get("validation_file"):
        return load_split(source["validation_file"], spec, "validation file"), source["validation_file"]
    if info.get("task") in GLUE_TASKS:
        return load_validation(spec), f"{info['task']} validation (hub)"
    raise DataError(f"{args.run_dir} does not record its validation data; pass --file or --task/--data-dir")


def _evaluate_causal(args, info: dict) -> dict:
    from pathlib import Path

    from ..batching import pad_id
    from ..families import get_family
    from ..lmdata import encode_lm, read_lm_file
    from ..lmeval import combine_lm_metrics, lm_partial_metrics
    from ..runs import RUN_FILE, load_run, read_json
    from ..tasks import DataError

    if args.task or args.data_dir or args.text_columns or args.label_column:
        raise DataError("--task, --data-dir, --text-columns and --label-column describe classification data; "
                        "a causal-LM run is scored on its validation file or --file")
    run_file = Path(args.run_dir) / RUN_FILE
    run = read_json(run_file, "run metadata") if run_file.exists() else {}
    path = args.file or run.get("data", {}).get("validation_file")
    if not path:
        raise DataError(f"{args.run_dir} does not record its validation data; pass --file")
    data = read_lm_file(path, "--file" if args.file else "validation file", fmt=info.get("data_format"),
                        max_rows=args.max_samples)
    model, tokenizer, info = load_run(args.run_dir, allow_base_mismatch=args.allow_base_mismatch)
    enc = encode_lm(tokenizer, data, int(info["max_seq_length"]))
    max_new = int(run.get("settings", {}).get("generation_max_new_tokens") or 32)
    part = lm_partial_metrics(model, enc, tokenizer, list(range(len(enc))), batch_size=args.batch_size,
                              pad_token_id=pad_id(tokenizer), device=None, max_new_tokens=max_new)
    metrics = combine_lm_metrics([part])
    return {"run_dir": str(args.run_dir), "task": info.get("task"), "method": info.get("method"),
            "data": str(Path(path).resolve()), "examples": len(enc), "metrics": metrics,
            "score": get_family(info["family"]).score(None, metrics)}


def evaluate_run(args) -> dict:
    from ..batching import encode_dataset, pad_id, predict_outputs
    from ..families import family_of_info
    from ..metrics import score_of, task_metrics
    from ..runs import load_run, read_task_info
    from ..tasks import spec_from_info

    info = read_task_info(args.run_dir)
    if not family_of_info(info).has_head:
        return _evaluate_causal(args, info)
    spec = spec_from_info(info, args.label_column, args.text_columns)
    ds, source = _validation_data(args, info, spec)
    if args.max_samples:
        ds = ds.select(range(min(args.max_samples, len(ds))))
    model, tokenizer, info = load_run(args.run_dir, allow_base_mismatch=args.allow_base_mismatch)
    enc = encode_dataset(tokenizer, ds, spec.text_columns, int(info["max_seq_length"]))
    outputs = predict_outputs(model, enc, pad_id(tokenizer), args.batch_size)
    metrics = task_metrics(spec, outputs.tolist(), enc.labels)
    return {"run_dir": str(args.run_dir), "task": info.get("task"), "method": info.get("method"), "data": source,
            "examples": len(enc), "metrics": metrics, "score": score_of(spec, metrics)}


def run(args) -> int:
    from ..errors import UsageError

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max-samples {args.max_samples} must be >= 1")
    result = evaluate_run(args)
    text = json.dumps(result, indent=2)
    if args.output:
        from .._io import atomic_write_text

        atomic_write_text(args.output, text + "\n")
    print(text)
    return 0
