"""The fine-tuning job refuses split files that leave nothing to train on or score when it loads
them, before any model, engine or output folder exists (not at its first evaluation)."""

from __future__ import annotations

from pathlib import Path

import pytest
from glue_fixtures import GLUE_FILES, MNLI_HEADER, write_glue_layout

from widenet_ds.glue import GlueDataError
from widenet_ds.jobs.finetune import run


def _refused(argv: list[str], out: Path) -> str:
    with pytest.raises(GlueDataError) as err:
        run([*argv, "--model_name_or_path", "preset:debug", "--output_dir", str(out)])
    assert not out.exists(), "nothing was written"
    return str(err.value)


def test_header_only_dev_file_given_as_validation_file(tmp_path: Path):
    train = tmp_path / "train.csv"
    train.write_text("sentence1,sentence2,label\nA.,B.,1\nC.,D.,0\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("sentence1,sentence2,label\n")
    message = _refused(["--task", "mrpc", "--train_file", str(train), "--validation_file", str(dev)], tmp_path / "out")
    assert message == f"mrpc validation: {dev} has a header but no rows; the split needs at least one example"


def test_header_only_mismatched_dev_file_in_the_glue_layout(tmp_path: Path):
    files = {name: content for name, content in GLUE_FILES.items() if name.startswith("MNLI/")}
    root = write_glue_layout(tmp_path / "glue", {**files, "MNLI/dev_mismatched.tsv": f"{MNLI_HEADER}\tgold_label\n"})
    message = _refused(["--task", "mnli", "--data_dir", str(root)], tmp_path / "out")
    assert message == (f"mnli validation_mismatched: {root / 'MNLI' / 'dev_mismatched.tsv'} has a header but no rows; "
                       "the split needs at least one example")
