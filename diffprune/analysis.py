"""Where a sparse diff puts its nonzeros: counts per layer and per parameter kind, and a heat map.

Nothing here knows an architecture: the layer of a parameter is the first all-digit component of its
dotted name (``bert.encoder.layer.3.attention.self.query.weight`` -> 3, ``transformer.h.0.mlp.c_fc.bias``
-> 0; "no layer" for embeddings, pooler, final norms), and its kind comes from name patterns, with "other"
for anything they do not recognise.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

# Checked in order; the first match wins. Patterns are searched in the lower-cased name.
KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("layernorm", r"layernorm|layer_norm|(^|\.)ln(_\w+)?(\.|$)|(^|[._])norm(\d*)?(\.|$)|rmsnorm"),
    ("embeddings", r"embed|(^|\.)(wte|wpe|shared)(\.|$)"),
    ("bias", r"\.bias$"),
    ("attn_query", r"(^|\.)(query|q_proj|q_lin|q)(\.|$)"),
    ("attn_key", r"(^|\.)(key|k_proj|k_lin|k)(\.|$)"),
    ("attn_value", r"(^|\.)(value|v_proj|v_lin|v)(\.|$)"),
    ("attn_output", r"attention\.output|(^|\.)(o_proj|out_lin|out_proj|o)(\.|$)|attn\.c_proj|self_attn\.dense"),
    ("attn_qkv", r"(^|\.)(c_attn|qkv|qkv_proj|query_key_value|wqkv)(\.|$)"),
    ("ffn", r"intermediate|(^|\.)output\.dense|ffn|mlp|(^|\.)(fc\d?|lin[12]|c_fc|wi|wo|w[123]|up_proj|down_proj|gate_proj)(\.|$)"),
)
KIND_ORDER = ("embeddings", "attn_query", "attn_key", "attn_value", "attn_qkv", "attn_output", "ffn", "layernorm",
              "bias", "other")
NO_LAYER = "no layer"  # embeddings, pooler, final norms: outside the numbered layers


def layer_of(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KIND_PATTERNS:
        if re.search(pattern, low):
            return kind
    return "other"


def analyze(diff) -> dict:
    """Counts of a `SparseDiff`: per tensor, per layer, per kind, and per (layer, kind)."""
    tensors = []
    for name, shape in diff.shapes.items():
        numel = math.prod(shape) if shape else 1
        tensors.append({"name": name, "layer": layer_of(name), "kind": kind_of(name),
                        "nnz": int(diff.nnz_of(name)), "numel": int(numel)})

    def group(key):
        out: dict = {}
        for t in tensors:
            k = key(t)
            n, total = out.get(k, (0, 0))
            out[k] = (n + t["nnz"], total + t["numel"])
        return out

    by_layer = group(lambda t: t["layer"])
    layers = sorted(by_layer, key=lambda k: (k is not None, -1 if k is None else k))
    by_kind = group(lambda t: t["kind"])
    kinds = [k for k in KIND_ORDER if k in by_kind]
    grid = group(lambda t: (t["layer"], t["kind"]))

    def row(label, nnz_total):
        nnz, total = nnz_total
        return {"name": label, "nnz": nnz, "params": total, "density": nnz / total if total else 0.0}

    return {
        "nnz": diff.nnz,
        "n_diffed": diff.n_diffed,
        "density": diff.density,
        "head_parameters": sum(t.numel() for t in diff.head.values()),
        "layers": [row(NO_LAYER if k is None else str(k), by_layer[k]) for k in layers],
        "kinds": [row(k, by_kind[k]) for k in kinds],
        "grid": {
            "layers": [NO_LAYER if k is None else str(k) for k in layers],
            "kinds": kinds,
            "density": [[(grid[(lk, kk)][0] / grid[(lk, kk)][1]) if (lk, kk) in grid else None for kk in kinds]
                        for lk in layers],
            "nnz": [[grid[(lk, kk)][0] if (lk, kk) in grid else None for kk in kinds] for lk in layers],
        },
        "tensors": tensors,
    }


def storage(diff, diff_file: Path) -> dict:
    """Bytes of the diff on disk against a full fp32 copy of the same parameters (diffed + head)."""
    stored = diff_file.stat().st_size
    head = sum(t.numel() * t.element_size() for t in diff.head.values())
    full = diff.n_diffed * 4 + head
    s = diff.summary()
    bits = {k: s[k] for k in ("format_version", "value_dtype", "value_width_bits", "bits_per_nonzero",
                              "position_bits_per_nonzero", "position_bound_bits_per_nonzero", "value_bits_per_nonzero")}
    other = stored - s["position_bytes"] - s["value_bytes"] - s["head_bytes"]  # safetensors + diffprune headers
    return {"stored_bytes": stored, "full_copy_bytes": full, "ratio": stored / full if full else 0.0,
            "bytes_per_nonzero": s["bytes_per_nonzero"], "positions_bytes": s["position_bytes"],
            "values_bytes": s["value_bytes"], "head_bytes": s["head_bytes"], "header_bytes": other,
            "file_bits_per_nonzero": 8 * stored / max(s["nnz"], 1), **bits}


def _table(title: str, rows: list[dict]) -> list[str]:
    w = max([len(title)] + [len(r["name"]) for r in rows])
    lines = [f"{title:<{w}}  {'nonzeros':>10}  {'params':>12}  {'density':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<{w}}  {r['nnz']:>10,}  {r['params']:>12,}  {r['density']:>8.3%}")
    return lines


def format_report(report: dict, store: dict | None = None) -> str:
    lines = [
        f"diff: {report['nnz']:,} nonzeros of {report['n_diffed']:,} diffed parameters ({report['density']:.3%})"
        f" + {report['head_parameters']:,} dense head parameters",
    ]
    if store:
        lines.append(
            f"stored: {store['stored_bytes']:,} bytes vs {store['full_copy_bytes']:,} for a full fp32 copy "
            f"({store['ratio']:.2%}): {store['positions_bytes']:,} position + {store['values_bytes']:,} value + "
            f"{store['head_bytes']:,} head + {store['header_bytes']:,} header bytes, "
            f"{store['file_bits_per_nonzero']:.2f} bits per nonzero in all"
        )
        if "position_bits_per_nonzero" in store:
            lines.append(
                f"bits per nonzero: {store['position_bits_per_nonzero']:.2f} position (bound log2 C(n, k): "
                f"{store['position_bound_bits_per_nonzero']:.2f}) + {store['value_bits_per_nonzero']:.2f} value "
                f"({store['value_dtype']}, {store['value_width_bits']}-bit) = {store['bits_per_nonzero']:.2f}; "
                f"file format v{store['format_version']}"
            )
    lines += [""] + _table("layer", report["layers"]) + [""] + _table("kind", report["kinds"])
    g = report["grid"]
    lines += ["", "density by layer x kind (-: no such parameters)"]
    w = max(len(k) for k in g["kinds"] + ["layer"])
    lines.append("layer".ljust(6) + "".join(f"{k:>{w + 2}}" for k in g["kinds"]))
    for name, row in zip(g["layers"], g["density"]):
        cells = "".join(f"{('-' if v is None else f'{v:.2%}'):>{w + 2}}" for v in row)
        lines.append(name.ljust(6) + cells)
    return "\n".join(lines)


def plot_heatmap(report: dict, path: str | Path, title: str | None = None) -> Path:
    """A PNG heat map of density by layer (rows) x kind (columns)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    g = report["grid"]
    data = np.array([[np.nan if v is None else 100.0 * v for v in row] for row in g["density"]], dtype=float)
    fig_w = 1.2 + 1.1 * len(g["kinds"])
    fig_h = 1.5 + 0.45 * len(g["layers"])
    fig, ax = plt.subplots(figsize=(max(fig_w, 5), max(fig_h, 3)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: no such parameters
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto",
                   vmin=0.0, vmax=max(float(np.nanmax(data)) if np.isfinite(data).any() else 1.0, 1e-9))
    ax.set_xticks(range(len(g["kinds"])), g["kinds"], rotation=35, ha="right")
    ax.set_yticks(range(len(g["layers"])), g["layers"])
    ax.set_xlabel("parameter kind")
    ax.set_ylabel("layer")
    finite = data[np.isfinite(data)]
    hi = float(finite.max()) if finite.size else 0.0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if data[i, j] < 0.6 * hi else "black")
    fig.colorbar(im, ax=ax, label="nonzeros (% of parameters)")
    ax.set_title(title or f"diff density: {report['nnz']:,} nonzeros ({report['density']:.3%})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
