"""`diffprune train`: diff-prune (or finetune) a model on a GLUE task or your own data."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Diff-prune a pretrained model on a task: learn a sparse diff (exactly --target-sparsity of the
parameters) on top of the frozen model, and write it with the metrics and a model card to --output-dir.

  diffprune train --task rte --data-dir ../shared/glue --output-dir runs/rte
  diffprune train --train-file train.csv --validation-file dev.csv --text-columns review \\
                  --label-column stars --output-dir runs/reviews
  torchrun --nproc_per_node 2 -m diffprune train --task rte ...          (data-parallel)
  accelerate launch --multi_gpu --num_processes 2 -m diffprune train ...  (the same; on CPU too:
                          "--cpu --num_processes 2" would start only one process)
  torchrun --nproc_per_node 2 -m diffprune train --fsdp ...              (FSDP2: weights and diff
                          state sharded over the processes)

Methods: structured (default: diff pruning with per-tensor group gates), diff (unstructured),
magnitude (non-adaptive baseline), and for comparison full (plain finetuning), lora (PEFT LoRA r=8
on query/value), shira (PEFT SHiRA, r sized to --target-sparsity) and bitfit (biases + head).
Budget sweeps: --stop-after l0 once, then --from-l0 RUN --target-sparsity T per budget.
"""


def _float_or_none(text: str):
    return None if text.lower() in ("none", "default") else float(text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..candidates import IMPORTANCE
    from ..config import GROUP_PENALTIES
    from ..tasks import GLUE_TASKS
    from ..methods import METHODS
    from ..lean import MOMENTS
    from ..training import TrainConfig

    d = TrainConfig(output_dir="")
    p = subparsers.add_parser("train", help="diff-prune a model on a task", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("task and data")
    g.add_argument("--task", help=f"a GLUE task: {', '.join(GLUE_TASKS)} (omit for your own data)")
    g.add_argument("--data-dir", help="folder with <task>/train.tsv and <task>/validation.tsv (default: the HF hub)")
    g.add_argument("--train-file", help="your training data: .csv, .tsv or .jsonl (rows with prompt + completion, "
                   "messages or text train a causal LM: README, \"Causal language models\")")
    g.add_argument("--validation-file", help="your validation data (same columns / shape)")
    g.add_argument("--text-columns", nargs="+", metavar="COLUMN", help="one or two text columns")
    g.add_argument("--label-column", help="label column (default: label)")
    g.add_argument("--task-type", choices=["classification", "regression"], default=None,
                   help="for your own data: classification or regression (default: inferred from the training "
                        "labels - integer ids or names are classes, non-integer numbers a regression target - and "
                        "printed first)")
    g.add_argument("--max-train-samples", type=int, help="use only the first N training examples")
    g.add_argument("--max-eval-samples", type=int, help="use only the first N validation examples")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", help="Hugging Face model id or folder (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--method", choices=tuple(METHODS), default=d.method, help="default: structured")
    g.add_argument("--family", choices=("classifier", "causal-lm"), default=None,
                   help="model family (default: causal-lm when --train-file holds prompt/completion, messages or "
                        "text rows, else classifier)")
    g.add_argument("--target-modules", nargs="+", metavar="PATTERN", default=None,
                   help="diff only parameters matching these patterns (globs such as '*_proj' or '**.mlp.**', or "
                        "regexes over dotted name components); default: every parameter for classifiers, all but "
                        "the embeddings and LM head for causal LMs")
    g.add_argument("--output-dir", required=True, help="run directory to write")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    g.add_argument("--stop-after", choices=("l0",), default=None,
                   help="l0: stop when the L0 stage ends, keeping its checkpoint (for --from-l0; --resume goes on)")
    g.add_argument("--from-l0", metavar="RUN_DIR", default=None,
                   help="start from the L0 stage of a run stopped with --stop-after l0 and project it onto this "
                        "run's --target-sparsity (budget sweeps train the L0 stage once; only --target-sparsity, "
                        "--fixmask-epochs and --fixmask-lr may differ from that run's settings)")
    g = p.add_argument_group("hyperparameters")
    g.add_argument("--target-sparsity", type=float, default=d.target_sparsity,
                   help="fraction of parameters the diff keeps (default 0.005 = 0.5%%; shira: its r is sized to "
                        "match it; bitfit keeps every bias entry)")
    g.add_argument("--l0-lambda", type=float, default=d.l0_lambda, help="L0 penalty weight (default 1.25e-7)")
    g.add_argument("--group-penalty", choices=GROUP_PENALTIES, default=d.group_penalty,
                   help="structured: per_gate (default; the paper's reference code, each gate counted once: "
                        "group gates close only when the task pushes them) or expected_l0 (the paper's equation, "
                        "lambda * sum P(z_i) P(z_g); closes most group gates within ~100 steps on MiniLM)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs of the first stage (default 3)")
    g.add_argument("--fixmask-epochs", type=int, default=d.fixmask_epochs,
                   help="epochs of fixed-mask finetuning after projection (default 3; diff methods)")
    lrs = ", ".join(f"{m.name} {m.default_lr:g}"
                    + (f" ({m.candidates_lr:g} with --candidates)" if m.candidates_lr else "") for m in METHODS.values())
    g.add_argument("--lr", type=_float_or_none, default=None,
                   help=f"learning rate of the first stage (diff methods: of w; default by method: {lrs})")
    g.add_argument("--alpha-lr", type=float, default=d.alpha_lr, help="learning rate of the gate logits (default 0.1)")
    g.add_argument("--fixmask-lr", type=float, default=d.fixmask_lr, help="fixed-mask stage learning rate (default 5e-4; the paper: 5e-5)")
    g.add_argument("--head-lr", type=float, default=None, help="task head learning rate in the first stage (default: --lr)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per process per step (default 8)")
    g.add_argument("--max-seq-length", type=int, default=d.max_seq_length, help="tokens per example (default 128)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--value-dtype", choices=("fp32", "bf16", "fp16", "int8"), default=d.value_dtype,
                   help="how the diff file stores the values (default fp32, exact; bf16/fp16 halve them; int8 with "
                        "per-block scales quarters them; see also `diffprune compress`)")
    g = p.add_argument_group("memory (README, \"Training cost and memory\")")
    g.add_argument("--memory", choices=("standard", "lean"), default=d.memory,
                   help="lean: the optimiser step inside backward (not with --candidates, whose gradients are "
                        "small), gate logits in bf16 and effective weights recomputed in backward: the options whose "
                        "GLUE scores are measured to keep accuracy (default standard)")
    g.add_argument("--optimizer-in-backward", type=_bool, default=None, metavar="{true,false}",
                   help="step each tensor as soon as its gradient is complete (no persistent gradients; "
                        "clipping uses the previous step's norm; one process only)")
    g.add_argument("--alpha-dtype", choices=("fp32", "bf16"), default=None, help="gate logits and their moments")
    g.add_argument("--w-dtype", choices=("fp32", "bf16"), default=None,
                   help="the L0 stage's diff values w and their moments (bf16: stochastically rounded; not part of "
                        "--memory lean: README, each option's GLUE score)")
    g.add_argument("--moments-dtype", choices=MOMENTS, default=None,
                   help="the L0 stage's AdamW moments (bf16: w's, stochastically rounded; factored: w's and alpha's "
                        "first moment in bf16 and the second moment factored over each matrix's rows and columns, "
                        "as Adafactor does; neither is part of --memory lean: README, each option's GLUE score)")
    g.add_argument("--recompute-weights", type=_bool, default=None, metavar="{true,false}",
                   help="recompute each layer's theta + delta in backward instead of keeping it")
    g.add_argument("--theta-dtype", choices=("fp32", "bf16"), default=None,
                   help="frozen weights (bf16: GPUs only, under bf16 autocast; not part of --memory lean until its "
                        "GLUE score is measured on a GPU)")
    g.add_argument("--compile-gates", action="store_true",
                   help="run the dense L0 stage's gate arithmetic as torch.compile'd kernels: faster (one pass per "
                        "block instead of a dozen), the same values up to float rounding; compiles on first use")
    g.add_argument("--gradient-checkpointing", action="store_true", help="the model's activation checkpointing")
    g.add_argument("--candidates", type=float, default=None,
                   help="diff / structured: restrict the L0 stage to this fraction of entries (e.g. 0.05), chosen "
                        "by an importance warm-up: memory O(c n) instead of O(n)")
    g.add_argument("--candidate-warmup-steps", type=int, default=d.candidate_warmup_steps,
                   help="batches of that warm-up (default 200, at most one epoch)")
    g.add_argument("--candidate-importance", choices=IMPORTANCE, default=d.candidate_importance,
                   help="how that warm-up ranks entries: grad = accumulated |gradient| over all tensors (default); "
                        "grad_per_tensor = each tensor's divided by its root mean square")
    g.add_argument("--fsdp", action="store_true",
                   help="FSDP2 over the processes: frozen weights sharded per block, the diff state (w, alpha, "
                        "values, gradients, moments) per tensor; N processes train as one with the global batch")
    g = p.add_argument_group("running")
    g.add_argument("--save-steps", type=int, default=d.save_steps,
                   help="checkpoint every N steps (default 500; 0: only at epoch ends)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--generation-max-new-tokens", type=int, default=d.generation_max_new_tokens,
                   help="causal LMs: token limit of the greedy generations scored for exact match (default 32)")
    g.add_argument("--log-steps", type=int, default=d.log_steps, help="log loss and density every N steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--skip-memory-check", action="store_true",
                   help="start even when the training state is estimated not to fit in the available memory")
    g.add_argument("--debug-rank-hashes", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=run)
    return p


def _bool(text: str) -> bool:
    v = str(text).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def run(args) -> int:
    from ..training import TrainConfig, train

    cfg = TrainConfig(
        output_dir=args.output_dir, task=args.task, data_dir=args.data_dir, model=args.model, method=args.method,
        target_sparsity=args.target_sparsity, l0_lambda=args.l0_lambda, group_penalty=args.group_penalty,
        epochs=args.epochs, fixmask_epochs=args.fixmask_epochs, lr=args.lr, alpha_lr=args.alpha_lr,
        fixmask_lr=args.fixmask_lr,
        batch_size=args.batch_size, max_seq_length=args.max_seq_length, max_train_samples=args.max_train_samples,
        seed=args.seed, overwrite=args.overwrite, resume=args.resume, save_steps=args.save_steps,
        progress=not args.no_progress, train_file=args.train_file, validation_file=args.validation_file,
        text_columns=args.text_columns, label_column=args.label_column, max_eval_samples=args.max_eval_samples,
        head_lr=args.head_lr, eval_batch_size=args.eval_batch_size, log_steps=args.log_steps,
        debug_rank_hashes=args.debug_rank_hashes, task_type=args.task_type, check_memory=not args.skip_memory_check,
        value_dtype=args.value_dtype, memory=args.memory, optimizer_in_backward=args.optimizer_in_backward,
        alpha_dtype=args.alpha_dtype, recompute_weights=args.recompute_weights, theta_dtype=args.theta_dtype,
        moments_dtype=args.moments_dtype, w_dtype=args.w_dtype, compile_gates=args.compile_gates,
        gradient_checkpointing=args.gradient_checkpointing, candidates=args.candidates,
        candidate_warmup_steps=args.candidate_warmup_steps,
        candidate_importance=args.candidate_importance, family=args.family, target_modules=args.target_modules,
        generation_max_new_tokens=args.generation_max_new_tokens, stop_after=args.stop_after, from_l0=args.from_l0,
        fsdp=args.fsdp,
    )
    metrics = train(cfg)
    if metrics is None:
        return 0
    if "stopped_after" in metrics:  # --stop-after l0: where the L0 state is
        summary = dict(metrics)
    else:
        summary = {k: metrics[k] for k in ("task", "method", "score", "final", "nnz", "stored_bytes", "train_seconds")}
        summary["output_dir"] = args.output_dir
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary), file=sys.stdout)
    return 0
