"""The paper-style results table: headline scores, seed aggregation, Avg."""

from __future__ import annotations

import pytest

from widenet_ds.glue import results_table, task_score

RECORDS = [
    {"model": "widenet-e4", "task": "mrpc", "seed": 0, "metrics": {"f1": 0.90, "accuracy": 0.80}},  # 0.85
    {"model": "widenet-e4", "task": "mrpc", "seed": 1, "metrics": {"f1": 0.88, "accuracy": 0.86}},  # 0.87
    {"model": "widenet-e4", "task": "sst2", "seed": 0, "metrics": {"accuracy": 0.90}},
    {"model": "widenet-e4", "task": "sst2", "seed": 1, "metrics": {"accuracy": 0.95}},
    {"model": "widenet-e4", "task": "sst2", "seed": 2, "metrics": {"accuracy": 0.94}},
    {"model": "albert", "task": "SST-2", "seed": 0, "metrics": {"accuracy": 0.91}},
]


def test_median_over_seeds_in_glue_column_order_with_avg():
    # widenet-e4: SST-2 median(0.90, 0.95, 0.94) = 0.94, MRPC median(0.85, 0.87) = 0.86, Avg 0.90
    assert results_table(RECORDS) == (
        "| Model | SST-2 | MRPC | Avg |\n"
        "|---|---:|---:|---:|\n"
        "| widenet-e4 | 94.0 | 86.0 | 90.0 |\n"
        "| albert | 91.0 | – | – |\n")


def test_mean_differs_from_median_and_stsb_averages_its_correlations():
    records = [{"model": "m", "task": "stsb", "seed": seed, "metrics": {"pearson": p, "spearmanr": s}}
               for seed, (p, s) in enumerate([(0.8, 0.9), (0.7, 0.8), (0.5, 0.5)])]  # 0.85, 0.75, 0.5
    assert results_table(records, aggregate="mean").splitlines()[-1] == "| m | 70.0 | 70.0 |"
    assert results_table(records).splitlines()[-1] == "| m | 75.0 | 75.0 |"


def test_mnli_column_is_matched_accuracy_and_tasks_choose_columns():
    records = [{"model": "m", "task": "mnli", "seed": 0, "metrics": {"accuracy": 0.8, "mnli_mm": 0.7}},
               {"model": "m", "task": "cola", "seed": 0, "metrics": {"matthews_correlation": 0.5}}]
    assert results_table(records, tasks=["mnli", "cola"]).splitlines()[::2] == [
        "| Model | MNLI-m | CoLA | Avg |", "| m | 80.0 | 50.0 | 65.0 |"]
    assert task_score("qqp", {"f1": 0.7, "accuracy": 0.9}) == pytest.approx(0.8)


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 1, 0), (1, 2, 0)])
def test_a_nan_seed_is_the_worst_for_the_median_whatever_the_order(order: tuple[int, ...]):
    scores = [float("nan"), 0.8, 0.9]
    records = [{"model": "m", "task": "sst2", "seed": i, "metrics": {"accuracy": scores[i]}} for i in order]
    assert results_table(records).splitlines()[-1] == "| m | 80.0 | 80.0 |"
    assert results_table(records, aggregate="mean").splitlines()[-1] == "| m | nan | nan |"


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="second result for model 'albert', task sst2, seed 0"):
        results_table([*RECORDS, {"model": "albert", "task": "sst2", "seed": 0, "metrics": {"accuracy": 0.5}}])
    with pytest.raises(ValueError, match=r"result record 0 \(model 'm', seed 0\): mrpc metrics lack f1"):
        results_table([{"model": "m", "task": "mrpc", "seed": 0, "metrics": {"accuracy": 0.5}}])
    with pytest.raises(ValueError, match="lacks seed"):
        results_table([{"model": "m", "task": "mrpc", "metrics": {}}])
    with pytest.raises(ValueError, match="aggregate"):
        results_table(RECORDS, aggregate="max")
