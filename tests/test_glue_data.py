"""Loading GLUE: the original download layout of every task, CSV/JSON/JSONL files, the hub
(with ``datasets.load_dataset`` replaced), and the errors a user can cause."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from glue_fixtures import (
    EXPECTED,
    GLUE_FILES,
    MNLI_HEADER,
    STSB_HEADER,
    write_glue_layout,
)

from widenet_ds.glue import TASKS, GlueDataError, GlueExample, load_glue, load_split

E = GlueExample


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glue_layout(tmp_path_factory.mktemp("glue"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- the GLUE download layout --------------------------------------------------------------


def test_fixtures_cover_every_split_of_every_task():
    assert set(EXPECTED) == {(name, split.name) for name, spec in TASKS.items() for split in spec.splits}


@pytest.mark.parametrize("task, split", sorted(EXPECTED))
def test_glue_layout_parses_to_exact_records(glue_dir: Path, task: str, split: str):
    assert load_split(task, split, data_dir=glue_dir) == EXPECTED[(task, split)]


def test_load_glue_loads_train_dev_and_test_but_not_the_diagnostic_set(glue_dir: Path):
    loaded = load_glue("mnli", data_dir=glue_dir)
    assert list(loaded) == ["train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"]
    assert loaded["validation_mismatched"] == EXPECTED[("mnli", "validation_mismatched")]


def test_load_glue_as_dataset_keeps_records_and_types(glue_dir: Path):
    stsb = load_glue("stsb", ["train", "test"], data_dir=glue_dir, as_dataset=True)
    assert isinstance(stsb, datasets.DatasetDict)
    assert stsb["train"].features["label"].dtype == "float32"
    assert stsb["train"][1] == {"idx": 1, "text_a": "A man is playing a large flute.",
                                "text_b": "A man is playing a flute.", "label": pytest.approx(3.8)}
    assert stsb["test"]["label"] == [None]
    cola = load_glue("cola", ["train"], data_dir=glue_dir, as_dataset=True)["train"]
    assert cola.features["label"].dtype == "int64"
    assert cola["text_b"] == [None, None] and cola["label"] == [1, 0]


def test_unknown_task_lists_the_valid_ones(glue_dir: Path):
    with pytest.raises(GlueDataError, match="unknown GLUE task 'mnli2'") as err:
        load_split("mnli2", "train", data_dir=glue_dir)
    assert "cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli" in str(err.value)


def test_unknown_split_lists_the_task_splits(glue_dir: Path):
    with pytest.raises(GlueDataError, match=r"task 'cola' has no split 'dev' \(valid: train, validation, test\)"):
        load_split("cola", "dev", data_dir=glue_dir)


def test_missing_task_folder_names_the_expected_file(tmp_path: Path):
    write_glue_layout(tmp_path, {"CoLA/train.tsv": GLUE_FILES["CoLA/train.tsv"]})
    with pytest.raises(GlueDataError) as err:
        load_split("mnli", "validation_matched", data_dir=tmp_path)
    assert f"expected {tmp_path / 'MNLI' / 'dev_matched.tsv'}" in str(err.value)
    assert f"there is no folder {tmp_path / 'MNLI'}" in str(err.value)


def test_missing_file_in_task_folder_lists_what_is_there(tmp_path: Path):
    write_glue_layout(tmp_path, {"MNLI/dev.tsv": GLUE_FILES["MNLI/dev_matched.tsv"]})
    with pytest.raises(GlueDataError) as err:
        load_split("mnli", "validation_matched", data_dir=tmp_path)
    assert f"expected {tmp_path / 'MNLI' / 'dev_matched.tsv'}" in str(err.value)
    assert "holds: dev.tsv" in str(err.value)


def test_data_dir_that_does_not_exist(tmp_path: Path):
    with pytest.raises(GlueDataError, match="is not a folder"):
        load_split("rte", "train", data_dir=tmp_path / "nowhere")


QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
QQP_WITH_SHORT_ROW = (QQP_HEADER + "1\t2\t3\tIs it?\tIs it so?\t1\n"
                      "4\t5\t6\tHow do I\t0\n"  # line 3: the second question lost, 5 columns
                      "7\t8\t9\tWhy?\tWhy not?\t0\n")


def test_wrong_column_count_names_file_and_line(tmp_path: Path):
    path = _write(tmp_path / "QQP" / "train.tsv", QQP_WITH_SHORT_ROW)
    with pytest.raises(GlueDataError) as err:
        load_split("qqp", "train", data_dir=tmp_path)
    assert f"{path}, line 3: expected 6 tab-separated columns, got 5" in str(err.value)
    assert "skip_malformed=True" in str(err.value)


def test_skip_malformed_skips_counts_and_keeps_positions(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    _write(tmp_path / "QQP" / "train.tsv", QQP_WITH_SHORT_ROW)
    logger = logging.getLogger("widenet_ds.glue.data")
    logger.addHandler(caplog.handler)  # seen even when the project logger stops propagation
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            examples = load_split("qqp", "train", data_dir=tmp_path, skip_malformed=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert examples == [E(0, "Is it?", "Is it so?", 1), E(2, "Why?", "Why not?", 0)]
    assert "skipped 1 malformed row(s); first at line 3: expected 6 tab-separated columns, got 5" in caplog.text


@pytest.mark.parametrize("relative, content, message", [
    ("SST-2/train.tsv", "sentence\tlabel\ngood\t1\n  \t0\n", "line 3: empty text in 'sentence'"),
    ("STS-B/train.tsv", GLUE_FILES["STS-B/dev.tsv"].replace("0.250", "n/a"),
     "line 2: score 'n/a' is not a number (stsb labels are scores from 0 to 5)"),
    ("WNLI/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\t1\n1\tC.\tD.\t\n", "line 3: missing label"),
    ("CoLA/train.tsv", "gj04\t1\t\tFine.\ngj04\t1\tFine.\n", "line 2: expected 4 tab-separated columns, got 3"),
])
def test_malformed_rows_name_file_and_line(tmp_path: Path, relative: str, content: str, message: str):
    path = _write(tmp_path / relative, content)
    task = {"SST-2": "sst2", "STS-B": "stsb", "WNLI": "wnli", "CoLA": "cola"}[relative.split("/")[0]]
    with pytest.raises(GlueDataError, match="skip_malformed") as err:
        load_split(task, "train", data_dir=tmp_path)
    assert f"{path}, {message}" in str(err.value)


@pytest.mark.parametrize("skip", [False, True])
def test_label_outside_the_label_set_always_raises(tmp_path: Path, skip: bool):
    content = GLUE_FILES["RTE/train.tsv"] + "2\tIt rains.\tIt is wet.\tmaybe\n"
    path = _write(tmp_path / "RTE" / "train.tsv", content)
    with pytest.raises(GlueDataError) as err:
        load_split("rte", "train", data_dir=tmp_path, skip_malformed=skip)
    assert str(err.value) == f"{path}, line 4: label 'maybe' is not a rte label (allowed: entailment, not_entailment)"


def test_tsv_labels_must_be_the_task_strings_not_indices(tmp_path: Path):
    content = GLUE_FILES["MNLI/dev_matched.tsv"].replace("\tcontradiction\n", "\t2\n")
    path = _write(tmp_path / "MNLI" / "dev_matched.tsv", content)
    with pytest.raises(GlueDataError, match=f"{path}, line 2: label '2' is not a mnli label"):
        load_split("mnli", "validation_matched", data_dir=tmp_path)


def test_score_outside_zero_to_five_raises(tmp_path: Path):
    _write(tmp_path / "STS-B" / "dev.tsv", GLUE_FILES["STS-B/dev.tsv"].replace("0.250", "5.5"))
    with pytest.raises(GlueDataError, match=r"line 2: score '5.5' is outside stsb's range \[0, 5\]"):
        load_split("stsb", "validation", data_dir=tmp_path, skip_malformed=True)


def test_header_without_the_needed_column(tmp_path: Path):
    path = _write(tmp_path / "QNLI" / "dev.tsv", "index\tquestion\ttext\tlabel\n0\tQ?\tA.\tentailment\n")
    with pytest.raises(GlueDataError, match=f"{path}, line 1: no column 'sentence' in the header"):
        load_split("qnli", "validation", data_dir=tmp_path)


def test_empty_file_needs_a_header(tmp_path: Path):
    path = _write(tmp_path / "RTE" / "test.tsv", "")
    with pytest.raises(GlueDataError) as err:
        load_split("rte", "test", data_dir=tmp_path)
    assert str(err.value) == (f"rte test: {path} is empty; expected a header row and one row per example, "
                              "as in the GLUE RTE files")


# --- CSV / JSON / JSONL / TSV files per split ----------------------------------------------


def test_csv_with_hub_column_names_string_and_index_labels(tmp_path: Path):
    path = _write(tmp_path / "train.csv", "premise,hypothesis,label\n"
                                          '"He said ""no"", twice",He refused.,contradiction\n'
                                          "A man sleeps.,A man rests.,0\n")
    assert load_glue("mnli", data_files={"train": path}) == {"train": [
        E(0, 'He said "no", twice', "He refused.", 2), E(1, "A man sleeps.", "A man rests.", 0)]}


def test_jsonl_labels_as_index_or_name_and_unlabelled_test(tmp_path: Path):
    train = _write(tmp_path / "train.jsonl", '{"sentence": "Fine.", "label": 1}\n\n'
                                             '{"sentence": "Bad it.", "label": "unacceptable"}\n')
    test = _write(tmp_path / "test.jsonl", '{"sentence": "Maybe.", "label": -1}\n{"sentence": "Or not."}\n')
    loaded = load_glue("cola", data_files={"train": train, "test": test})
    assert loaded == {"train": [E(0, "Fine.", None, 1), E(1, "Bad it.", None, 0)],
                      "test": [E(0, "Maybe.", None, None), E(1, "Or not.", None, None)]}


def test_json_array_of_records(tmp_path: Path):
    records = [{"sentence1": "A dog runs.", "sentence2": "A dog is running.", "label": 4.2, "idx": 0},
               {"sentence1": "A cat sleeps.", "sentence2": "A man sings.", "label": "0", "idx": 1}]
    path = _write(tmp_path / "dev.json", json.dumps(records))
    assert load_split("stsb", "validation", data_file=path) == [E(0, "A dog runs.", "A dog is running.", 4.2),
                                                                E(1, "A cat sleeps.", "A man sings.", 0.0)]


def test_glue_tsv_given_as_a_data_file(glue_dir: Path):
    assert load_split("rte", "train", data_file=glue_dir / "RTE" / "train.tsv") == EXPECTED[("rte", "train")]


@pytest.mark.parametrize("name, content, message", [
    ("train.jsonl", '{"sentence": "A.", "label": 1}\n{"sentence": "B.", "label": 0}\n'
                    '{"sentence": "C.", "label": 7}\n',
     r"line 3: label 7 is not a cola label \(allowed: 0, 1, unacceptable, acceptable or an index 0-1\)"),
    ("train.jsonl", '{"sentence": "A.", "label": 1}\n{"sentence": "B.", "label": 0\n',
     r"line 2: invalid JSON"),
    ("train.csv", "sentence,label\nA.,1\n,0\n", r"line 3: empty text in 'sentence'"),
    ("train.csv", "sentence,label\nA.,1,extra\n", r"line 2: expected 2 comma-separated columns"),
])
def test_file_errors_name_file_and_line(tmp_path: Path, name: str, content: str, message: str):
    path = _write(tmp_path / name, content)
    with pytest.raises(GlueDataError, match=f"{path}, {message}"):
        load_split("cola", "train", data_file=path)


def test_json_array_errors_name_the_item(tmp_path: Path):
    path = _write(tmp_path / "train.json", json.dumps([{"sentence1": "A.", "sentence2": "B.", "label": 1},
                                                      {"sentence1": "C.", "label": 0}]))
    with pytest.raises(GlueDataError, match=f"{path}, item 2: no key 'sentence2'"):
        load_split("rte", "train", data_file=path)


def test_csv_without_the_needed_column(tmp_path: Path):
    path = _write(tmp_path / "dev.csv", "premise,label\nA.,0\n")
    with pytest.raises(GlueDataError, match=f"{path}, line 1: no column 'hypothesis'"):
        load_split("mnli", "validation_matched", data_file=path)


def test_data_file_errors(tmp_path: Path):
    with pytest.raises(GlueDataError, match="does not exist"):
        load_split("rte", "train", data_file=tmp_path / "missing.csv")
    parquet = _write(tmp_path / "train.parquet", "")
    with pytest.raises(GlueDataError, match="unsupported extension '.parquet'"):
        load_split("rte", "train", data_file=parquet)
    with pytest.raises(GlueDataError, match="not both"):
        load_split("rte", "train", data_dir=tmp_path, data_file=parquet)
    with pytest.raises(GlueDataError, match="no file for split"):
        load_glue("rte", ["train", "validation"], data_files={"train": parquet})


# --- splits that leave nothing to train on or score -----------------------------------------

RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
SOURCES = {"data_dir": lambda root, relative: {"data_dir": root},
           "data_file": lambda root, relative: {"data_file": root / relative}}


@pytest.mark.parametrize("task, split, relative, content, source", [
    ("rte", "validation", "RTE/dev.tsv", RTE_HEADER, "data_dir"),
    ("rte", "validation", "RTE/dev.tsv", RTE_HEADER + "\n\n", "data_dir"),  # blank lines are not rows
    ("mnli", "test_mismatched", "MNLI/test_mismatched.tsv", f"{MNLI_HEADER}\n", "data_dir"),
    ("mrpc", "train", "MRPC/train.tsv", GLUE_FILES["MRPC/dev.tsv"].splitlines(keepends=True)[0], "data_file"),
    ("rte", "validation", "dev.csv", "sentence1,sentence2,label\n", "data_file"),
    ("sst2", "test", "test.csv", "sentence\n", "data_file"),
])
@pytest.mark.parametrize("skip", [False, True])
def test_header_without_rows_is_refused_naming_file_and_split(tmp_path: Path, task: str, split: str, relative: str,
                                                              content: str, source: str, skip: bool):
    path = _write(tmp_path / relative, content)
    with pytest.raises(GlueDataError) as err:
        load_split(task, split, skip_malformed=skip, **SOURCES[source](tmp_path, relative))
    assert str(err.value) == f"{task} {split}: {path} has a header but no rows; the split needs at least one example"


def test_empty_json_array_is_refused(tmp_path: Path):
    path = _write(tmp_path / "dev.json", "[]")
    with pytest.raises(GlueDataError, match=f"^rte validation: {path} is an empty JSON array; the split needs"):
        load_split("rte", "validation", data_file=path)


@pytest.mark.parametrize("task, split, relative, content, expected", [
    ("cola", "train", "CoLA/train.tsv", "", "one row per example, as in the GLUE CoLA files"),  # no header
    ("qqp", "validation", "QQP/dev.tsv", "\ufeff\n", "a header row and one row per example, as in the GLUE QQP files"),
    ("mrpc", "train", "train.csv", "", "a header row (sentence1, sentence2, label) and one row per example"),
    ("mrpc", "test", "test.csv", " \n", "a header row (sentence1, sentence2) and one row per example"),
    ("cola", "validation", "dev.json", "\n", "one JSON object per example, with keys sentence, label"),
    ("mnli", "validation_matched", "dev.jsonl", "",
     "one JSON object per example, with keys premise, hypothesis, label"),
])
def test_empty_file_is_refused_naming_file_split_and_layout(tmp_path: Path, task: str, split: str, relative: str,
                                                            content: str, expected: str):
    path = _write(tmp_path / relative, content)
    source = "data_dir" if "/" in relative else "data_file"
    with pytest.raises(GlueDataError) as err:
        load_split(task, split, skip_malformed=True, **SOURCES[source](tmp_path, relative))
    assert str(err.value) == f"{task} {split}: {path} is empty; expected {expected}"


@pytest.mark.parametrize("task, split, relative, content, column", [
    ("rte", "validation", "dev.jsonl",  # a test file given as dev
     '{"sentence1": "A.", "sentence2": "B."}\n{"sentence1": "C.", "sentence2": "D."}\n', "label"),
    ("cola", "train", "train.csv", "sentence,label\nFine.,\nAlso fine.,-1\n", "label"),
    ("mnli", "validation_matched", "MNLI/dev_matched.tsv",
     GLUE_FILES["MNLI/dev_matched.tsv"].replace("\tcontradiction\n", "\t\n"), "gold_label"),
])
@pytest.mark.parametrize("skip", [False, True])
def test_labelled_split_without_any_label_is_refused(tmp_path: Path, task: str, split: str, relative: str,
                                                     content: str, column: str, skip: bool):
    path = _write(tmp_path / relative, content)
    source = "data_dir" if "/" in relative else "data_file"
    with pytest.raises(GlueDataError) as err:
        load_split(task, split, skip_malformed=skip, **SOURCES[source](tmp_path, relative))
    kind = "train" if split == "train" else "dev"
    assert str(err.value) == (f"{task} {split}: no row of {path} has a label in '{column}'; {kind} files need one "
                              "in every row (test files have none: is this a test file?)")


def test_a_first_row_without_label_is_a_row_error_when_others_have_labels(tmp_path: Path):
    path = _write(tmp_path / "train.csv", "sentence,label\nFine.,\nAlso fine.,1\n")
    with pytest.raises(GlueDataError, match=f"^{path}, line 2: missing label; fix the row"):
        load_split("cola", "train", data_file=path)


def test_skip_malformed_that_skips_every_row_is_refused(tmp_path: Path):
    path = _write(tmp_path / "QQP" / "dev.tsv", QQP_HEADER + "1\t2\t3\tIs it?\t1\n4\t5\t6\tHow?\t0\n")
    with pytest.raises(GlueDataError) as err:
        load_split("qqp", "validation", data_dir=tmp_path, skip_malformed=True)
    assert str(err.value) == (f"qqp validation: all 2 row(s) of {path} are malformed, the first at line 2: expected "
                              "6 tab-separated columns, got 5; skip_malformed left no example: fix the file")


@pytest.mark.parametrize("label", [True, "nan", "3,8", [3.8], {"score": 3.8}])
def test_stsb_label_that_is_not_a_number_is_a_malformed_row(tmp_path: Path, label: object):
    rows = [{"sentence1": "A.", "sentence2": "B.", "label": 1.5},
            {"sentence1": "C.", "sentence2": "D.", "label": label},
            {"sentence1": "E.", "sentence2": "F.", "label": 4}]
    path = _write(tmp_path / "train.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(GlueDataError) as err:
        load_split("stsb", "train", data_file=path)
    assert str(err.value).startswith(f"{path}, line 2: score {label!r} is not a number (stsb labels are scores "
                                     "from 0 to 5); fix the row")
    assert [e.label for e in load_split("stsb", "train", data_file=path, skip_malformed=True)] == [1.5, 4.0]


@pytest.mark.parametrize("scores", [["2.500"], ["3.000", "3"]])
def test_stsb_dev_with_a_single_score_is_refused(tmp_path: Path, scores: list[str]):
    rows = "".join(f"{i}\tg\tf\ty\t{i}\tn\tn\tA man runs.\tA man is running.\t{s}\n" for i, s in enumerate(scores))
    path = _write(tmp_path / "STS-B" / "dev.tsv", f"{STSB_HEADER}\tscore\n{rows}")
    with pytest.raises(GlueDataError) as err:
        load_split("stsb", "validation", data_dir=tmp_path)
    assert str(err.value) == (f"stsb validation: all {len(scores)} row(s) of {path} have the score "
                              f"{float(scores[0]):g}; Pearson and Spearman correlations need at least two "
                              "different scores: give the whole dev file")


class _Warnings(logging.Handler):
    """Collects the messages of warnings logged to it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _warnings(load) -> list[str]:
    """Warnings of widenet_ds.glue.data while ``load()`` runs, whatever the project logger's propagation."""
    logger, handler = logging.getLogger("widenet_ds.glue.data"), _Warnings()
    logger.addHandler(handler)
    try:
        load()
    finally:
        logger.removeHandler(handler)
    return handler.messages


def test_train_split_with_a_single_label_warns(tmp_path: Path):
    path = _write(tmp_path / "train.csv", "sentence,label\nGood.,positive\nFine.,1\n")
    assert _warnings(lambda: load_split("sst2", "train", data_file=path)) == [
        f"sst2 train: all 2 row(s) of {path} have the label 'positive'; the model can learn nothing but that label: "
        "is this the right file?"]


def test_hub_train_split_with_a_single_label_warns(monkeypatch: pytest.MonkeyPatch):
    rows = datasets.Dataset.from_dict({"sentence": ["S0"], "label": [0], "idx": [0]})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: rows)
    assert _warnings(lambda: load_split("cola", "train")) == [
        "cola train: all 1 row(s) of nyu-mll/glue (cola, train) have the label 'unacceptable'; the model can learn "
        "nothing but that label: is this the right file?"]


@pytest.mark.parametrize("task, content, metric", [
    ("cola", "sentence,label\nGood.,1\nFine.,acceptable\n", "matthews_correlation"),
    ("mrpc", "sentence1,sentence2,label\nA.,B.,0\nC.,D.,not_equivalent\n", "f1"),
])
def test_dev_split_whose_one_label_leaves_the_main_metric_at_zero_warns(tmp_path: Path, task: str, content: str,
                                                                        metric: str):
    path = _write(tmp_path / "dev.csv", content)
    label = repr(TASKS[task].label_names[0 if task == "mrpc" else 1])
    assert _warnings(lambda: load_split(task, "validation", data_file=path)) == [
        f"{task} validation: all 2 row(s) of {path} have the label {label}; {metric} is 0 whatever the model "
        "predicts, so the evaluations cannot pick the best checkpoint: give the whole dev file"]


def test_one_label_where_the_metric_still_ranks_or_two_in_train_is_no_warning(glue_dir: Path):
    def load():
        assert len({e.label for e in load_split("rte", "train", data_dir=glue_dir)}) == 2
        assert len(load_split("rte", "validation", data_dir=glue_dir)) == 1  # one label: accuracy still ranks
        assert {e.label for e in load_split("mrpc", "validation", data_dir=glue_dir)} == {1}  # F1 has positives

    assert _warnings(load) == []


# --- the hub -------------------------------------------------------------------------------


def test_hub_rows_become_records(monkeypatch: pytest.MonkeyPatch):
    calls = []

    def fake_load_dataset(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"premise": ["P0", "P1"], "hypothesis": ["H0", "H1"],
                                           "label": [2, 0], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_split("mnli", "validation_mismatched") == [E(0, "P0", "H0", 2), E(1, "P1", "H1", 0)]
    assert load_split("mnli", "ax") == [E(0, "P0", "H0", None), E(1, "P1", "H1", None)]
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched"), ("nyu-mll/glue", "ax", "test")]


def test_hub_test_labels_of_minus_one_become_none(monkeypatch: pytest.MonkeyPatch):
    rows = datasets.Dataset.from_dict({"sentence": ["S0"], "label": [-1], "idx": [0]})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: rows)
    assert load_split("sst2", "test") == [E(0, "S0", None, None)]


def test_hub_failure_says_how_to_load_offline(monkeypatch: pytest.MonkeyPatch):
    def offline(path: str, name: str, split: str) -> datasets.Dataset:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GlueDataError, match=r"could not load nyu-mll/glue config 'rte' .*no network.*data_dir="):
        load_split("rte", "train")
