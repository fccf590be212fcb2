"""GLUE submission files: names, header, label strings or numbers, STS-B clipping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from widenet_ds.glue import write_split_submission, write_submission


def test_integer_label_tasks_write_zero_and_one(tmp_path: Path):
    assert write_submission(tmp_path, "cola", {"test": [1, 0, 1]}) == [tmp_path / "CoLA.tsv"]
    assert (tmp_path / "CoLA.tsv").read_text() == "index\tprediction\n0\t1\n1\t0\n2\t1\n"


def test_string_label_tasks_write_label_names_from_logits(tmp_path: Path):
    write_submission(tmp_path, "rte", {"test": np.array([[2.0, -1.0], [0.0, 3.0]])})
    assert (tmp_path / "RTE.tsv").read_text() == "index\tprediction\n0\tentailment\n1\tnot_entailment\n"


def test_stsb_scores_are_clipped_to_zero_five_with_three_decimals(tmp_path: Path):
    write_submission(tmp_path, "STS-B", {"test": [5.4, -0.2, 3.14159, -0.0, 2.5]})
    assert (tmp_path / "STS-B.tsv").read_text() == ("index\tprediction\n0\t5.000\n1\t0.000\n2\t3.142\n"
                                                    "3\t0.000\n4\t2.500\n")


def test_mnli_writes_matched_mismatched_and_optional_ax(tmp_path: Path):
    paths = write_submission(tmp_path, "mnli", {"test_matched": [0, 1, 2], "test_mismatched": [2], "ax": [1]})
    assert [p.name for p in paths] == ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]
    assert (tmp_path / "MNLI-m.tsv").read_text() == "index\tprediction\n0\tentailment\n1\tneutral\n2\tcontradiction\n"
    assert (tmp_path / "MNLI-mm.tsv").read_text() == "index\tprediction\n0\tcontradiction\n"
    assert (tmp_path / "AX.tsv").read_text() == "index\tprediction\n0\tneutral\n"


def test_mnli_needs_both_test_splits(tmp_path: Path):
    with pytest.raises(ValueError, match="missing: test_mismatched"):
        write_submission(tmp_path, "mnli", {"test_matched": [0]})
    assert not (tmp_path / "MNLI-m.tsv").exists()


def test_given_indices_are_written(tmp_path: Path):
    path = write_split_submission(tmp_path / "sub", "qqp", "test", [1, 0], indices=[5, 7])
    assert path.read_text() == "index\tprediction\n5\t1\n7\t0\n"
    with pytest.raises(ValueError, match="1 indices for 2 predictions"):
        write_split_submission(tmp_path, "qqp", "test", [1, 0], indices=[5])


def test_bad_predictions_and_splits_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match=r"class indices 0-1, got \[2\]"):
        write_submission(tmp_path, "wnli", {"test": [0, 2]})
    with pytest.raises(ValueError, match="not submitted to GLUE"):
        write_split_submission(tmp_path, "wnli", "validation", [0])
    with pytest.raises(ValueError, match="unknown: validation"):
        write_submission(tmp_path, "wnli", {"test": [0], "validation": [0]})
