"""What a causal LM's default diff covers: entries of the embeddings + LM head against the rest, for the
shapes of real decoder-only models (built on the meta device from their configs: no weights, no download).

    python benchmarks/causal_defaults.py        # writes benchmarks/results/causal_defaults.{md,json}

Why it matters: the L0 stage keeps w, alpha and their optimiser state for every diffed entry, and the
budget round(t n) is shared over them. With a 128k-152k token vocabulary the embedding matrix (and an
untied LM head) is a fifth to a half of a small model's entries. This counts, per model, the diffed
entries with the default (embeddings and LM head frozen) and with every tensor diffed, and the dense L0
state of each at 36 bytes per entry (`DiffMethod.state_bytes_per_parameter`, standard options).
Accuracy cannot be measured here (no pretrained causal LM installs offline); this is the cost side.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _env  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "causal_defaults"

# (name, config class, kwargs): published shapes of the models
SHAPES = [
    ("GPT-2 small (124M, tied)", "GPT2Config", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12)),
    ("Qwen2.5-0.5B (tied)", "Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                                 tie_word_embeddings=True)),
    ("Llama-3.2-1B (tied)", "LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                                 num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                                 tie_word_embeddings=True)),
    ("Llama-3.2-3B (tied)", "LlamaConfig", dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                                                 num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                                                 tie_word_embeddings=True)),
    ("Mistral-7B (untied)", "MistralConfig", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                                  tie_word_embeddings=False)),
]


def count(config_cls: str, kwargs: dict) -> dict:
    import torch
    import transformers

    from diffprune.config import DiffPruningConfig
    from diffprune.families import get_family
    from diffprune.methods import get_method

    config = getattr(transformers, config_cls)(**kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    sel = get_family("causal-lm").selection(model, [], None)
    cfg = DiffPruningConfig(**sel)
    params = dict(model.named_parameters())  # tied tensors once
    total = sum(p.numel() for p in params.values())
    diffed = sum(p.numel() for n, p in params.items() if cfg.role_of(n) == "diff")
    per = get_method("structured").state_bytes_per_parameter()
    return {"parameters": total, "diffed_default": diffed, "frozen_default": total - diffed,
            "frozen_share": (total - diffed) / total, "frozen_tensors": sorted(n for n in params if cfg.role_of(n) != "diff"),
            "l0_state_gib_default": diffed * per / 2**30, "l0_state_gib_all": total * per / 2**30}


def main() -> None:
    rows = [{"model": name, **count(cls, kw)} for name, cls, kw in SHAPES]
    lines = [
        "# What the causal-LM default diffs",
        "",
        f"Machine: {_env.machine()['cpu']}; date {_env.now()}; command `{_env.command()}`.",
        "Counts from the published configs (meta device, no weights). Default: every tensor except the "
        "embeddings (token, position) and the LM head; the L0 stage's state is 36 bytes per diffed entry "
        "(standard options; `--memory lean --candidates 0.05` cuts it, see train_cost.md).",
        "",
        "| model | parameters | diffed by default | frozen (embeddings + LM head) | dense L0 state, default | "
        "dense L0 state, every tensor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:,.0f}M | {r['diffed_default'] / 1e6:,.0f}M | "
                     f"{(r['frozen_default']) / 1e6:,.0f}M ({r['frozen_share']:.0%}) | {r['l0_state_gib_default']:.1f} GiB | "
                     f"{r['l0_state_gib_all']:.1f} GiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    _env.write_results(OUT, text, {"machine": _env.machine(), "versions": _env.versions(), "command": _env.command(),
                                   "date": _env.now(), "rows": rows})


if __name__ == "__main__":
    main()
