"""The Hugging Face Trainer trains a DiffModel as it is: no subclass, default column handling."""

import numpy as np
import torch
from datasets import Dataset

from diffprune import DiffModel, DiffPruningConfig

from .conftest import tiny_bert


def test_hf_trainer_trains_a_diff_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    n = 64
    ids = torch.randint(5, 120, (n, 8), generator=g)
    labels = (ids[:, 0] % 3).tolist()  # learnable from the first token
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "label": labels, "text": ["unused"] * n, "idx": list(range(n))})

    dm = DiffModel(tiny_bert(), DiffPruningConfig(l0_lambda=1e-5))
    opt = torch.optim.AdamW(dm.param_groups(lr=3e-2, alpha_lr=0.1))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, per_device_eval_batch_size=16, num_train_epochs=15,
        save_strategy="no", report_to=[], use_cpu=True, logging_steps=1000, disable_tqdm=True, seed=0,
    )

    def metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer = Trainer(model=dm, args=args, train_dataset=ds, eval_dataset=ds, optimizers=(opt, None),
                      compute_metrics=metrics)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert "eval_loss" in after  # labels were found from the wrapped model's signature
    assert after["eval_loss"] < before["eval_loss"] * 0.8
    assert after["eval_accuracy"] > before["eval_accuracy"]
    assert dm.expected_density() < 0.99
    dm.project(0.05)
    assert dm.nnz() == round(0.05 * dm.n_diffed)
