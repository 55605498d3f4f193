"""The model card (README.md) of a run directory."""

from __future__ import annotations

from pathlib import Path

from ._io import atomic_write_text
from .methods import METHODS

_METHOD_TEXT = {name: m.description for name, m in METHODS.items()}


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def render_model_card(metrics: dict, task_info: dict, source: dict | None = None) -> str:
    m, info = metrics, task_info
    method = m["method"]
    settings = m.get("settings", {})
    lines = [
        f"# {m['task']} — {_METHOD_TEXT.get(method, method)}",
        "",
        f"Trained with [diffprune](https://arxiv.org/abs/2012.07463) (`diffprune train --method {method}`).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{m['base_model']}` |",
    ]
    if m.get("base_fingerprint"):
        lines.append(f"| base fingerprint | `{m['base_fingerprint']}` |")
    causal = info.get("family") == "causal-lm"
    if causal:
        lines.append(f"| task | {m['task']} (causal language model; data: {info.get('data_format')}) |")
    else:
        lines.append(f"| task | {m['task']} ({info['task_type']}; text: {', '.join(info['text_columns'])}"
                     + (f"; labels: {', '.join(map(str, info['labels']))}" if info.get("labels") else "") + ") |")
    lines.append(f"| method | {method} |")
    if "n_diffed" in m:
        lines += [
            f"| nonzeros | {m['nnz']:,} of {m['n_diffed']:,} diffed parameters ({m['density']:.3%}; "
            f"target {m['target_sparsity']:.3%}) + {m['head_parameters']:,} head parameters |",
        ]
    else:
        lines.append(f"| task-specific parameters | {m['task_parameters']:,} of {m['total_parameters']:,} |")
    lines += [
        f"| stored | {_bytes(m['stored_bytes'])} ({m['stored_bytes']:,} bytes; a full fp32 copy of the model is "
        f"{_bytes(m['full_model_bytes'])}) |",
        f"| validation score | {m['score']:.2f} ({' / '.join(f'{k} {v:.4f}' for k, v in m['final'].items())}) |",
        f"| training | {m['train_examples']:,} examples, {m['steps']:,} steps, {m['train_seconds']:.0f} s"
        f" on {m['world_size']} process(es)"
        + (f", peak memory {_bytes(m['peak_memory_bytes'])}" if m.get("peak_memory_bytes") else "") + " |",
        "",
        "## Validation by epoch",
        "",
        "| phase | epoch | score | metrics |",
        "|---|---|---|---|",
    ]
    for r in m.get("epochs", []):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
        lines.append(f"| {r['phase']} | {r['epoch']} | {r['score']:.2f} | {shown} |")
    if m.get("after_projection"):
        ap = m["after_projection"]
        lines += ["", f"Right after projection to {ap['nnz']:,} nonzeros (before fixed-mask training) the score was "
                      f"{ap['score']:.2f}."]
    keys = ("lr", "alpha_lr", "fixmask_lr", "l0_lambda", "target_sparsity", "epochs", "fixmask_epochs", "batch_size",
            "max_seq_length", "max_train_samples", "seed")
    lines += ["", "## Settings", "", ", ".join(f"{k}={settings[k]}" for k in keys if k in settings)]
    if source:
        lines += ["", "Data: " + ", ".join(f"{k} `{v}`" for k, v in source.items())]
    if causal:
        use = ["diffprune predict RUN_DIR --prompt \"...\"   # streams the generated text", "diffprune eval RUN_DIR",
               "diffprune serve RUN_DIR   # OpenAI-compatible /v1/completions and /v1/chat/completions"]
    else:
        use = ["diffprune predict RUN_DIR --text \"...\""
               + (" --text-pair \"...\"" if len(info["text_columns"]) == 2 else ""), "diffprune eval RUN_DIR"]
    if "n_diffed" in m:
        use += ["diffprune inspect RUN_DIR --plot density.png",
                "diffprune merge RUN_DIR --output-dir merged   # an ordinary transformers checkpoint"]
    if causal and "score" in m:
        lines.insert(lines.index("## Validation by epoch") - 1,
                     "Score: exact match x 100 of greedy generations when the validation rows carry references, "
                     "else perplexity (lower is better).")
    lines += ["", "## Use", "", "```bash", *use, "```"]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: str | Path, metrics: dict, task_info: dict, source: dict | None = None) -> Path:
    path = Path(run_dir) / "README.md"
    atomic_write_text(path, render_model_card(metrics, task_info, source))
    return path
