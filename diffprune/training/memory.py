"""Memory: what the machine has, refusing a run whose state cannot fit (before any work), the memory
options that act on the built model (`diffprune.lean`), and the importance warm-up of candidate L0."""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch

from .._io import proc_bytes
from ..errors import ConfigError, TrainError
from ..methods import Method
from .checkpoints import Position
from .config import TrainConfig
from .distributed import local_indices, permutation
from .progress import log_event


def available_memory(device) -> int | None:
    """Bytes that can still be allocated: free accelerator memory, or the system's MemAvailable."""
    if getattr(device, "type", str(device)) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return proc_bytes("/proc/meminfo", "MemAvailable")


def in_use_bytes(device) -> int | None:
    """What this process holds now: allocated accelerator memory (CUDA), or the resident set (VmRSS)."""
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return proc_bytes("/proc/self/status", "VmRSS")


def peak_bytes(device) -> int | None:
    """This process's peak memory so far: allocated accelerator memory (CUDA), or the resident set's
    high-water mark (VmHWM) on a CPU, which counts everything the process holds (the loaded model too),
    the figure that decides whether a run fits."""
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return proc_bytes("/proc/self/status", "VmHWM")


def weights_to_page_in(base, device) -> int:
    """Bytes of `base`'s weights that are not in this process's own memory yet. transformers maps a
    safetensors checkpoint lazily, so right after loading its pages are file cache that MemAvailable
    still counts as free; a model materialised in anonymous memory (or on an accelerator, checked
    against its own free memory) needs nothing more."""
    n = sum(t.numel() * t.element_size() for t in list(base.parameters()) + list(base.buffers()))
    if getattr(device, "type", str(device)) != "cpu":
        return 0
    anon = proc_bytes("/proc/self/status", "RssAnon")
    return 0 if anon is None or anon >= 0.9 * n else n


def activation_bytes(base, cfg) -> int:
    """Activations of one training step, estimated from a transformer's shape (fp32): per layer
    68 b s h + 10 a s^2 b bytes (Korthikanti et al. 2022, doubled for fp32), with activation
    checkpointing the layers' inputs plus one layer; a causal LM adds its logits and their gradient
    (12 b s V). 0 for a model that names no such shape. Measured here: a Llama-shaped 0.5B at 1 x 512,
    2.4 GiB of activations and temporaries for an estimate of 2.1 GiB."""
    c = getattr(base, "config", None)
    h, layers = getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None)
    if not (isinstance(h, int) and isinstance(layers, int)) or cfg is None:
        return 0
    heads = getattr(c, "num_attention_heads", None) or 1
    b, s = cfg.batch_size, cfg.max_seq_length
    per_layer = 68 * b * s * h + 10 * heads * s * s * b
    total = (layers * 4 * b * s * h + per_layer) if cfg.gradient_checkpointing else layers * per_layer
    if getattr(cfg, "family", None) == "causal-lm" or getattr(c, "is_decoder", False) or \
            type(base).__name__.endswith("ForCausalLM"):
        total += 12 * b * s * (getattr(c, "vocab_size", 0) or 0)
    return int(total)


def check_memory(method, base, device, cfg=None, shards: int = 1, sharing: int = 1, missing=(), family=None) -> dict:
    """Refuse before training when the run clearly cannot fit in the memory available: the method's
    training state (`training_state`: only what it trains), the weights not yet in memory
    (`weights_to_page_in`) and the activations (`activation_bytes`, an estimate from the model's shape),
    against the free memory. The gradients in that state are made in backward while it frees the
    activations (and the effective weights of the diff methods that do not recompute them), and are dropped
    before the next forward, so the larger side counts, not their sum (`training_transients`;
    benchmarks/results/train_cost.md, "live tensors, lean state": full finetuning and the lean L0 stage
    peak when the forward ends, holding no gradient). A run refused here could not have
    finished; one that passes may still be tight (temporaries, the allocator's slack), but is not killed
    by the kernel hours in for want of what was plain at the start.

    `shards`: the processes --fsdp spreads state and weights over (each holds 1/shards of them);
    `sharing`: the processes whose memory this is (on a CPU every process of the machine: two ranks on
    one host need all of it there, sharded or not; on an accelerator, its own process).

    Returns the estimate when the run fits (``estimate_bytes``: what training will add to the
    ``in_use_bytes`` the process holds now; ``available_bytes``: None where unknown; ``state``: how the
    training state adds up), which training logs beside the peaks it measures (in use + estimate is the
    expected peak)."""
    scale = sharing / shards
    weights = int(weights_to_page_in(base, device) * scale)
    acts = int(activation_bytes(base, cfg) * sharing)

    def state(c):
        """(state bytes, how they add up, the part of them that backward's gradients and the forward's
        effective weights and activations never hold at once) for the run settings c."""
        # no run settings: every parameter at the method's standard rate (`Method`'s own rule)
        owner = type(method) if c is not None else Method
        bytes_, how = owner.training_state(method, base, list(missing), c, family)
        effective, grads = owner.training_transients(method, base, list(missing), c, family)
        return int(bytes_ * scale), how, min(acts + int(effective * scale), int(grads * scale))

    def total(c) -> int:
        bytes_, _, overlap = state(c)
        return bytes_ + weights + acts - overlap

    bytes_, how, overlap = state(cfg)
    need = total(cfg)
    have = available_memory(device)
    if have is None or need <= have:
        return {"estimate_bytes": int(need), "in_use_bytes": in_use_bytes(device), "available_bytes": have,
                "state": how}

    def size(b: int) -> str:
        return f"{b / 2**30:.1f} GiB" if need >= 2**30 else f"{b / 2**20:.1f} MiB"

    hints = []
    if getattr(method, "use_gates", False) and getattr(cfg, "candidates", None) is None and cfg is not None:
        for label, extra in (("--memory lean", {"memory": "lean"}),
                             ("--memory lean --w-dtype bf16", {"memory": "lean", "w_dtype": "bf16"}),
                             ("--memory lean --moments-dtype factored", {"memory": "lean", "moments_dtype": "factored"}),
                             ("--memory lean --candidates 0.05", {"memory": "lean", "candidates": 0.05})):
            if all(getattr(cfg, k, None) == v for k, v in extra.items()):
                continue  # what this run already does
            alternative = dataclasses.replace(cfg, **extra)
            try:
                alternative.validate()
            except ConfigError:
                continue  # a combination the run's other settings refuse (--fsdp: factored moments, candidates)
            hints.append(f"{label}: about {size(total(alternative))}")
    hint = ("; " + "; ".join(hints)) if hints else ""
    parts = [f"{size(bytes_)} of training state ({how})"]
    if weights:
        parts.append(f"{size(weights)} of weights not in memory yet")
    if acts:
        parts.append(f"about {size(acts)} of activations at batch {cfg.batch_size} x {cfg.max_seq_length}")
    less = (f" - {size(overlap)} (the state's gradients are made in backward as the activations and effective "
            "weights are freed)") if overlap else ""
    where = ""
    if sharing > 1 or shards > 1:
        where = (f" ({sharing} process{'es' if sharing > 1 else ''} in this memory, each holding "
                 f"{'1/' + str(shards) if shards > 1 else 'all'} of the state)")
    raise TrainError(
        f"--method {method.name} needs about {size(need)}: {' + '.join(parts)}{less}{where}, and {size(have)} is "
        f"available{hint}; or use a smaller model or batch, --method lora, or a machine with more memory (or pass "
        "--skip-memory-check to try anyway)"
    )


def adamw_settings(optimizer) -> dict:
    g = optimizer.param_groups[0]
    return {k: g[k] for k in ("betas", "eps", "weight_decay") if k in g}


def memory_setup(model, opts: dict, cfg: TrainConfig, device):
    """Apply the memory options that act on the built model; returns the forward's autocast context."""
    import contextlib

    if cfg.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TrainError(f"--gradient-checkpointing: {type(model).__name__} has no gradient_checkpointing_enable()")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if opts["theta_dtype"] == "bf16":
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def candidate_warmup(model, cfg: TrainConfig, n_train: int, make_batch, acc, autocast, pos: Position,
                     log_path, show: bool) -> None:
    """The importance warm-up of candidate-restricted L0, then `set_candidates` (see `diffprune.candidates`)."""
    from tqdm.auto import tqdm

    from .. import candidates

    t0 = time.time()
    steps = min(cfg.candidate_warmup_steps, math.ceil(n_train / cfg.batch_size))
    perm = permutation(cfg.seed, -1, 0, n_train)
    head = [p for p in model.model.parameters() if p.requires_grad]
    head_opt = torch.optim.AdamW(head, lr=cfg.head_lr or cfg.resolved_lr(), weight_decay=0.0) if head else None
    bar = tqdm(total=steps, disable=not show, dynamic_ncols=True, file=sys.stderr, desc="candidate warm-up")

    def batches():
        for step in range(steps):
            batch = make_batch(local_indices(perm, step, cfg.batch_size, 0, 1))
            yield {k: v.to(acc.device) for k, v in batch.items()}

    def on_step(loss):
        bar.set_postfix({"loss": f"{loss:.4f}"}, refresh=False)
        bar.update(1)

    scores = candidates.importance(model, batches(), head_opt, on_step=on_step, autocast=autocast)
    bar.close()
    chosen = candidates.select(scores, cfg.candidates, importance=cfg.candidate_importance)
    del scores
    model.set_candidates(chosen)
    n = sum(int(v.numel()) for v in chosen.values())
    seconds = time.time() - t0
    pos.train_seconds += seconds
    if log_path is not None:
        log_event(log_path, {"event": "candidates", "candidates": n, "fraction": cfg.candidates, "warmup_steps": steps,
                             "importance": cfg.candidate_importance, "seconds": round(seconds, 3)})
    if show:
        print(f"candidates: {n:,} entries ({cfg.candidates:.1%} of {model.n_diffed:,}) from a {steps}-batch "
              f"importance warm-up ({seconds:.0f} s)", file=sys.stderr)
