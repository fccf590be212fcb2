"""A paper-style Markdown table of GLUE dev results: one row per model, one column per task.

A task's cell is its headline score (``task_score``): the mean of the task's headline
metrics, following the GLUE convention of averaging the two numbers of MRPC (F1, acc.),
QQP (F1, acc.) and STS-B (Pearson, Spearman); MNLI reports matched accuracy (MNLI-m),
CoLA MCC, the others accuracy. Seeds are combined with the median (or the mean), then the
score is shown x100 with one decimal. Avg is the mean of the row's task scores, shown only
when the model has every column (an average over fewer tasks would not compare).

A NaN score (a run whose metric was undefined at every evaluation) is the worst seed for the
median, as for the fine-tuning job's checkpoint selection; a mean over it is NaN, shown "nan".
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from .tasks import TASKS, get_task

_MISSING = "–"


def _median(scores: list[float]) -> float:
    """The median, NaN ranked below every number (``statistics.median`` sorts NaN anywhere, so it
    would return whichever seed the order of the files left in the middle)."""
    ordered = sorted(scores, key=lambda v: -math.inf if math.isnan(v) else v)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


_AGGREGATES = {"median": _median, "mean": statistics.fmean}


def task_score(task: str, metrics: Mapping[str, float]) -> float:
    """The task's headline score: the mean of its ``headline_metrics`` found in ``metrics``."""
    spec = get_task(task)
    absent = [key for key in spec.headline_metrics if key not in metrics]
    if absent:
        raise ValueError(f"{spec.name} metrics lack {', '.join(absent)} (have: {', '.join(metrics) or 'none'})")
    return statistics.fmean(metrics[key] for key in spec.headline_metrics)


def results_table(records: Iterable[Mapping[str, Any]], *, aggregate: Literal["median", "mean"] = "median",
                  tasks: Sequence[str] | None = None) -> str:
    """Markdown table of ``{model, task, seed, metrics}`` records.

    Args:
        records: one per (model, task, seed); ``metrics`` as returned by ``compute_dev_metrics``.
        aggregate: how seeds are combined: "median" (default, robust to a diverged seed) or "mean".
        tasks: the task columns, in order; default: every task present, in GLUE order.
    """
    if aggregate not in _AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(_AGGREGATES)}, got {aggregate!r}")
    scores = _scores_by_model(records)
    if tasks is None:
        columns = [t for t in TASKS if any(t in by_task for by_task in scores.values())]
    else:
        columns = [get_task(t).name for t in tasks]
    lines = ["| Model | " + " | ".join(TASKS[t].display_name for t in columns) + " | Avg |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for model, by_task in scores.items():
        cells = [_AGGREGATES[aggregate](by_task[t]) if t in by_task else None for t in columns]
        average = statistics.fmean(cells) if cells and None not in cells else None
        lines.append(f"| {model} | " + " | ".join(_percent(v) for v in (*cells, average)) + " |")
    return "\n".join(lines) + "\n"


def _scores_by_model(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """model -> task -> headline score of each seed, models in order of first appearance."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    for number, record in enumerate(records):
        absent = [key for key in ("model", "task", "seed", "metrics") if key not in record]
        if absent:
            raise ValueError(f"result record {number} lacks {', '.join(absent)}: {dict(record)}")
        model, task = record["model"], get_task(record["task"]).name
        if (model, task, record["seed"]) in seen:
            raise ValueError(f"result record {number}: a second result for model {model!r}, task {task}, "
                             f"seed {record['seed']!r}")
        seen.add((model, task, record["seed"]))
        try:
            scores[model][task].append(task_score(task, record["metrics"]))
        except ValueError as err:
            raise ValueError(f"result record {number} (model {model!r}, seed {record['seed']!r}): {err}") from None
    return scores


def _percent(value: float | None) -> str:
    return _MISSING if value is None else f"{100 * value:.1f}"
