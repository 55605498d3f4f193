"""The per-entry cost of the L0 stage's elementwise work, in isolation: what a training step of
`--memory lean` spends beyond the model's own ops (issue 16's step-time target), measured kernel by kernel.

On a flat tensor of `--entries` entries, processed in the blocks the library uses (2^17 on a CPU), one
thread, best of `--repeats`, nanoseconds per entry:

* gate noise: numpy's ``Generator.random(dtype=float32)`` against `diffprune.noise.Noise.uniform_`
  (the same values from raw words, checked equal here);
* the gate expression theta + clamp(sigmoid(logit(u) + alpha) (r - l) + l, 0, 1) w on a block, noise
  excluded: eager (the in-place passes of `diffprune.gates.GatedDiff`) against one `torch.compile`d
  kernel (skipped with `--no-compile`);
* a recomputed layer's weight and its gates' backward (`GatedDiff` under no_grad, then the backward of
  the training forward), with the recompute's gate sample handed over (`gates.ConcreteCache`) and
  without (every backward draws the noise again);
* one AdamW step of a bf16 tensor with bf16 moments (`diffprune.optim.AdamW`: torch's fused kernel on
  fp32 chunks, stochastic rounding back), of the eager chunk arithmetic that step used before
  (2026-12-06, kept here as the baseline), and of torch's fused fp32 AdamW.

A compiled row (`--compile-gates`, `gates.FusedGates`) follows the recompute-and-backward rows. With
`--step-model bert-base` (or minilm) it also times whole steps of that model at `--step-batch` x
`--step-seq-len` in one process, in rotating order: full finetuning (AdamW), and the `--memory lean` L0
stage (the AdamW step inside backward) with eager and with compiled gates on one model, with `--step-w16`
also the lean stage with --w-dtype bf16 both ways (separate processes' step times spread further than
the effect measured on this VM): the median of each. `--step-configs` adds more of train_cost.py's
configurations as arms (the dense L0 stage, the other lean variants, candidates, LoRA, the fixed-mask stage),
each on its own model, so that a whole option table's step times come from one process.

    OMP_NUM_THREADS=1 python benchmarks/gate_kernels.py        # writes benchmarks/results/gate_kernels.{md,json}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _env  # noqa: E402

from diffprune import blocks, gates, optim  # noqa: E402
from diffprune.noise import Noise  # noqa: E402

# the kernel sections (`--sections`: their short names)
SECTIONS = {"gate noise": "noise", "gate expression (noise excluded)": "gate",
            "recomputed weight + gates' backward": "backward", "AdamW step": "adamw"}

RESULTS = Path(__file__).resolve().parent / "results"
L, R = -0.1, 1.1
BLOCK = blocks.CPU_BLOCK  # the blocks GatedDiff uses on a CPU


def _best_ns(fn, entries: int, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / entries * 1e9


def noise_kernels(n: int, repeats: int) -> dict:
    buf = torch.empty(n)
    ref = np.random.Generator(np.random.PCG64(np.random.SeedSequence(3))).random(n, dtype=np.float32)
    ours = Noise(3, "cpu")
    for i in range(0, n, BLOCK):
        ours.uniform_(buf[i:i + BLOCK])
    if not np.array_equal(buf.numpy(), ref):
        raise SystemExit("Noise.uniform_ does not reproduce numpy's float32 stream")

    def numpy_random():
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence(3)))
        for i in range(0, n, BLOCK):
            gen.random(out=buf[i:i + BLOCK].numpy(), dtype=np.float32)

    def raw_words():
        noise = Noise(3, "cpu")
        for i in range(0, n, BLOCK):
            noise.uniform_(buf[i:i + BLOCK])

    return {"numpy Generator.random (float32)": _best_ns(numpy_random, n, repeats),
            "Noise.uniform_ (raw words, same values)": _best_ns(raw_words, n, repeats)}


def gate_expression(n: int, repeats: int, compile_: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, generator=g).clamp_(1e-6, 1 - 1e-6)
    alpha, w, theta = torch.randn(n, generator=g) + 3, torch.randn(n, generator=g) * 1e-3, torch.randn(n, generator=g)
    out = torch.empty(n)

    def eager():
        for i in range(0, n, BLOCK):
            j = slice(i, i + BLOCK)
            d = out[j]
            torch.logit(u[j], 1e-6, out=d).add_(alpha[j]).sigmoid_().mul_(R - L).add_(L).clamp_(0, 1).mul_(w[j]).add_(theta[j])

    res = {"eager, in place (GatedDiff's passes)": _best_ns(eager, n, repeats)}
    if compile_:
        def expr(u, a, w, t):
            return t + (torch.sigmoid(torch.logit(u, 1e-6) + a) * (R - L) + L).clamp(0, 1) * w

        fused = torch.compile(expr, dynamic=False)

        def compiled():
            for i in range(0, n - n % BLOCK, BLOCK):  # whole blocks: one compiled shape
                j = slice(i, i + BLOCK)
                out[j] = fused(u[j], alpha[j], w[j], theta[j])

        res["torch.compile, one kernel"] = _best_ns(compiled, n - n % BLOCK, repeats)
    return res


def recompute_and_backward(shape: tuple, repeats: int, compile_: bool = True) -> dict:
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(shape, generator=g)
    w = torch.nn.Parameter(torch.randn(shape, generator=g) * 1e-3)
    alpha = torch.nn.Parameter(torch.randn(shape, generator=g) + 3)
    grad = torch.randn(shape, generator=g)
    n = theta.numel()

    one = gates.ConcreteCache()  # one per model, as in training: its buffer is reused from tensor to tensor

    def run(cached: bool, fused=None):
        cache = one if cached else None
        out, e = gates.GatedDiff.apply(theta, w, alpha, None, 7, L, R, True, cache, False, fused)
        with torch.no_grad():
            gates.gated_diff(theta, w, alpha, None, 7, L, R, cache, fill=cached, fused=fused)  # the recompute
        torch.autograd.backward([out, e], [grad, torch.tensor(1e-3)])
        w.grad = alpha.grad = None

    # the training forward is the same in both; measured with it, reported per entry of the tensor
    res = {"with the recompute's sample kept (ConcreteCache)": _best_ns(lambda: run(True), n, repeats),
           "noise drawn again in backward": _best_ns(lambda: run(False), n, repeats)}
    if compile_:
        fused = gates.fused_gates(L, R)
        run(True, fused)  # compiles
        res["sample kept, compiled kernels (--compile-gates)"] = _best_ns(lambda: run(True, fused), n, repeats)
    res["tensor"] = list(shape)
    return res


@torch.no_grad()
def _eager_bf16_step(p, m, v, step: int, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0):
    """The bf16 AdamW step before 2026-12-06 (diffprune/optim.py at 2bf3b31): eager fp32 arithmetic per
    chunk with the scalars in a tensor, then stochastic rounding with torch ops."""
    noise = Noise((0, step, 0), p.device)
    fp, fg, fm, fv = p.view(-1), p.grad.view(-1), m.view(-1), v.view(-1)
    s = torch.tensor([1 - beta1, beta2, 1 - beta2, lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5, eps,
                      1 - lr * wd], dtype=torch.float32)
    for i in range(0, fp.numel(), BLOCK):
        j = slice(i, i + BLOCK)
        gf = fg[j].float()
        mf = fm[j].float().lerp(gf, s[0])
        vf = fv[j].float() * s[1] + gf * gf * s[2]
        x = fp[j].float() * s[6] - s[3] * mf / (vf.sqrt() / s[4] + s[5])
        r = noise.int32(x.numel())
        fm[j].copy_(mf.to(torch.bfloat16))
        for dst, src, bits in ((fp[j], x, r & 0xFFFF), (fv[j], vf, r.bitwise_right_shift(16).bitwise_and_(0xFFFF))):
            src.view(torch.int32).add_(bits).bitwise_and_(-65536)
            dst.copy_(src)


def adamw_steps(n: int, repeats: int) -> dict:
    def param(dtype):
        g = torch.Generator().manual_seed(2)
        p = torch.nn.Parameter((torch.randn(n, generator=g) + 5).to(dtype))
        p.grad = (torch.randn(n, generator=g) * 1e-2).to(dtype)
        return p

    ours = param(torch.bfloat16)
    opt = optim.AdamW([ours], lr=0.1, weight_decay=0.0)
    base = param(torch.bfloat16)
    m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    counter = [0]

    def eager():
        counter[0] += 1
        _eager_bf16_step(base, m, v, counter[0])

    fp32 = param(torch.float32)
    fused = torch.optim.AdamW([fp32], lr=0.1, weight_decay=0.0, fused=True)
    out = {"diffprune.optim.AdamW, bf16 tensor and moments": _best_ns(opt.step, n, repeats),
           "eager chunk arithmetic (the step before 2026-12-06)": _best_ns(eager, n, repeats),
           "torch fused AdamW, fp32": _best_ns(fused.step, n, repeats)}
    w16m = param(torch.float32)
    out["diffprune.optim.AdamW, fp32 tensor, bf16 moments"] = _best_ns(
        optim.AdamW([{"params": [w16m], "state_dtype": "bf16"}], lr=0.1, weight_decay=0.0).step, n, repeats)
    cols = min(n, 768)  # as matrices of 768 columns (bert-base's hidden size)
    rows = n // cols
    for dtype, what in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        flat = param(dtype)
        mat = torch.nn.Parameter(flat.detach()[: rows * cols].view(rows, cols).clone())
        mat.grad = flat.grad[: rows * cols].view(rows, cols).clone()
        step = optim.AdamW([{"params": [mat], "state_dtype": "factored"}], lr=0.1, weight_decay=0.0).step
        out[f"diffprune.optim.AdamW, {what} matrix x {cols}, factored moments"] = _best_ns(step, rows * cols, repeats)
    return out


def lean_steps_ab(model_name: str, batch: int, seq_len: int, rounds: int, w16: bool = False,
                  factored: bool = False, configs: tuple[str, ...] = ()) -> dict:
    """Whole steps of `model_name` in one process: full finetuning (AdamW), the lean L0 stage with eager
    gates and with compiled ones (and with `w16` the same with --w-dtype bf16, with `factored` with eager
    gates and --moments-dtype factored; `configs`: more of train_cost's configurations, each an arm
    named by its title there), in rotating order each round; the median step time of each and the
    ratios to full finetuning's."""
    import statistics

    import train_cost as tc

    extra = [c for c in configs if c not in ("full", "l0_lean")]
    if w16 and "l0_lean_w16" not in extra:
        extra.append("l0_lean_w16")
    if factored and "l0_lean_factored" not in extra:
        extra.append("l0_lean_factored")
    built = {}
    for config in ["full", "l0_lean"] + extra:
        model = tc.build_model(model_name)
        data = tc.make_batch(model, batch, seq_len, torch.device("cpu"))
        built[config] = (*tc.setup(config, model, "fused", batch=data), data)
    arms = {"full": ("full", None), "lean, eager gates": ("l0_lean", False), "lean, compiled gates": ("l0_lean", True)}
    for config in extra:
        if config == "l0_lean_w16" and w16:
            arms.update({"lean --w-dtype bf16, eager gates": ("l0_lean_w16", False),
                         "lean --w-dtype bf16, compiled gates": ("l0_lean_w16", True)})
        elif config == "l0_lean_factored" and factored:
            arms["lean --moments-dtype factored, eager gates"] = ("l0_lean_factored", False)
        else:
            arms[tc.TITLES[config]] = (config, None)

    def step(which: str) -> float:
        config, compiled = arms[which]
        module, opt, params, data = built[config]
        if compiled is not None:
            module.compile_gates = compiled
        t = time.perf_counter()
        module(**data).loss.backward()
        if not hasattr(opt, "clipped_steps"):  # (lean.OptimizerInBackward clips and steps inside backward)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    names = list(arms)
    for which in names:  # warm-up, compilation included
        step(which)
    times = {a: [] for a in names}
    for i in range(rounds):
        k = i % len(names)
        for which in names[k:] + names[:k]:
            times[which].append(step(which))
    med = {a: statistics.median(t) for a, t in times.items()}
    return {"model": model_name, "batch": batch, "seq_len": seq_len, "rounds": rounds, "median_s": med,
            "ratio_to_full": {a: med[a] / med["full"] for a in names[1:]},
            "compiled_vs_eager": med["lean, compiled gates"] / med["lean, eager gates"], "steps_s": times}


def report(rec: dict) -> str:
    lines = ["# The L0 stage's elementwise kernels, per entry", "",
             "What a `--memory lean` step spends beyond the model's own ops, kernel by kernel "
             "(`benchmarks/gate_kernels.py`): nanoseconds per entry, best of "
             f"{rec['repeats']}, {rec['threads']} thread(s), blocks of 2^17 entries.", "",
             f"- Command: `{rec['command']}`", f"- Date: {rec['date']}",
             f"- Machine: {rec['machine']['cpu']}, {rec['machine']['cores']} cores, {rec['machine']['platform']}",
             f"- Versions: {', '.join(f'{k} {v}' for k, v in rec['versions'].items())}"]
    if rec.get("note"):
        lines.append(f"- Note: {rec['note']}")
    lines += ["", "| kernel | variant | ns / entry |", "|---|---|---:|"]
    for section, vals in rec["kernels"].items():
        for variant, ns in vals.items():
            if isinstance(ns, float):
                lines.append(f"| {section} | {variant} | {ns:.2f} |")
    if "recomputed weight + gates' backward" in rec["kernels"]:
        shape = rec["kernels"]["recomputed weight + gates' backward"]["tensor"]
        what = " (bert-base's FFN matrix)" if tuple(shape) == (3072, 768) else ""
        lines += ["", f"The recompute-and-backward rows include the training forward (the same in both) on a "
                  f"{shape[0]} x {shape[1]} tensor{what}.", ""]
    else:
        lines.append("")
    ab = rec.get("lean_steps")
    if ab:
        lines += [f"Whole steps of {ab['model']} at batch {ab['batch']} x {ab['seq_len']} in one process (`--step-model`), "
                  f"{len(ab['median_s'])} kinds in rotating order, {ab['rounds']} rounds, median:", "",
                  "| step | seconds (median) | vs full finetuning | every step (s) |", "|---|---:|---:|---|"]
        for a, t in ab["median_s"].items():
            ratio = ab["ratio_to_full"].get(a, 1.0)
            lines.append(f"| {a} | {t:.2f} | {ratio:.3f}x | {', '.join(f'{x:.2f}' for x in ab['steps_s'][a])} |")
        lines += ["", f"Compiled against eager gates: **{ab['compiled_vs_eager']:.3f}x** the lean step time.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=1 << 23)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (it needs a C++ compiler)")
    p.add_argument("--step-model", choices=("minilm", "bert-base"), default=None,
                   help="also time whole lean L0 steps of this model, eager against compiled gates")
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--step-seq-len", type=int, default=128)
    p.add_argument("--step-rounds", type=int, default=6)
    p.add_argument("--step-w16", action="store_true", help="also the lean stage with --w-dtype bf16, eager and compiled")
    p.add_argument("--step-factored", action="store_true", help="also the lean stage with --moments-dtype factored (eager)")
    p.add_argument("--step-configs", nargs="+", default=[], metavar="CONFIG",
                   help="more arms for the whole steps: train_cost.py configurations (e.g. l0 l0_lean_m16 "
                        "candidates lora_all32 fixed), each on its own model")
    p.add_argument("--sections", nargs="+", default=None, choices=list(SECTIONS.values()),
                   help="only these kernel sections")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(RESULTS / "gate_kernels"), help="results path without suffix")
    args = p.parse_args(argv)
    if args.step_model and args.no_compile:
        p.error("--step-model compares eager with compiled gates: it cannot run with --no-compile")
    import train_cost as tc

    unknown = [c for c in args.step_configs if c not in tc.CONFIGS]
    if unknown:
        p.error(f"--step-configs: unknown {', '.join(unknown)} (train_cost.py's: {', '.join(tc.CONFIGS)})")
    torch.set_num_threads(args.threads)
    n = args.entries
    shape = (3072, 768) if n >= 3072 * 768 else (max(1, n // 64), 64)
    sections = {
        "gate noise": lambda: noise_kernels(n, args.repeats),
        "gate expression (noise excluded)": lambda: gate_expression(n, args.repeats, not args.no_compile),
        "recomputed weight + gates' backward": lambda: recompute_and_backward(shape, args.repeats, not args.no_compile),
        "AdamW step": lambda: adamw_steps(n, args.repeats),
    }
    kernels = {name: run() for name, run in sections.items() if args.sections is None or SECTIONS[name] in args.sections}
    steps_ab = lean_steps_ab(args.step_model, args.step_batch, args.step_seq_len, args.step_rounds,
                             args.step_w16, args.step_factored, tuple(args.step_configs)) if args.step_model else None
    rec = {"kernels": kernels, "lean_steps": steps_ab, "entries": n, "repeats": args.repeats, "threads": args.threads,
           "machine": _env.machine(), "versions": _env.versions(), "command": _env.command(),
           "date": _env.now(), "note": args.note}
    text = report(rec)
    print(text)
    _env.write_results(args.out, text, rec)
    return rec


if __name__ == "__main__":
    main()
