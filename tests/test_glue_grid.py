"""``glue_table.py collect``: the table from finished runs' eval_results.json, and the result
files it refuses (two runs of one cell, files that are not JSON or lack what the table needs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from widenet_ds.glue import GlueDataError
from widenet_ds.jobs.glue_grid import collect_results, main


def _result(folder: Path, text: str | None = None, **fields) -> Path:
    """An eval_results.json in ``folder``: ``text`` as is, or ``fields`` as the fine-tuning job writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "eval_results.json"
    path.write_text(text if text is not None else json.dumps(fields, indent=2))
    return path


MRPC = {"task": "mrpc", "model": "wn-e4", "seed": 1, "best_step": 6, "f1": 0.9, "accuracy": 0.8}


def test_collect_prints_the_table_of_every_run(tmp_path: Path, capsys: pytest.CaptureFixture):
    _result(tmp_path / "wn-e4" / "mrpc" / "seed1", **MRPC)
    _result(tmp_path / "wn-e4" / "mrpc" / "seed2", **{**MRPC, "seed": 2, "f1": 0.7, "accuracy": 0.6})
    _result(tmp_path / "albert" / "sst2" / "seed1", task="sst2", model="albert", seed=1, best_step=3, accuracy=0.9)
    table = main(["collect", str(tmp_path)])
    assert table == ("| Model | SST-2 | MRPC | Avg |\n|---|---:|---:|---:|\n"
                     "| albert | 90.0 | – | – |\n| wn-e4 | – | 75.0 | – |\n")
    assert capsys.readouterr().out == table


def test_two_runs_of_the_same_cell_are_refused_naming_both_files(tmp_path: Path):
    old = _result(tmp_path / "old" / "wn-e4" / "mrpc" / "seed1", **MRPC)
    new = _result(tmp_path / "new" / "mrpc-rerun", **{**MRPC, "task": "MRPC", "f1": 0.5})  # the task spelled apart
    with pytest.raises(GlueDataError) as err:
        main(["collect", str(tmp_path)])
    assert str(err.value) == (f"two results for model 'wn-e4', task mrpc, seed 1: {new} and {old}; keep one "
                              "run per cell (move the other out of the folders collected, or give the runs "
                              "different --model_label)")


def test_a_file_reached_through_nested_folders_counts_once(tmp_path: Path):
    _result(tmp_path / "wn-e4" / "mrpc" / "seed1", **MRPC)
    records = collect_results([tmp_path, tmp_path / "wn-e4", tmp_path / "wn-e4" / "mrpc"])
    assert records == [{"model": "wn-e4", "task": "mrpc", "seed": 1, "metrics": {"f1": 0.9, "accuracy": 0.8}}]


@pytest.mark.parametrize("text, message", [
    ('{"task": "mrpc", "model": "wn-e4",\n', r", line 2: not valid JSON \(Expecting property name"),
    ("", r", line 1: not valid JSON \(Expecting value\)"),
    ("[1, 2]", r": expected a JSON object, got list"),
    (json.dumps({k: v for k, v in MRPC.items() if k != "seed"}),
     r": no 'seed' \(keys: task, model, best_step, f1, accuracy\); the table needs model, task, seed"),
    (json.dumps({k: v for k, v in MRPC.items() if k != "f1"}), r": no 'f1' \(keys: task, model, seed, best_step"),
    (json.dumps({**MRPC, "task": "squad"}), r": unknown GLUE task 'squad' \(valid: cola, "),
    (json.dumps({**MRPC, "seed": "1"}), r": seed must be an integer, got '1'"),
    (json.dumps({**MRPC, "model": None}), r": model must be the run's label \(a non-empty string\), got None"),
    (json.dumps({**MRPC, "f1": "0.9"}), r": mrpc metrics must be numbers, got f1='0.9'; rerun"),
    (json.dumps({**MRPC, "accuracy": None, "f1": True}), r": mrpc metrics must be numbers, got f1=True, accuracy=None"),
])
def test_a_results_file_the_table_cannot_use_is_named(tmp_path: Path, text: str, message: str):
    _result(tmp_path / "good", **{**MRPC, "seed": 2})
    bad = _result(tmp_path / "wn-e4" / "mrpc" / "seed1", text)
    with pytest.raises(GlueDataError, match=f"^{re.escape(str(bad))}{message}"):
        main(["collect", str(tmp_path)])


def test_folders_without_results_are_refused(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlueDataError, match=re.escape(f"collect: no eval_results.json under {tmp_path / 'empty'}; ")):
        collect_results([tmp_path / "empty"])
    with pytest.raises(GlueDataError, match=re.escape(f"collect: {tmp_path / 'missing'} is not a folder")):
        collect_results([tmp_path / "missing"])
