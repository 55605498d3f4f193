#!/usr/bin/env python
"""Which parts of a trained sparse diff carry the task: validation score with each parameter kind's
entries taken out, one kind at a time.

    python benchmarks/diff_ablation.py --data-dir ../shared/glue \
        --out benchmarks/results/glue_structured_study/diff_ablation \
        benchmarks/work/structured_study/per_gate_lr_1e-4/{rte,mrpc,stsb,cola,sst2}-structured-s0

For every diff run given: its nonzeros per kind (embeddings, attention query/key/value/output, FFN,
LayerNorm, bias, other; `diffprune.analysis.kind_of`), then the validation score of the base model
plus the dense head, and how far its outputs move, with (a) the whole diff, (b) the diff without
one kind, for each kind it has, and (c) no diff entries at all (head only). Nothing is retrained, so a drop measures what those
entries do in this trained diff, not what a diff trained without them could reach. Writes OUT.md
and OUT.json with the command, machine and date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not
import _env  # noqa: E402

from diffprune.analysis import KIND_ORDER, kind_of  # noqa: E402

HEAD_ONLY = "all diff entries (head only)"


def without(diff, names: set[str]):
    """A copy of `diff` without the entries of the tensors in `names` (head kept)."""
    from dataclasses import replace

    keep = [n for n in diff.indices if n not in names]
    return replace(diff, indices={n: diff.indices[n] for n in keep}, values={n: diff.values[n] for n in keep},
                   shapes={n: diff.shapes[n] for n in keep}, _backups={})


def ablate(run_dir: Path, data_dir: str | None, batch_size: int, max_samples: int | None) -> dict:
    from diffprune.batching import encode_dataset, pad_id, predict_outputs
    from diffprune.diff_file import SparseDiff
    from diffprune.metrics import score_of, task_metrics
    from diffprune.runs import load_run_base, read_task_info, run_method
    from diffprune.tasks import load_validation, spec_from_info

    if run_method(run_dir) != "diff":
        raise SystemExit(f"{run_dir} is not a diff run (full and LoRA runs have no sparse diff to take apart)")
    info = read_task_info(run_dir)
    spec = spec_from_info(info)
    diff = SparseDiff.load(run_dir)
    base, tokenizer = load_run_base(info)
    enc = encode_dataset(tokenizer, load_validation(spec, data_dir, max_samples), spec.text_columns,
                         int(info["max_seq_length"]))

    def outputs_with(d):
        d.apply_(base)
        try:
            return predict_outputs(base, enc, pad_id(tokenizer), batch_size)
        finally:
            d.revert_(base)

    def score(outputs) -> float:
        return score_of(spec, task_metrics(spec, outputs.tolist(), enc.labels))

    by_kind: dict[str, set[str]] = {}
    for name, idx in diff.indices.items():
        if idx.numel():
            by_kind.setdefault(kind_of(name), set()).add(name)
    kinds = [k for k in KIND_ORDER if k in by_kind]
    nnz = {k: sum(int(diff.indices[n].numel()) for n in by_kind[k]) for k in kinds}
    reference = outputs_with(diff)
    full = score(reference)
    removals = [(k, by_kind[k], nnz[k]) for k in kinds] + [(HEAD_ONLY, set(diff.indices), diff.nnz)]
    rows = []
    for label, names, count in removals:
        outputs = outputs_with(without(diff, names))
        value = score(outputs)
        # How far the outputs move, beside the score: a score can stay put while the logits shift.
        rows.append({"removed": label, "nnz_removed": count, "share": count / diff.nnz, "score": value,
                     "change": value - full, "output_shift": float((outputs - reference).abs().mean())})
    return {"run_dir": str(run_dir), "task": info.get("task"), "examples": len(enc), "nnz": diff.nnz,
            "score": full, "ablations": rows}


def render(results: list[dict], meta: dict) -> str:
    lines = ["# What each part of a sparse diff does (validation sets)", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ", f"Machine: {meta['machine']['cpu']}", "",
             "Validation score (GLUE per-task score, 0–100) of each trained diff with one parameter kind's entries "
             "taken out and nothing retrained; *share* is that kind's part of the diff's nonzeros; *output shift* is "
             "the mean absolute change of the model's outputs (logits, or the regression score) against the whole "
             "diff's. The last row of each run keeps only the dense head.", ""]
    for res in results:
        lines += [f"## {res['task']}: `{res['run_dir']}`", "",
                  f"{res['nnz']:,} nonzeros; score with the whole diff **{res['score']:.1f}** "
                  f"({res['examples']:,} validation examples)", "",
                  "| without | nonzeros | share | score | change | output shift |", "|---|---|---|---|---|---|"]
        for r in res["ablations"]:
            lines.append(f"| {r['removed']} | {r['nnz_removed']:,} | {r['share']:.1%} | {r['score']:.1f} | {r['change']:+.1f} | {r['output_shift']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="diff run directories (diffprune train / glue_accuracy.py)")
    p.add_argument("--out", required=True, type=Path, help="path without suffix; writes .md and .json")
    p.add_argument("--data-dir", help="folder with <task>/validation.tsv (default: the HF hub)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-samples", type=int, help="score only the first N validation examples")
    args = p.parse_args(argv)

    missing = [str(d) for d in args.run_dirs if not (d / "diff.safetensors").is_file()]
    if missing:
        raise SystemExit(f"no trained diff (diff.safetensors) in: {', '.join(missing)}")
    results = []
    for d in args.run_dirs:
        results.append(ablate(d, args.data_dir, args.batch_size, args.max_samples))
        print(f"{results[-1]['task']}: {results[-1]['score']:.1f} with the whole diff", flush=True)
    meta = {"command": _env.command(), "machine": _env.machine(), "date": _env.now()}
    text = render(results, meta)
    print(text)
    _env.write_results(args.out, text, {**meta, "results": results})


if __name__ == "__main__":
    main()
