"""The official GLUE metrics, computed with scikit-learn and scipy.

CoLA: ``matthews_correlation``; SST-2, QNLI, RTE, WNLI, MNLI: ``accuracy`` (MNLI
mismatched reported as ``mnli_mm``); MRPC, QQP: ``f1`` (positive class 1) and ``accuracy``;
STS-B: ``pearson`` and ``spearmanr``. Values are fractions in [0, 1] (correlations in [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .tasks import TaskSpec, get_task

_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {  # (predictions, labels) -> value
    "matthews_correlation": lambda pred, gold: matthews_corrcoef(gold, pred),
    "accuracy": lambda pred, gold: accuracy_score(gold, pred),
    "f1": lambda pred, gold: f1_score(gold, pred, pos_label=1, zero_division=0.0),
    "pearson": lambda pred, gold: pearsonr(pred, gold).statistic,
    "spearmanr": lambda pred, gold: spearmanr(pred, gold).statistic,
}


def predictions_from_logits(task: str, logits: ArrayLike) -> np.ndarray:
    """(N,) predictions from (N, num_labels) logits: the argmax class, or the raw score for STS-B."""
    spec = get_task(task)
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != spec.num_labels:
        raise ValueError(f"{spec.name} logits must have shape (N, {spec.num_labels}), got {values.shape}")
    return values[:, 0] if spec.is_regression else values.argmax(axis=1)


def to_predictions(task: str, values: ArrayLike) -> np.ndarray:
    """Checked (N,) predictions (int64 classes, float64 scores) from predictions or (N, num_labels) logits."""
    spec = get_task(task)
    array = np.asarray(values)
    if array.ndim == 2:
        array = predictions_from_logits(spec.name, array)
    return _checked(spec, array, "predictions")


def compute_metrics(task: str, predictions: ArrayLike, labels: ArrayLike, *,
                    split: str | None = None) -> dict[str, float]:
    """The task's metrics on one labelled split (default: its first dev split).

    ``predictions`` are class indices / scores, shape (N,), or logits, shape (N, num_labels).
    Keys are the task's metric names; MNLI's ``validation_mismatched`` reports ``mnli_mm``.
    """
    spec = get_task(task)
    split_spec = spec.split(split or spec.dev_splits[0])
    if not split_spec.labelled:
        raise ValueError(f"{spec.name} split '{split_spec.name}' has no labels to score against")
    pred, gold = to_predictions(spec.name, predictions), _checked(spec, labels, "labels")
    if len(pred) != len(gold) or not len(gold):
        raise ValueError(f"{spec.name}: {len(pred)} predictions for {len(gold)} labels; need as many, at least one")
    return {split_spec.renamed_metrics.get(name, name): float(_METRICS[name](pred, gold)) for name in spec.metrics}


def compute_dev_metrics(task: str, outputs: Mapping[str, tuple[ArrayLike, ArrayLike]]) -> dict[str, float]:
    """Metrics over all dev splits of a task, from ``{split: (predictions, labels)}``.

    For MNLI: ``{"accuracy": matched accuracy, "mnli_mm": mismatched accuracy}``.
    """
    spec = get_task(task)
    if set(outputs) != set(spec.dev_splits):
        raise ValueError(f"{spec.name} needs outputs for its dev splits {', '.join(spec.dev_splits)}; "
                         f"got {', '.join(outputs) or 'none'}")
    metrics: dict[str, float] = {}
    for split in spec.dev_splits:
        metrics.update(compute_metrics(spec.name, *outputs[split], split=split))
    return metrics


def _checked(spec: TaskSpec, values: ArrayLike, what: str) -> np.ndarray:
    """``values`` as a 1-D array of class indices (int64) or scores (float64); ValueError otherwise."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{spec.name} {what} must be 1-D, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        hint = " (test splits have no labels)" if None in array.tolist() else ""
        raise ValueError(f"{spec.name} {what} must be numbers, got {array.dtype} values{hint}")
    if spec.is_regression:
        bad = array[~np.isfinite(array)]
        if bad.size:
            raise ValueError(f"{spec.name} {what} must be finite scores, got {bad[:3].tolist()}")
        return array.astype(np.float64)
    bad = array[~np.isin(array, np.arange(spec.num_labels))]
    if bad.size:
        raise ValueError(f"{spec.name} {what} must be class indices 0-{spec.num_labels - 1}, got {bad[:3].tolist()}")
    return array.astype(np.int64)
