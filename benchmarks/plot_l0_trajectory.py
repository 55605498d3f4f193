"""Plot how diff-pruning runs sparsify and score over training, from their train_log.jsonl.

    python benchmarks/plot_l0_trajectory.py --out benchmarks/results/glue_structured_study/cola_trajectory.png \
        --title "CoLA" "expected L0, paper λ=benchmarks/work/structured_study/fill/cola-structured-s0" ...

Left: the expected density E[||δ||_0] / n logged during the L0 stage (log scale). Right: the
validation score after every epoch of both stages (the fixed-mask stage continues the x axis).
Each run is LABEL=RUN_DIR; a run without gates (full finetuning) is drawn as a dashed score line.
The data behind the figure is printed and written next to it (same name, .json) with the
command, machine and date, so that figures quoted from it have a committed source.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not
import _env  # noqa: E402

from diffprune._io import atomic_write_text  # noqa: E402


def read_log(run_dir: Path) -> tuple[list[tuple[float, float, int]], list[tuple[float, float]]]:
    """(epoch, density, step) points of the L0 stage and (epoch, score) at every epoch end."""
    density, scores = [], []
    l0_epochs = 0
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "start":
            l0_epochs = rec["settings"]["epochs"]
        elif rec.get("event") == "eval" and rec.get("phase") in ("l0", "fixed", "train"):
            offset = l0_epochs if rec["phase"] == "fixed" else 0
            scores.append((offset + rec["epoch"], rec["score"]))
        elif rec.get("phase") == "l0" and rec.get("density") is not None and "step" in rec:
            density.append((rec["epoch"], rec["density"], rec["step"]))
    if not scores:
        raise SystemExit(f"{run_dir}: no validation records in train_log.jsonl (is the run finished?)")
    return density, scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    data = []
    for item in args.runs:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"{item!r}: expected LABEL=RUN_DIR")
        density, scores = read_log(Path(path))
        # a run without gates (full finetuning) has no density: it appears as a score reference
        color = ax_d.plot([e for e, _, _ in density], [d for _, d, _ in density], label=label)[0].get_color() \
            if density else "black"
        ax_s.plot(*zip(*scores), marker="o", color=color, label=label, linestyle="-" if density else "--")
        end = f"density at L0 end {density[-1][1]:.4%}" if density else "no gates"
        print(f"{label}: {end}; scores by epoch "
              + ", ".join(f"{e:g}: {s:.1f}" for e, s in scores))
        data.append({"label": label, "run_dir": path,
                     "l0_density": [{"step": st, "epoch": e, "density": d} for e, d, st in density],
                     "scores": [{"epoch": e, "score": sc} for e, sc in scores]})
    ax_d.set_yscale("log")
    ax_d.axhline(0.005, color="grey", linestyle=":", linewidth=1)
    ax_d.text(0.02, 0.005, "0.5% budget", color="grey", va="bottom", fontsize=8)
    ax_d.set_xlabel("epoch of the L0 stage")
    ax_d.set_ylabel("expected density E[‖δ‖₀] / n")
    ax_d.set_title(f"{args.title}: sparsification".strip(": "))
    ax_s.set_xlabel("epoch (L0 stage, then fixed-mask stage)")
    ax_s.set_ylabel("validation score")
    ax_s.set_title(f"{args.title}: validation score".strip(": "))
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    record = {"title": args.title, "runs": data, "command": _env.command(), "machine": _env.machine(),
              "date": _env.now()}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
