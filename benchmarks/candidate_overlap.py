"""Which entries the candidate warm-up ranks first, against the masks that dense L0 runs keep.

Candidate L0 (`--candidates c`) trains w and alpha only on the c * n entries a 200-batch warm-up ranks
highest. Where it scores below the dense L0 stage (CoLA), the question is whether the ranking misses
the entries the dense stage would keep. This runs the library's own warm-up (`diffprune train
--candidates c`, stopped right after it), recording next to the library's bf16 sum of |dL/dtheta| the
float32 sums of g, |g| and g^2 per entry, and reports for several rankings built from them:

* coverage: the share of each given run's final mask (`--masks`: dense runs, a candidate run) that
  lies inside the ranking's top c * n;
* where the top c * n sit, per parameter group (layer indices folded), next to where the masks sit;
* where they sit by layer (the first number in a parameter's name, `diffprune.analysis.layer_of`);
* how many input features of each weight matrix they reach: |dL/dW[i, j]| = |sum_t dy_i x_j| is large
  wherever the input feature j is (BERT-like models have a few outlier features), so a ranking by it can
  confine a matrix's candidates to a few of its inputs;
* how much the given runs' masks share with each other (`--pairs`): two dense runs that differ in
  one setting show how unique "the dense mask" is.

    python benchmarks/candidate_overlap.py --task cola --masks dense=RUN candidates=RUN \\
        --pairs rte:lean=RUN,w16=RUN                      # writes results/candidate_overlap.{md,json}
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _env  # noqa: E402

from diffprune import candidates  # noqa: E402
from diffprune.analysis import NO_LAYER, layer_of  # noqa: E402
from diffprune.diff_file import SparseDiff  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _per_input(a: torch.Tensor, axis: int | None, rms: bool) -> torch.Tensor:
    """|g| sums over their input feature's mean (or RMS), times the tensor's: each entry ranked against its
    input's typical gradient, the tensor's total kept (weights without an input axis unchanged)."""
    if axis is None:
        return a
    if rms:
        return a / a.square().mean(dim=1 - axis, keepdim=True).sqrt().clamp_min(1e-30) * a.square().mean().sqrt()
    return a / a.mean(dim=1 - axis, keepdim=True).clamp_min(1e-30) * a.mean()


RANKINGS = {  # name -> (description, score from the float32 sums s (g), a (|g|), q (g^2), |theta| and the input axis)
    "grad": ("sum |g| (the library's default)", lambda s, a, q, t, ax: a),
    "theta_grad": ("|theta| * sum |g|", lambda s, a, q, t, ax: a * t),
    "abs_sum": ("|sum g|", lambda s, a, q, t, ax: s.abs()),
    "fisher": ("sum g^2", lambda s, a, q, t, ax: q),
    "snr": ("|sum g| / sqrt(sum g^2)", lambda s, a, q, t, ax: s.abs() / q.sqrt().clamp_min(1e-30)),
    "grad_per_tensor": ("sum |g| over its tensor's RMS (`--candidate-importance grad_per_tensor`)",
                        lambda s, a, q, t, ax: candidates.normalize_per_tensor_({"": a.clone()})[""]),
    "grad_per_input": ("sum |g| over its input feature's mean, times its tensor's",
                       lambda s, a, q, t, ax: _per_input(a, ax, rms=False)),
    "grad_per_input_rms": ("sum |g| over its input feature's RMS, times its tensor's",
                           lambda s, a, q, t, ax: _per_input(a, ax, rms=True)),
    "random": ("uniform at random (seed 0)", lambda s, a, q, t, ax: torch.rand(a.shape, generator=_RANDOM)),
}
_RANDOM = torch.Generator().manual_seed(0)


def input_axes(dm) -> dict[str, int]:
    """The axis of the input features of each diffed weight that multiplies its module's input: 1 for an
    ``nn.Linear`` weight (out, in), 0 for a transformers ``Conv1D`` weight (in, out); a weight tied to an
    embedding counts by its Linear owner. Embeddings, norms and biases are absent."""
    out = {}
    for name, owners in dm._injector.owners.items():
        for owner in owners:
            path, _, local = owner.rpartition(".")
            if local != "weight":
                continue
            module = dm.model.get_submodule(path) if path else dm.model
            if isinstance(module, torch.nn.Linear):
                out[name] = 1
            elif type(module).__name__ == "Conv1D" and module.weight.dim() == 2:
                out[name] = 0
    return out


class _Stop(Exception):
    pass


def warmup_statistics(task: str, data_dir: str, model: str | None, fraction: float, steps: int, seed: int):
    """The library's warm-up on `task`: float32 sums of g, |g|, g^2 and |theta| per diffed entry, and the
    candidates the library itself chose."""
    from diffprune.training import TrainConfig, train

    stats, chosen, axes = {}, {}, {}
    real_importance, real_select = candidates.importance, candidates.select

    def importance(dm, batches, *a, **kw):
        axes.update(input_axes(dm))
        theta = dm._theta()
        handles = []
        for name, t in theta.items():
            stats[name] = [torch.zeros(t.shape) for _ in range(3)] + [t.detach().abs().float()]
            t.requires_grad_(True)  # registered before the library's hook, so this one sees the gradient first

            def hook(p, acc=stats[name]):
                g = p.grad.float()
                acc[0].add_(g)
                acc[1].add_(g.abs())
                acc[2].add_(g.square())
            handles.append(t.register_post_accumulate_grad_hook(hook))
        try:
            return real_importance(dm, batches, *a, **kw)
        finally:
            for h in handles:
                h.remove()

    def select(scores, frac, importance="grad", **kw):
        chosen.update(real_select(scores, frac, importance=importance, **kw))
        raise _Stop

    candidates.importance, candidates.select = importance, select
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(output_dir=str(Path(tmp) / "run"), task=task, data_dir=data_dir, method="structured",
                              candidates=fraction, candidate_warmup_steps=steps, seed=seed, progress=False,
                              save_steps=0, **({"model": model} if model else {}))
            try:
                train(cfg)
            except _Stop:
                pass
    finally:
        candidates.importance, candidates.select = real_importance, real_select
    if not chosen:
        raise SystemExit("the warm-up did not run (is --task a task with a training set?)")
    return stats, chosen, axes


def top(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks of the round(fraction * n) highest scores across all tensors (ties: all kept)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = round(fraction * flat.numel())
    cut = torch.topk(flat, k).values[-1]
    return {n: s >= cut for n, s in scores.items()}


def mask_of(diff: SparseDiff) -> dict[str, torch.Tensor]:
    return {n: diff.indices[n] for n in diff.shapes}


def coverage(sets: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> float:
    hit = sum(int(sets[n].reshape(-1)[pos].sum()) for n, pos in mask.items() if n in sets)
    return hit / max(sum(int(p.numel()) for p in mask.values()), 1)


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Share of a's entries that b keeps too."""
    hit = 0
    for n, pos in a.items():
        if n in b:
            hit += int(torch.isin(pos, b[n]).sum())
    return hit / max(sum(int(p.numel()) for p in a.values()), 1)


def _cell(text: str) -> str:
    """Text for a markdown table cell (|g| would end the cell)."""
    return text.replace("|", "\\|")


def input_reach(positions: dict[str, torch.Tensor], shapes: dict[str, tuple], axes: dict[str, int]) -> dict:
    """Over the weights with an input axis that hold entries of the set: the mean share of their input
    features holding at least one entry, and the share of the entries in each weight's 10% most used inputs."""
    touched, top10, weights = 0.0, 0.0, 0
    for name, axis in axes.items():
        pos = positions.get(name)
        if pos is None or pos.numel() == 0:
            continue
        rows, cols = shapes[name]
        inputs = (pos % cols) if axis == 1 else torch.div(pos, cols, rounding_mode="floor")
        n_in = cols if axis == 1 else rows
        counts = torch.bincount(inputs, minlength=n_in).sort(descending=True).values
        touched += float((counts > 0).float().mean())
        top10 += float(counts[:max(1, n_in // 10)].sum()) / pos.numel()
        weights += 1
    return {"weights": weights, "inputs_touched": touched / max(weights, 1), "in_top_10pct_inputs": top10 / max(weights, 1)}


def group(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def layer_key(name: str) -> str:
    """A parameter's layer as a table column ("no layer": embeddings, pooler, final norms)."""
    layer = layer_of(name)
    return NO_LAYER if layer is None else str(layer)


def shares(counts: dict[str, int], key=group) -> dict[str, float]:
    """Share of a set's entries per `key` of their parameter's name (parameter group, or `layer_key`)."""
    total = sum(counts.values()) or 1
    out = collections.Counter()
    for n, c in counts.items():
        out[key(n)] += c / total
    return dict(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "glue"))
    p.add_argument("--model", default=None)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", nargs="+", default=[], metavar="LABEL=RUN", help="runs of --task whose masks to cover")
    p.add_argument("--pairs", nargs="*", default=[], metavar="TASK:LABEL=RUN,LABEL=RUN",
                   help="two runs (any task) whose masks to compare with each other")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)

    masks = {}
    for item in args.masks:
        label, _, run = item.partition("=")
        masks[label] = mask_of(SparseDiff.load(Path(run) / "diff.safetensors"))
    stats, chosen, axes = warmup_statistics(args.task, args.data_dir, args.model, args.fraction, args.warmup_steps,
                                            args.seed)
    n = sum(v[0].numel() for v in stats.values())
    shapes = {name: tuple(v[0].shape) for name, v in stats.items()}

    rows, where, by_layer, reach = [], {}, {}, {}
    _RANDOM.manual_seed(0)  # the "random" ranking: the same set on every run
    for key, (title, fn) in RANKINGS.items():
        sets = top({name: fn(*v, axes.get(name)) for name, v in stats.items()}, args.fraction)
        rows.append({"ranking": key, "title": title, "candidates": sum(int(s.sum()) for s in sets.values()),
                     "same_as_library": coverage(sets, chosen),
                     "coverage": {label: coverage(sets, m) for label, m in masks.items()}})
        counts = {name: int(s.sum()) for name, s in sets.items()}
        where[key], by_layer[key] = shares(counts), shares(counts, layer_key)
        reach[key] = input_reach({name: torch.nonzero(s.reshape(-1)).squeeze(1) for name, s in sets.items()}, shapes, axes)
    for label, m in masks.items():
        counts = {name: int(pos.numel()) for name, pos in m.items()}
        where[f"mask:{label}"], by_layer[f"mask:{label}"] = shares(counts), shares(counts, layer_key)
        reach[f"mask:{label}"] = input_reach(m, shapes, axes)
    pairs = []
    for item in args.pairs:
        task, _, rest = item.partition(":")
        (la, ra), (lb, rb) = (x.split("=", 1) for x in rest.split(","))
        a, b = (mask_of(SparseDiff.load(Path(r) / "diff.safetensors")) for r in (ra, rb))
        pairs.append({"task": task, "a": la, "b": lb, "shared": overlap(a, b), "runs": [ra, rb]})

    labels = list(masks)
    lines = [f"# Candidate warm-up rankings against the L0 masks ({args.task})", "",
             f"The library's warm-up (`diffprune train --task {args.task} --method structured --candidates "
             f"{args.fraction:g} --candidate-warmup-steps {args.warmup_steps}`, seed {args.seed}, stopped after it) on "
             f"{n:,} diffed entries; each ranking's top {args.fraction:.0%} ({round(args.fraction * n):,} entries) "
             "from float32 sums over the same batches. Coverage: the share of a run's final mask inside that top set "
             f"(a random set covers {args.fraction:.0%}).", "",
             "| ranking | same entries as the library's pick | " + " | ".join(f"covers mask: {m}" for m in labels) + " |",
             "|---|---:|" + "---:|" * len(labels)]
    for r in rows:
        lines.append(f"| {_cell(r['title'])} | {r['same_as_library']:.1%} | "
                     + " | ".join(f"{r['coverage'][m]:.1%}" for m in labels) + " |")
    cols = [k for k in where]
    groups = sorted({g for d in where.values() for g in d}, key=lambda g: -max(where[c].get(g, 0) for c in cols))
    lines += ["", "## Where the entries sit (share of each set per parameter group, layers folded)", "",
              "| group | " + " | ".join(c.replace("mask:", "mask: ") for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for g in groups:
        lines.append(f"| `{g}` | " + " | ".join(f"{where[c].get(g, 0):.2%}" for c in cols) + " |")
    layers = sorted({k for d in by_layer.values() for k in d}, key=lambda k: (k == NO_LAYER, int(k) if k.isdigit() else 0))
    lines += ["", "## By layer (share of each set)", "",
              "| set | " + " | ".join(layers) + " |", "|---|" + "---:|" * len(layers)]
    for c in cols:
        lines.append(f"| {c.replace('mask:', 'mask: ')} | " + " | ".join(f"{by_layer[c].get(k, 0):.0%}" for k in layers) + " |")
    lines += ["", "## Input features reached (weight matrices read by a Linear / Conv1D)", "",
              "Per weight that holds entries of the set, averaged over those weights: the share of its input features "
              "with at least one entry, and the share of its entries in its 10% most used input features.", "",
              "| set | weights | input features reached | entries in the top 10% of inputs |", "|---|---:|---:|---:|"]
    for c in cols:
        r = reach[c]
        lines.append(f"| {c.replace('mask:', 'mask: ')} | {r['weights']} | {r['inputs_touched']:.0%} | "
                     f"{r['in_top_10pct_inputs']:.0%} |")
    if pairs:
        lines += ["", "## Masks of two runs (share of the first run's mask that the second keeps too)", "",
                  "| task | first | second | shared |", "|---|---|---|---:|"]
        for r in pairs:
            lines.append(f"| {r['task']} | {r['a']} | {r['b']} | {r['shared']:.1%} |")
    lines += ["", f"- masks: " + "; ".join(f"{m}: `{x.partition('=')[2]}`" for m, x in zip(labels, args.masks)),
              f"- command: `{_env.command()}`", f"- machine: {_env.machine()}", f"- versions: {_env.versions()}",
              f"- date: {_env.now()}"]
    text = "\n".join(lines) + "\n"
    print(text)
    record = {"task": args.task, "fraction": args.fraction, "warmup_steps": args.warmup_steps, "seed": args.seed,
              "entries": n, "rankings": rows, "where": where, "by_layer": by_layer, "input_reach": reach, "pairs": pairs, "masks": dict(a.split("=", 1) for a in args.masks),
              "command": _env.command(), "machine": _env.machine(), "versions": _env.versions(), "date": _env.now()}
    _env.write_results(Path(args.results_dir) / "candidate_overlap", text, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
