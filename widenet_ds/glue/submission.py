"""Write GLUE benchmark submission files (the format gluebenchmark.com accepts).

One file per test split, named as GLUE expects (``CoLA.tsv``, ``MNLI-m.tsv``,
``MNLI-mm.tsv``, ``AX.tsv`` ...), with a header ``index<TAB>prediction`` and one row per
test example: the label string for MNLI, QNLI, RTE and AX ("entailment" ...), 0/1 for
CoLA, SST-2, MRPC, QQP and WNLI, and for STS-B the score clipped to [0, 5] with 3 decimals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from .metrics import to_predictions
from .tasks import TaskSpec, get_task


def write_submission(out_dir: str | Path, task: str, predictions: Mapping[str, ArrayLike],
                     indices: Mapping[str, Sequence[int]] | None = None) -> list[Path]:
    """Write every test split of ``task`` (MNLI: both, plus AX when given); returns the files.

    Args:
        out_dir: folder for the files (created if needed).
        task: a GLUE task name.
        predictions: ``{split: predictions}`` for each test split (``test``; MNLI: ``test_matched``,
            ``test_mismatched`` and optionally ``ax``), as class indices / scores (N,) or logits.
        indices: ``{split: example idx}``; default: 0..N-1, the GLUE test files' index.
    """
    spec = get_task(task)
    allowed = [s.name for s in spec.splits if s.submission_file]
    optional = [name for name in allowed if name not in spec.test_splits]
    missing = [name for name in spec.test_splits if name not in predictions]
    unknown = [name for name in predictions if name not in allowed]
    if missing or unknown:
        raise ValueError(f"{spec.name} submission needs predictions for {', '.join(spec.test_splits)} "
                         f"(optional: {', '.join(optional) or 'none'}); "
                         f"missing: {', '.join(missing) or 'none'}, unknown: {', '.join(unknown) or 'none'}")
    indices = indices or {}
    return [write_split_submission(out_dir, spec.name, name, values, indices.get(name))
            for name, values in predictions.items()]


def write_split_submission(out_dir: str | Path, task: str, split: str, predictions: ArrayLike,
                           indices: Sequence[int] | None = None) -> Path:
    """Write the submission file of one test split; returns its path."""
    spec = get_task(task)
    split_spec = spec.split(split)
    if split_spec.submission_file is None:
        submittable = ", ".join(s.name for s in spec.splits if s.submission_file)
        raise ValueError(f"{spec.name} split '{split}' is not submitted to GLUE (test splits: {submittable})")
    values = to_predictions(spec.name, predictions)
    index = range(len(values)) if indices is None else list(indices)
    if len(index) != len(values):
        raise ValueError(f"{spec.name} {split}: {len(index)} indices for {len(values)} predictions")
    rows = [f"{i}\t{_format(spec, v)}" for i, v in zip(index, values)]
    path = Path(out_dir) / split_spec.submission_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["index\tprediction", *rows]) + "\n", encoding="utf-8")
    return path


def _format(spec: TaskSpec, value: np.generic) -> str:
    """A prediction as GLUE wants it: the file label of a class, or a clipped 3-decimal score."""
    if spec.is_regression:
        low, high = spec.score_range
        return f"{float(np.clip(value, low, high)) + 0.0:.3f}"  # + 0.0 turns -0.0 into 0.0
    return spec.file_labels[int(value)]
