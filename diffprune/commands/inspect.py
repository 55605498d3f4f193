"""`diffprune inspect RUN_DIR`: where the diff's nonzeros are, per layer and per parameter kind."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Show how a run's sparse diff is spread over the model: nonzeros per layer (the first number in a
parameter's name) and per kind (embeddings, attention query/key/value/output, FFN, LayerNorm, biases,
other), and its size on disk against a full copy. --plot writes a heat map of density by layer x kind.

  diffprune inspect runs/rte --plot runs/rte/density.png
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="nonzeros of a diff per layer and kind; heat map", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="output directory of diffprune train (a diff method)")
    p.add_argument("--plot", metavar="FILE.png", help="write a heat map of density by layer x kind")
    p.add_argument("--json", action="store_true", help="print the counts as JSON instead of tables")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from pathlib import Path

    from ..analysis import analyze, format_report, plot_heatmap, storage
    from ..diff_file import DIFF_FILE, SparseDiff
    from ..runs import run_method

    run_dir = Path(args.run_dir)
    kind = run_method(run_dir)
    if kind != "diff":
        from ..runs import RunError

        raise RunError(f"{run_dir} is a {kind} run: it has no sparse diff to inspect (inspect works on diff, "
                       "structured and magnitude runs)")
    diff = SparseDiff.load(run_dir)
    report = analyze(diff)
    c = diff.config
    selection = {"diffed_tensors": len(diff.shapes), "n_diffed": diff.n_diffed, "nnz": diff.nnz,
                 "budget": round(c.target_sparsity * diff.n_diffed), "target_sparsity": c.target_sparsity,
                 "diff_parameters": c.diff_parameters, "frozen_parameters": c.frozen_parameters,
                 "head_parameters": c.head_parameters}
    store = storage(diff, run_dir / DIFF_FILE)
    if args.plot:
        task = diff.extra.get("task")
        title = f"{task} / {diff.extra.get('method', 'diff')}: {report['nnz']:,} nonzeros ({report['density']:.3%})"
        plot_heatmap(report, args.plot, title=title)
    if args.json:
        out = {k: v for k, v in report.items() if k != "tensors"}
        out["storage"] = store
        out["selection"] = selection
        if args.plot:
            out["plot"] = str(args.plot)
        print(json.dumps(out, indent=2))
    else:
        print(format_report(report, store))
        which = ("every parameter" if c.diff_parameters is None else "parameters matching " + ", ".join(c.diff_parameters))
        frozen = f"; frozen: {', '.join(c.frozen_parameters)}" if c.frozen_parameters else ""
        print(f"\ndiffed: {which}{frozen} ({selection['diffed_tensors']} tensors, {diff.n_diffed:,} entries; budget "
              f"round({c.target_sparsity:g} x {diff.n_diffed:,}) = {selection['budget']:,}, kept {diff.nnz:,})")
        if args.plot:
            print(f"\nheat map written to {args.plot}")
    return 0
