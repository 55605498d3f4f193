"""`diffprune compress RUN_DIR --value-dtype int8 --output-dir OUT`: rewrite a run's diff smaller."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Copy a diff run to --output-dir with its diff rewritten in the current file format (v2) and the
values stored as --value-dtype: fp32 (exact), bf16 or fp16 (half the value bytes, rounded) or int8
(a quarter, with one fp32 scale per 4096 values; each value within half a scale step). The other
files of the run (run.json, metrics.json, the README.md model card, train_log.jsonl) are copied
as they are; metrics.json gets the new stored_bytes. The output is a run like any other: eval,
predict, inspect, merge and serve read it.

  diffprune compress runs/rte --value-dtype int8 --output-dir runs/rte-int8
"""

COPIED = ("run.json", "metrics.json", "README.md", "train_log.jsonl")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compress", help="rewrite a run's diff with smaller values (bf16, fp16, int8)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="output directory of diffprune train (a diff method)")
    p.add_argument("--value-dtype", required=True, choices=("fp32", "bf16", "fp16", "int8"),
                   help="how the new diff file stores the values")
    p.add_argument("--output-dir", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing --output-dir")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import json
    import shutil
    from pathlib import Path

    from .._io import atomic_write_text
    from ..diff_file import CONFIG_FILE, DIFF_FILE, SparseDiff
    from ..runs import METRICS_FILE, RunError, run_method

    src, out = Path(args.run_dir), Path(args.output_dir)
    kind = run_method(src)
    if kind != "diff":
        raise RunError(f"{src} is a {kind} run: it has no sparse diff to compress (compress works on diff, "
                       "structured and magnitude runs)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise RunError(f"--output-dir {out} already exists; pass --overwrite to write into it, or choose another")
    if out.resolve() == src.resolve():
        raise RunError("--output-dir must differ from RUN_DIR")
    diff = SparseDiff.load(src)
    before = (src / DIFF_FILE).stat().st_size
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    diff.save(out, value_dtype=args.value_dtype)
    after = (out / DIFF_FILE).stat().st_size
    s = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))  # the summary save just wrote
    metrics_path = out / METRICS_FILE
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{src / METRICS_FILE} is not valid JSON ({e}); the run directory is damaged") from e
        if isinstance(metrics, dict):
            metrics["stored_bytes"] = after
            metrics["bytes_per_nonzero"] = s["bytes_per_nonzero"]
            metrics["value_dtype"] = args.value_dtype
            atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    print(f"compressed {src} into {out}: {before:,} -> {after:,} bytes; {s['bits_per_nonzero']:.2f} bits per nonzero "
          f"({s['position_bits_per_nonzero']:.2f} position, bound {s['position_bound_bits_per_nonzero']:.2f}; "
          f"{s['value_bits_per_nonzero']:.2f} {args.value_dtype} value)")
    return 0
