"""GLUE metrics and scores against hand-computed values."""

import math

import numpy as np
import pytest

from diffprune.metrics import compute_metrics, glue_score, score_of, task_metrics
from diffprune.tasks import GLUE_TASKS, custom_spec


def test_accuracy_f1_matthews_by_hand():
    preds = [1, 1, 0, 0, 1, 0]
    gold = [1, 0, 0, 1, 1, 0]
    m = compute_metrics(["accuracy", "f1", "matthews_correlation"], preds, gold)
    tp, fp, fn, tn = 2, 1, 1, 2
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["matthews_correlation"] == pytest.approx(mcc)


def test_correlations_and_constant_predictions():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.5])
    m = compute_metrics(["pearson", "spearmanr"], 2 * x + 1, x)
    assert m == pytest.approx({"pearson": 1.0, "spearmanr": 1.0})
    m = compute_metrics(["pearson", "spearmanr"], [1, 2, 3, 4, 5], [5, 4, 3, 2.5, 1])
    assert m["spearmanr"] == pytest.approx(-1.0)
    # constant predictions: correlation undefined -> 0.0 (never NaN in metrics.json)
    assert compute_metrics(["pearson", "spearmanr"], [2.0] * 5, x) == {"pearson": 0.0, "spearmanr": 0.0}
    assert compute_metrics(["matthews_correlation"], [1, 1, 1], [0, 1, 0])["matthews_correlation"] == 0.0


def test_task_metrics_from_logits_and_scores():
    logits = [[2.0, 0.1], [0.0, 3.0], [1.0, -1.0]]
    assert task_metrics(GLUE_TASKS["mrpc"], logits, [0, 1, 1]) == pytest.approx({"accuracy": 2 / 3, "f1": 2 / 3})
    assert task_metrics(GLUE_TASKS["stsb"], [[0.5], [2.0], [4.0]], [1.0, 2.0, 5.0])["spearmanr"] == pytest.approx(1.0)
    three = custom_spec("c", ["text"], "label", "classification", ["a", "b", "c"])
    m = task_metrics(three, [[3, 0, 0], [0, 3, 0], [0, 3, 0]], [0, 1, 2])
    assert m["accuracy"] == pytest.approx(2 / 3) and "macro_f1" in m


def test_glue_score_conventions():
    assert glue_score("mrpc", {"accuracy": 0.8, "f1": 0.9}) == pytest.approx(85.0)
    assert glue_score("stsb", {"pearson": 0.8, "spearmanr": 0.7}) == pytest.approx(75.0)
    assert glue_score("cola", {"matthews_correlation": 0.5}) == pytest.approx(50.0)
    for task in ("sst2", "rte", "qnli", "mnli", "wnli"):
        assert glue_score(task, {"accuracy": 0.7}) == pytest.approx(70.0)
    assert glue_score("qqp", {"accuracy": 0.9, "f1": 0.8}) == pytest.approx(85.0)
    with pytest.raises(KeyError):
        glue_score("imdb", {"accuracy": 1.0})
    reg = custom_spec("r", ["text"], "y", "regression")
    assert score_of(reg, {"pearson": 0.9, "spearmanr": 0.1}) == pytest.approx(90.0)
