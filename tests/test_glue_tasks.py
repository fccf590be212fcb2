"""The task registry: names, files, labels and metric choices of the nine GLUE tasks."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from widenet_ds.glue import (
    TASKS,
    GlueDataError,
    describe_task_columns,
    get_task,
    load_split,
)

SUBMISSION_FILES = {
    "cola": ["CoLA.tsv"], "sst2": ["SST-2.tsv"], "mrpc": ["MRPC.tsv"], "stsb": ["STS-B.tsv"], "qqp": ["QQP.tsv"],
    "mnli": ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"], "qnli": ["QNLI.tsv"], "rte": ["RTE.tsv"], "wnli": ["WNLI.tsv"],
}


def test_the_nine_tasks_and_their_submission_files():
    assert list(TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert {name: [s.submission_file for s in spec.splits if s.submission_file]
            for name, spec in TASKS.items()} == SUBMISSION_FILES


def test_labels_and_heads():
    assert {name: spec.num_labels for name, spec in TASKS.items()} == {
        "cola": 2, "sst2": 2, "mrpc": 2, "stsb": 1, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2, "wnli": 2}
    assert [name for name, spec in TASKS.items() if spec.is_regression] == ["stsb"]
    assert TASKS["mnli"].file_labels == ("entailment", "neutral", "contradiction")
    assert TASKS["wnli"].label_names == ("not_entailment", "entailment")  # hub order: 1 is entailment
    assert [name for name, spec in TASKS.items() if not spec.is_pair] == ["cola", "sst2"]


def test_mnli_splits_and_metric_keys():
    mnli = TASKS["mnli"]
    assert mnli.dev_splits == ("validation_matched", "validation_mismatched")
    assert mnli.test_splits == ("test_matched", "test_mismatched")
    assert mnli.metric_keys == ("accuracy", "mnli_mm")
    assert mnli.split("ax").hub_config == "ax" and mnli.split("ax").tsv_path == "diagnostic/diagnostic.tsv"


@pytest.mark.parametrize("name", list(TASKS))
def test_metric_choices_are_metrics_the_task_reports(name: str):
    spec = TASKS[name]
    assert spec.main_metric in spec.metric_keys
    assert set(spec.headline_metrics) <= set(spec.metric_keys)
    assert [s.kind for s in spec.splits][:1] == ["train"] and spec.dev_splits and spec.test_splits


def test_names_are_case_and_hyphen_insensitive():
    assert get_task("SST-2") is TASKS["sst2"] and get_task("STS-B") is TASKS["stsb"]
    assert get_task("MNLI") is TASKS["mnli"]


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(GlueDataError) as err:
        get_task("squad")
    assert str(err.value) == "unknown GLUE task 'squad' (valid: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli)"


def test_task_columns_text_has_one_line_per_task():
    lines = describe_task_columns().splitlines()
    assert len(lines) == 1 + len(TASKS) and lines[0].startswith("CSV/JSON/JSONL columns per task")
    assert lines[1] == "  cola  train/dev: sentence, label; test: sentence; label: 0=unacceptable, 1=acceptable"
    assert lines[4] == ("  stsb  train/dev: sentence1, sentence2, label; test: sentence1, sentence2; "
                        "label: a score from 0 to 5")
    assert lines[6] == ("  mnli  train/dev: premise, hypothesis, label; test: premise, hypothesis; "
                        "label: 0=entailment, 1=neutral, 2=contradiction")


@pytest.mark.parametrize("name", list(TASKS))
def test_files_laid_out_as_the_columns_text_says_load(tmp_path: Path, name: str):
    """The text is what the loader reads: a CSV with exactly the columns it names, labelled with
    each value it lists (index and name), loads; so does a test file with its test columns."""
    line = next(line for line in describe_task_columns().splitlines() if line.split()[0] == name)
    train, test, label = (part.split(": ", 1)[1] for part in line.split("; "))
    columns = train.split(", ")
    values = ["0.5", "4"] if TASKS[name].is_regression else [v for pair in label.split(", ") for v in pair.split("=")]
    rows = [[f"text {i} {column}" for column in columns[:-1]] + [value] for i, value in enumerate(values)]
    with (tmp_path / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    with (tmp_path / "test.csv").open("w", newline="") as f:
        csv.writer(f).writerows([test.split(", "), [f"text {column}" for column in test.split(", ")]])
    examples = load_split(name, "train", data_file=tmp_path / "train.csv")
    assert len(examples) == len(values) and None not in {e.label for e in examples}
    assert len(load_split(name, TASKS[name].test_splits[0], data_file=tmp_path / "test.csv")) == 1
