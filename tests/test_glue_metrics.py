"""GLUE metrics against values computed by hand on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from widenet_ds.glue import (
    TASKS,
    compute_dev_metrics,
    compute_metrics,
    predictions_from_logits,
)

PRED = [1, 1, 0, 0, 1, 0, 1, 1]
GOLD = [1, 0, 0, 0, 1, 1, 1, 1]
TP, FP, TN, FN = 4, 1, 2, 1  # counted from PRED / GOLD above


def test_cola_matthews_correlation_from_the_confusion_matrix():
    expected = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))  # 7 / 15
    assert compute_metrics("cola", PRED, GOLD) == {"matthews_correlation": pytest.approx(expected)}
    assert expected == pytest.approx(7 / 15)


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task: str):
    assert compute_metrics(task, PRED, GOLD) == {"accuracy": pytest.approx((TP + TN) / 8)}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_of_the_positive_class_and_accuracy(task: str):
    expected_f1 = 2 * TP / (2 * TP + FP + FN)  # 0.8
    assert compute_metrics(task, PRED, GOLD) == {"f1": pytest.approx(expected_f1), "accuracy": pytest.approx(0.75)}


def test_stsb_pearson_and_spearman():
    # pearson: deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): 3 / sqrt(2 * 42/9)
    assert compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == {
        "pearson": pytest.approx(3 / math.sqrt(2 * 42 / 9)), "spearmanr": pytest.approx(1.0)}
    # ranks (1, 3, 2, 4) vs (1, 2, 3, 4): sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15)
    assert compute_metrics("stsb", [0.1, 0.4, 0.2, 0.9], [1, 2, 3, 4])["spearmanr"] == pytest.approx(0.8)


def test_mnli_reports_matched_accuracy_and_mismatched_as_mnli_mm():
    metrics = compute_dev_metrics("mnli", {"validation_matched": ([0, 1, 2, 2], [0, 1, 2, 0]),
                                           "validation_mismatched": ([2, 1], [2, 0])})
    assert metrics == {"accuracy": pytest.approx(0.75), "mnli_mm": pytest.approx(0.5)}
    assert compute_metrics("mnli", [2, 1], [2, 0], split="validation_mismatched") == {"mnli_mm": 0.5}


@pytest.mark.parametrize("task", list(TASKS))
def test_dev_metrics_report_exactly_the_task_metric_keys(task: str):
    spec = TASKS[task]
    outputs = {split: ([0, 1, 1, 0], [0, 1, 0, 0]) for split in spec.dev_splits}
    assert tuple(compute_dev_metrics(task, outputs)) == spec.metric_keys


def test_predictions_from_logits():
    assert predictions_from_logits("mnli", [[0.1, 2.0, 0.3], [3.0, 0.0, -1.0]]).tolist() == [1, 0]
    assert predictions_from_logits("stsb", [[4.2], [0.5]]).tolist() == [4.2, 0.5]
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        predictions_from_logits("rte", [[0.1, 0.2, 0.3]])


def test_logits_are_scored_as_their_argmax():
    logits = np.array([[0.0, 1.0], [2.0, 1.0], [0.5, 0.7]])
    assert compute_metrics("rte", logits, [1, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}


@pytest.mark.parametrize("task, pred, gold, message", [
    ("rte", [0, 1], [0], "2 predictions for 1 labels"),
    ("rte", [], [], "at least one"),
    ("rte", [0, 1], [0, None], r"labels must be numbers, got object values \(test splits have no labels\)"),
    ("rte", [0, 3], [0, 1], r"class indices 0-1, got \[3\]"),
    ("stsb", [1.0, float("nan")], [1.0, 2.0], "finite"),
])
def test_bad_inputs_are_refused(task: str, pred: list, gold: list, message: str):
    with pytest.raises(ValueError, match=message):
        compute_metrics(task, pred, gold)


def test_dev_metrics_need_every_dev_split_and_test_splits_have_no_labels():
    with pytest.raises(ValueError, match="validation_matched, validation_mismatched"):
        compute_dev_metrics("mnli", {"validation_matched": ([0], [0])})
    with pytest.raises(ValueError, match="no labels"):
        compute_metrics("rte", [0], [0], split="test")
