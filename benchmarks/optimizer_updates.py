"""How far each `--moments-dtype` moves w and alpha, against Adam's fp32 moments, on the same gradients.

`--moments-dtype factored` scored 0.91 GLUE points below the dense L0 stage (benchmarks/results/
memory_accuracy.md). One suspect is its step size: a factored second moment (a row and a column mean of
g^2 per matrix) overestimates v for entries with small gradients in rows or columns with large ones, which
would make their steps smaller than Adam's, and the run's effective learning rate lower. This measures it
with the optimiser isolated: one model trains the L0 stage on a GLUE task with the CLI's defaults and
fp32-moment AdamW (`DiffModel.optimizer`), and after every backward the same (clipped) gradients also step a
shadow copy of the trainable tensors under each other moments dtype. w and alpha are kept in fp32 here
(with `--alpha-dtype bf16` one step's change of alpha is a stochastic rounding of its update, and
per-step ratios would measure the rounding). AdamW's update depends on the
gradients alone (weight decay is 0), so each step's per-entry |update| under a moments dtype, against
Adam's, is that optimiser's step size and nothing else.

Per step and over all steps, for w and alpha of the dense-gated weight matrices (embeddings and the task
head left out; entries whose gradient has been zero so far left out too): the RMS of the update over
the RMS of Adam's, the median of the per-entry ratio, and the shares of entries whose step is under half
or over twice Adam's.

    python benchmarks/optimizer_updates.py --task rte --data-dir ../shared/glue --steps 60   # 4 minutes
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _env  # noqa: E402

from diffprune import DiffModel, DiffPruningConfig  # noqa: E402
from diffprune.batching import collate, encode_dataset  # noqa: E402
from diffprune.tasks import load_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHOWN_STEPS = (1, 2, 5, 10, 20, 40, 80, 160)
KINDS = {"bf16": ("w",), "factored": ("w", "alpha")}
"""What each moments dtype changes: bf16 moments are w's only (alpha's moments follow alpha's dtype, fp32 here)."""


def _batches(task: str, data_dir: str, model_path: str, steps: int, batch: int, seq_len: int):
    from transformers import AutoTokenizer

    data = load_task(task, data_dir=data_dir, max_train_samples=steps * batch)
    tok = AutoTokenizer.from_pretrained(model_path)
    enc = encode_dataset(tok, data.train, data.spec.text_columns, seq_len)
    if len(enc) < steps * batch:
        raise SystemExit(f"{task} has {len(enc)} training examples: fewer than --steps x --batch = {steps * batch}")
    return [collate(enc, range(i * batch, (i + 1) * batch), tok.pad_token_id or 0, data.spec.task_type == "regression")
             for i in range(steps)], data


class _Sums:
    """One comparison of updates b against reference updates a, over the entries where a moved, accumulated over
    many steps: float64 sums for the RMS and the cosine, and per-entry ratios for the median and the tails
    (`per_step` of them sampled per step, or all with None): a run's updates would not fit in memory."""

    def __init__(self, per_step: int | None = 20_000):
        self.aa = self.bb = self.ab = 0.0
        self.entries, self.per_step, self.ratios = 0, per_step, []

    def add(self, a: torch.Tensor, b: torch.Tensor, step: int = 0) -> "_Sums":
        keep = a != 0
        a, b = a[keep].double(), b[keep].double()
        self.aa += float(a @ a)
        self.bb += float(b @ b)
        self.ab += float(a @ b)
        self.entries += len(a)
        if self.per_step is not None and len(a) > self.per_step:
            pick = torch.randperm(len(a), generator=torch.Generator().manual_seed(step))[: self.per_step]
            a, b = a[pick], b[pick]
        self.ratios.append((b / a).abs())
        return self

    def result(self) -> dict:
        r = torch.cat(self.ratios)
        return {"entries": self.entries, "sampled_ratios": len(r),
                "cosine": self.ab / max((self.aa * self.bb) ** 0.5, 1e-300),
                "rms_ratio": (self.bb / self.aa) ** 0.5, "median_ratio": float(r.median()),
                "under_half": float((r < 0.5).double().mean()), "over_twice": float((r > 2).double().mean())}


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """The update b against the reference update a, over the entries where a moved (every entry's ratio)."""
    return _Sums(per_step=None).add(a, b).result()


def _updates(now: dict, before: dict, names: list[str], seen: dict, kind: str) -> torch.Tensor:
    """This step's change of every `kind` ("w" or "alpha") tensor, at the entries whose gradient has been nonzero."""
    return torch.cat([(now[n].detach().float() - before[n])[seen[n]] for n in names if n.endswith("." + kind)])


def measure(model_path: str, task: str, data_dir: str, steps: int, batch: int, seq_len: int, moments: list[str],
            lr: float, alpha_lr: float, seed: int = 0) -> dict:
    from transformers import AutoModelForSequenceClassification

    batches, data = _batches(task, data_dir, model_path, steps, batch, seq_len)
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=data.spec.num_labels)
    dm = DiffModel(base, DiffPruningConfig(target_sparsity=0.005, structured=True))
    opt = dm.optimizer(lr=lr, alpha_lr=alpha_lr)
    shadows = {}
    for md in moments:
        twin = copy.deepcopy(dm)
        shadows[md] = (twin, twin.optimizer(lr=lr, alpha_lr=alpha_lr, moments_dtype=md))
    names = [n for n, p in dm.named_parameters()
             if p.requires_grad and p.dim() == 2 and "embeddings" not in n and n.split(".")[-1] in ("w", "alpha")]
    if not names:
        raise SystemExit("no gated weight matrices: the model has no 2-d parameter besides embeddings and head")
    params = dict(dm.named_parameters())
    twins = {md: dict(t.named_parameters()) for md, (t, _) in shadows.items()}
    seen = {n: torch.zeros(params[n].shape, dtype=torch.bool) for n in names}
    per_step, totals = [], {f"{md}:{k}": _Sums() for md in moments for k in KINDS[md]}
    dm.train()
    for step, b in enumerate(batches, 1):
        before = {n: params[n].detach().float().clone() for n in names}
        before_t = {md: {n: tw[n].detach().float().clone() for n in names} for md, tw in twins.items()}
        dm(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        for md, (twin, topt) in shadows.items():
            for n, p in dm.named_parameters():
                if p.grad is not None:
                    twins[md][n].grad = p.grad.detach().clone()
            topt.step()
            topt.zero_grad()
        for n in names:
            seen[n] |= params[n].grad != 0
        opt.step()
        opt.zero_grad()
        ref = {k: _updates(params, before, names, seen, k) for k in ("w", "alpha")}
        row = {"step": step, **{f"reference_{k}_rms_over_lr": float(ref[k].double().square().mean().sqrt()) / rate
                                for k, rate in (("w", lr), ("alpha", alpha_lr))}}
        for md in moments:
            for k in KINDS[md]:
                upd = _updates(twins[md], before_t[md], names, seen, k)
                row[f"{md}:{k}"] = _compare(ref[k], upd)
                totals[f"{md}:{k}"].add(ref[k], upd, step)
        per_step.append(row)
        if step in SHOWN_STEPS or step == steps:
            print(f"step {step}: " + "; ".join(f"{key} rms x{v['rms_ratio']:.3f} median x{v['median_ratio']:.3f} "
                                               f"cos {v['cosine']:.3f}"
                                               for key, v in row.items() if ":" in key), flush=True)
    overall = {key: sums.result() for key, sums in totals.items()}
    return {"per_step": per_step, "overall": overall, "matrices": len(names) // 2}


def report(rec: dict) -> str:
    s = rec["settings"]
    lines = [
        "# Optimiser step sizes of the moments dtypes, on the same gradients", "",
        f"`benchmarks/optimizer_updates.py`: the L0 stage of structured diff pruning on {s['task']} ({rec['model']}, "
        f"batch {s['batch']} x {s['seq_len']}, w lr {s['lr']}, alpha lr {s['alpha_lr']}) "
        f"trained {s['steps']} steps with fp32-moment AdamW; every step's clipped gradients also stepped a shadow "
        "copy under each other moments dtype. Ratios are each dtype's |update| against Adam's, over the "
        f"{rec['matrices']} gated weight matrices' entries whose gradient had been nonzero (bf16 moments are w's "
        "only: alpha's follow alpha's dtype).", "",
        f"- Command: `{rec['command']}`", f"- Date: {rec['date']}",
        f"- Machine: {rec['machine']['cpu']}, {rec['machine']['cores']} cores, {rec['machine']['platform']}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in rec['versions'].items())}", "",
        "Over all steps (RMS and cosine over every entry of every step; the median and the tails over up to "
        "20,000 per-entry ratios sampled each step):", "",
        "| moments | tensor | RMS vs Adam | median per-entry ratio | under 0.5x | over 2x | cosine with Adam's update |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, v in rec["overall"].items():
        md, k = key.split(":")
        lines.append(f"| {md} | {k} | {v['rms_ratio']:.3f}x | {v['median_ratio']:.3f}x | "
                     f"{100 * v['under_half']:.1f}% | {100 * v['over_twice']:.1f}% | {v['cosine']:.3f} |")
    lines += ["", "By step (RMS vs Adam / median per-entry ratio / cosine; Adam's RMS update over its learning rate):", "",
              "| step | " + " | ".join(k for k in rec["overall"]) + " | Adam w RMS / lr | Adam alpha RMS / lr |",
              "|---:|" + "---|" * (len(rec["overall"]) + 2)]
    for row in rec["per_step"]:
        if row["step"] in SHOWN_STEPS or row["step"] == s["steps"]:
            cells = [f"{row[k]['rms_ratio']:.3f} / {row[k]['median_ratio']:.3f} / {row[k]['cosine']:.3f}"
                     for k in rec["overall"]]
            lines.append(f"| {row['step']} | " + " | ".join(cells) + f" | {row['reference_w_rms_over_lr']:.3f} | "
                         f"{row['reference_alpha_rms_over_lr']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="rte")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha-lr", type=float, default=0.1)
    p.add_argument("--moments", nargs="+", default=["bf16", "factored"], choices=("bf16", "factored"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results-dir", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    label = a.model
    if a.model is None:
        from diffprune.runs import default_model

        a.model, label = str(default_model()), "the packaged all-MiniLM-L6-v2, sentence-embedding tuned"
    rec = measure(a.model, a.task, a.data_dir, a.steps, a.batch, a.seq_len, a.moments, a.lr, a.alpha_lr)
    rec.update(model=label, command=_env.command(), date=_env.now(), machine=_env.machine(),
               versions=_env.versions(),
               settings={k: getattr(a, k) for k in ("task", "steps", "batch", "seq_len", "lr", "alpha_lr")})
    text = report(rec)
    print(text)
    _env.write_results(Path(a.results_dir) / "optimizer_updates", text, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
