"""`diffprune merge RUN_DIR --output-dir DIR`: an ordinary transformers checkpoint with the diff merged in."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Write base + diff (and the task head) as an ordinary transformers checkpoint with its tokenizer,
loadable with AutoModelForSequenceClassification.from_pretrained(DIR) (causal-LM runs:
AutoModelForCausalLM) and no diffprune installed.
LoRA runs are merged too; full-finetuning runs already are one (RUN_DIR/model).

  diffprune merge runs/rte --output-dir rte-merged
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_base_mismatch_flag

    p = subparsers.add_parser("merge", help="write base + diff as an ordinary transformers checkpoint",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="output directory of diffprune train")
    p.add_argument("--output-dir", required=True, help="directory to write the checkpoint to")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing --output-dir")
    add_base_mismatch_flag(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from pathlib import Path

    from ..families import family_of_info
    from ..runs import MODEL_DIR, RunError, hf_quiet, load_run, run_method

    out = Path(args.output_dir)
    kind = run_method(Path(args.run_dir))
    if kind == "full":
        raise RunError(f"{args.run_dir} is a full-finetuning run: {Path(args.run_dir) / MODEL_DIR} already is an "
                       "ordinary transformers checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise RunError(f"--output-dir {out} already exists; pass --overwrite to write into it, or choose another")
    if out.resolve() == Path(args.run_dir).resolve():
        raise RunError("--output-dir must differ from RUN_DIR")
    model, tokenizer, info = load_run(args.run_dir, allow_base_mismatch=args.allow_base_mismatch)
    with hf_quiet():
        merged = model.merge_and_unload()
        if family_of_info(info).has_head:
            merged.config.problem_type = ("regression" if info["task_type"] == "regression"
                                          else "single_label_classification")
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    print(f"merged {info.get('method')} run {args.run_dir} ({info.get('task')}) into {out}")
    return 0
