"""GLUE metrics (scipy / scikit-learn) and the single 0-100 score per task.

Metric names follow the Hugging Face ``glue`` metric: ``accuracy``, ``f1`` (of the positive class,
MRPC/QQP), ``matthews_correlation`` (CoLA), ``pearson`` and ``spearmanr`` (STS-B). Custom tasks
also get ``macro_f1`` (more than two classes). A correlation of constant predictions is undefined;
it is reported as 0.0, the value of an uninformative predictor.
"""

from __future__ import annotations

import math

import numpy as np

from .tasks import GLUE_TASKS, TaskSpec


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else 0.0


def _correlations(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    if len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return {"pearson": 0.0, "spearmanr": 0.0}
    return {"pearson": _finite(pearsonr(preds, labels)[0]), "spearmanr": _finite(spearmanr(preds, labels)[0])}


def compute_metrics(names, predictions, labels) -> dict[str, float]:
    """The metrics `names` of class-id predictions (or float scores for correlations) against `labels`."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    preds, gold = np.asarray(predictions), np.asarray(labels)
    if preds.shape != gold.shape:
        raise ValueError(f"{preds.shape[0]} predictions for {gold.shape[0]} labels")
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float((preds == gold).mean()) if len(gold) else 0.0
        elif name == "f1":
            out[name] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0))
        elif name == "macro_f1":
            out[name] = float(f1_score(gold, preds, average="macro", zero_division=0))
        elif name == "matthews_correlation":
            out[name] = _finite(matthews_corrcoef(gold, preds))
        elif name in ("pearson", "spearmanr"):
            out.update(_correlations(preds.astype(np.float64), gold.astype(np.float64)))
        else:
            raise ValueError(f"unknown metric {name!r}")
    return {n: out[n] for n in names}


def task_metrics(spec: TaskSpec, outputs, labels) -> dict[str, float]:
    """Metrics of a task from model outputs: logits [n, k] (argmax) or regression scores [n] / [n, 1]."""
    out = np.asarray(outputs, dtype=np.float64)
    if spec.is_regression:
        preds = out.reshape(len(out))
    else:
        preds = out.argmax(-1)
    return compute_metrics(spec.metrics, preds, np.asarray(labels))


def score_of(spec: TaskSpec, metrics: dict) -> float:
    """Mean of the task's score metrics x 100 (GLUE conventions; custom: accuracy or Pearson)."""
    return 100.0 * float(np.mean([metrics[m] for m in spec.score_metrics]))


def glue_score(task: str, metrics: dict) -> float:
    """GLUE score of a task in 0-100: the mean of its metrics x 100.

    MRPC/QQP: mean(accuracy, F1); STS-B: mean(Pearson, Spearman); CoLA: Matthews x 100; others accuracy.
    """
    spec = GLUE_TASKS.get(task)
    if spec is None:
        raise KeyError(f"{task!r} is not a GLUE task ({', '.join(GLUE_TASKS)})")
    return score_of(spec, metrics)
