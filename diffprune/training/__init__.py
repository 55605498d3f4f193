"""The training loop behind `diffprune train`: diff pruning and the methods it is compared with.

    from diffprune.training import TrainConfig, train
    metrics = train(TrainConfig(output_dir="runs/rte", task="rte", data_dir="../shared/glue"))

Methods (``TrainConfig.method``):

* ``diff``       L0 stage (hard-concrete gates, lambda * E[||delta||_0]) for `epochs`, projection onto
                 exactly round(t * n) nonzeros, then fixed-mask finetuning for `fixmask_epochs`.
* ``structured`` the same with one extra gate per parameter tensor (the default).
* ``magnitude``  the paper's non-adaptive baseline: a dense diff with no gates (= full finetuning) for
                 `epochs`, keep the top t of |theta_ft - theta_pre|, then fixed-mask finetuning.
* ``full``       plain finetuning of every parameter (saves a transformers checkpoint).
* ``lora``       PEFT LoRA r=8, alpha=16 on the attention query and value projections, head trained.
* ``shira``      PEFT SHiRA: a fixed random sparse mask on LoRA's targets, r sized to `target_sparsity`.
* ``bitfit``     only the bias terms and the head train (stored as a diff of the biases).

``stop_after="l0"`` ends a diff-method run at its L0 checkpoint; ``from_l0=RUN_DIR`` starts a run from
it, projected onto its own budget (a budget sweep trains the L0 stage once).

How each method builds, trains, saves and loads is its class in `diffprune.methods` (the registry);
how each model family (classifier, causal LM) loads its data and base, batches and scores is its
class in `diffprune.families`. This package is the run: `config` (TrainConfig), `loop` (train, top to
bottom), `checkpoints`, `rundir` (the output directory), `memory` (state estimate, memory options,
candidate warm-up), `progress` (ETA, log) and `distributed` (processes and their share of the data).

One phase is a run of epochs with one AdamW optimiser (weight decay 0), linear decay to 0, no warmup,
gradient clipping at 1.0. Batches are padded to their own longest example. Data-parallel training
runs through `accelerate` (``torchrun --nproc_per_node N -m diffprune train ...``): each process takes
its share of every global batch, gradients are averaged, the main process alone writes the run.

Checkpoints (every `save_steps` steps and at every epoch end) hold the trainable state, the optimiser
state, every process's RNG state and the position in the data, in safetensors + JSON; `resume=True`
continues from the last one exactly where it stopped (same data order, same noise).
"""

from __future__ import annotations

from ..errors import TrainError
from ..methods import Phase
from .checkpoints import Position, latest_checkpoint, state_hash
from .config import DEFAULT_LR, RESUME_KEYS, UNRECORDED_SETTINGS, TrainConfig
from .loop import STEP_SLEEP_ENV, choose_family, evaluate, train
from .memory import available_memory, check_memory

__all__ = [
    "DEFAULT_LR", "RESUME_KEYS", "STEP_SLEEP_ENV", "UNRECORDED_SETTINGS", "Phase", "Position", "TrainConfig",
    "TrainError", "available_memory", "check_memory", "choose_family", "evaluate", "latest_checkpoint", "state_hash",
    "train",
]
