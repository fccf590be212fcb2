"""Load GLUE examples from the hub, from the GLUE download layout, or from CSV / JSON /
JSONL / TSV files given per split.

Every source gives the same records (``GlueExample``): ``idx`` is the 0-based position of
the row among the file's data rows (the hub's ``idx``; the ``index`` of GLUE test files),
``label`` a class index, an STS-B score, or None in test and diagnostic splits.

GLUE TSVs are read as the GLUE download script writes them: tab-separated, quotes are
literal text (``csv.QUOTE_NONE``), a header row except in CoLA's train/dev files, MRPC's
header behind a UTF-8 byte-order mark, string labels in MNLI, QNLI and RTE.

Malformed rows (wrong column count, empty text, a score that is not a number, no label)
raise a ``GlueDataError`` naming the file and line, or with ``skip_malformed=True`` are
skipped, counted and logged (the real QQP train file has a few). A label outside the task's
label set always raises: it means a wrong file or task, not a damaged row.

A split must hold examples: an empty file, a header without rows, a train or dev file with
no label in any row (a test file given as dev) and a file whose rows were all skipped are
refused when the split is loaded, not at the job's first evaluation. STS-B dev splits need
two different scores (Pearson and Spearman are undefined otherwise); a train split whose
rows all have the same label, and a dev split whose one label leaves the main metric at 0
(CoLA's MCC, the F1 of MRPC and QQP without a positive example), are logged as warnings.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets

from .tasks import HUB_DATASET, GlueDataError, SplitSpec, TaskSpec, get_task

logger = logging.getLogger(__name__)

PathLike = str | Path


@dataclass(frozen=True)
class GlueExample:
    """One GLUE example, whatever its source."""

    idx: int  # 0-based position of the row in its split (the hub's idx, the index of GLUE test files)
    text_a: str  # first (or only) sentence
    text_b: str | None  # second sentence of pair tasks; None for CoLA and SST-2
    label: int | float | None  # class index, STS-B score in [0, 5], or None in test splits


@dataclass(frozen=True)
class _RawRow:
    """A row as read from a file, before validation; ``problem`` set when it is malformed already."""

    text_a: object = None
    text_b: object = None
    label: object = None
    problem: str | None = None


class _MalformedRow(Exception):
    """A row that ``skip_malformed`` may skip; the message says what is wrong with it."""


def load_split(task: str, split: str, *, data_dir: PathLike | None = None, data_file: PathLike | None = None,
               skip_malformed: bool = False) -> list[GlueExample]:
    """Examples of one split, from ``data_file`` (CSV/JSON/JSONL/TSV), from ``data_dir`` in the
    GLUE download layout, or from the hub (``nyu-mll/glue``) when neither is given."""
    spec = get_task(task)
    split_spec = spec.split(split)
    if data_dir is not None and data_file is not None:
        raise GlueDataError("pass data_dir (GLUE download layout) or data_file, not both")
    if data_file is not None:
        source = Path(data_file)
        examples = _read_file(spec, split_spec, source, skip_malformed)
    elif data_dir is not None:
        source = _glue_file(spec, split_spec, Path(data_dir))
        examples = _read_tsv(spec, split_spec, source, skip_malformed)
    else:
        config, hub_split = split_spec.hub_config or spec.hub_config, split_spec.hub_split or split_spec.name
        source = f"{HUB_DATASET} ({config}, {hub_split})"
        examples = _load_hub(spec, split_spec)
    _check_label_spread(spec, split_spec, examples, source)
    return examples


def load_glue(task: str, splits: Sequence[str] | None = None, *, data_dir: PathLike | None = None,
              data_files: Mapping[str, PathLike] | None = None, skip_malformed: bool = False,
              as_dataset: bool = False) -> dict[str, list[GlueExample]] | datasets.DatasetDict:
    """Examples of several splits of ``task``, keyed by split name; from the hub unless
    ``data_dir`` or ``data_files`` is given.

    Args:
        task: a GLUE task name (see ``TASKS``).
        splits: splits to load; default: the keys of ``data_files``, else train, dev and test.
        data_dir: a folder in the GLUE download layout (``<data_dir>/MNLI/dev_matched.tsv`` ...).
        data_files: one file per split, e.g. ``{"train": "train.csv", "validation": "dev.jsonl"}``.
        skip_malformed: skip (and log) malformed rows instead of raising.
        as_dataset: return a ``datasets.DatasetDict`` instead of lists of ``GlueExample``.
    """
    spec = get_task(task)
    if data_dir is not None and data_files is not None:
        raise GlueDataError("pass data_dir (GLUE download layout) or data_files, not both")
    files = dict(data_files or {})
    names = list(splits) if splits is not None else list(files) or list(spec.default_splits)
    if data_files is not None and not set(names) <= set(files):
        missing = [name for name in names if name not in files]
        raise GlueDataError(f"data_files has no file for split(s) {', '.join(missing)} (given: {', '.join(files)})")
    loaded = {name: load_split(spec.name, name, data_dir=data_dir, data_file=files.get(name),
                               skip_malformed=skip_malformed) for name in names}
    if as_dataset:
        return datasets.DatasetDict({name: to_dataset(spec.name, examples) for name, examples in loaded.items()})
    return loaded


def to_dataset(task: str, examples: Sequence[GlueExample]) -> datasets.Dataset:
    """A ``datasets.Dataset`` with columns idx, text_a, text_b, label (float32 for STS-B, else int64)."""
    label_type = "float32" if get_task(task).is_regression else "int64"
    features = datasets.Features({"idx": datasets.Value("int64"), "text_a": datasets.Value("string"),
                                  "text_b": datasets.Value("string"), "label": datasets.Value(label_type)})
    return datasets.Dataset.from_list([asdict(e) for e in examples], features=features)


# --- the hub -------------------------------------------------------------------------------


def _load_hub(spec: TaskSpec, split: SplitSpec) -> list[GlueExample]:
    config, hub_split = split.hub_config or spec.hub_config, split.hub_split or split.name
    try:
        rows = datasets.load_dataset(HUB_DATASET, config, split=hub_split)
    except Exception as err:  # network, cache and hub errors alike: the fix is the same
        raise GlueDataError(f"could not load {HUB_DATASET} config '{config}' split '{hub_split}' from the hub "
                            f"({type(err).__name__}: {err}); without hub access pass data_dir=<folder in the "
                            "GLUE download layout> or data_files={split: file}") from err
    key_a, key_b = spec.text_keys
    texts_b = rows[key_b] if key_b else [None] * len(rows)
    labels = rows["label"] if split.labelled else [None] * len(rows)
    return [GlueExample(int(idx), a, b, _hub_label(spec, label))
            for idx, a, b, label in zip(rows["idx"], rows[key_a], texts_b, labels)]


def _hub_label(spec: TaskSpec, label: int | float | None) -> int | float | None:
    """The hub marks missing labels with -1."""
    if label is None or label == -1:
        return None
    return float(label) if spec.is_regression else int(label)


# --- files ---------------------------------------------------------------------------------


def _glue_file(spec: TaskSpec, split: SplitSpec, data_dir: Path) -> Path:
    """``data_dir/<Folder>/<file>.tsv``; GlueDataError saying what is expected where otherwise."""
    path = data_dir / split.tsv_path
    if path.is_file():
        return path
    if not data_dir.is_dir():
        raise GlueDataError(f"data_dir {data_dir} is not a folder; expected the GLUE download layout "
                            f"with {spec.name} {split.name} at {path}")
    if path.parent.is_dir():
        seen = f"{path.parent} holds: {', '.join(sorted(p.name for p in path.parent.iterdir())) or 'nothing'}"
    else:
        seen = f"there is no folder {path.parent}"
    raise GlueDataError(f"{spec.name} {split.name}: expected {path} ({seen}); data_dir must hold the GLUE "
                        "download layout (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI, diagnostic)")


def _read_file(spec: TaskSpec, split: SplitSpec, path: Path, skip_malformed: bool) -> list[GlueExample]:
    """A split from one file, its format chosen by the extension."""
    if not path.is_file():
        raise GlueDataError(f"{spec.name} {split.name}: data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return _read_tsv(spec, split, path, skip_malformed)
    readers = {".csv": _csv_rows, ".json": _json_rows, ".jsonl": _jsonl_rows}
    if suffix not in readers:
        raise GlueDataError(f"{path}: unsupported extension '{suffix}' (use .csv, .json, .jsonl or a GLUE .tsv)")
    columns = ", ".join(spec.file_columns(split.labelled))
    layout = (f"a header row ({columns}) and one row per example" if suffix == ".csv"
              else f"one JSON object per example, with keys {columns}")
    _refuse_empty_file(spec, split, path, layout)
    rows = readers[suffix](spec, split, path)
    return _collect(spec, split, path, rows, skip_malformed, text_columns=spec.text_keys, label_column="label",
                    label_index_ok=True)


def _read_tsv(spec: TaskSpec, split: SplitSpec, path: Path, skip_malformed: bool) -> list[GlueExample]:
    """A split from a TSV laid out as the GLUE download's file of that split."""
    header = "" if _headerless(spec, split) else "a header row and "
    _refuse_empty_file(spec, split, path, f"{header}one row per example, as in the GLUE {spec.folder} files")
    rows = _tsv_rows(spec, split, path)
    text_columns = (spec.tsv.text_a, spec.tsv.text_b)
    return _collect(spec, split, path, rows, skip_malformed, text_columns=text_columns, label_column=spec.tsv.label,
                    label_index_ok=False)


def _refuse_empty_file(spec: TaskSpec, split: SplitSpec, path: Path, expected: str) -> None:
    """GlueDataError when ``path`` holds nothing but blank lines: an empty split would only fail later,
    at the job's first evaluation or prediction. ``expected`` says what the file should hold."""
    with path.open(encoding="utf-8-sig") as f:
        if any(line.strip() for line in f):
            return
    raise GlueDataError(f"{spec.name} {split.name}: {path} is empty; expected {expected}")


def _tsv_rows(spec: TaskSpec, split: SplitSpec, path: Path) -> Iterator[tuple[str, _RawRow]]:
    """Rows of a GLUE TSV (quotes literal; header row unless the layout says there is none)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = list(spec.tsv.headerless_columns) if _headerless(spec, split) else next(reader, [])
        wanted = (spec.tsv.text_a, spec.tsv.text_b, spec.tsv.label if split.labelled else None)
        positions = [_column(path, columns, name, spec) for name in wanted]
        for row in reader:
            if not row:
                continue  # blank line
            where = f"line {reader.line_num}"
            if len(row) != len(columns):
                yield where, _RawRow(problem=f"expected {len(columns)} tab-separated columns, got {len(row)}")
            else:
                yield where, _RawRow(*(None if p is None else row[p] for p in positions))


def _headerless(spec: TaskSpec, split: SplitSpec) -> bool:
    """Whether the GLUE file of this split has no header row (CoLA's train and dev files)."""
    return split.labelled and bool(spec.tsv.headerless_columns)


def _csv_rows(spec: TaskSpec, split: SplitSpec, path: Path) -> Iterator[tuple[str, _RawRow]]:
    """Rows of a CSV with a header naming the hub's sentence keys and ``label``."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        key_a, key_b = spec.text_keys
        for name in (key_a, key_b, "label" if split.labelled else None):
            _column(path, columns, name, spec)
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row or None in row.values():
                yield where, _RawRow(problem=f"expected {len(columns)} comma-separated columns")
            else:
                yield where, _RawRow(row[key_a], row[key_b] if key_b else None, row.get("label"))


def _jsonl_rows(spec: TaskSpec, split: SplitSpec, path: Path) -> Iterator[tuple[str, _RawRow]]:
    """Rows of a JSON Lines file: one object per line."""
    with path.open(encoding="utf-8-sig") as f:
        for line_num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                yield f"line {line_num}", _RawRow(problem=f"invalid JSON ({err.msg})")
            else:
                yield f"line {line_num}", _json_record(spec, item)


def _json_rows(spec: TaskSpec, split: SplitSpec, path: Path) -> Iterator[tuple[str, _RawRow]]:
    """Rows of a .json file: a JSON array of objects, or JSON Lines (as ``datasets`` accepts)."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.lstrip().startswith("["):
        yield from _jsonl_rows(spec, split, path)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise GlueDataError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from None
    for number, item in enumerate(items, start=1):
        yield f"item {number}", _json_record(spec, item)


def _json_record(spec: TaskSpec, item: object) -> _RawRow:
    """A parsed JSON object as a raw row."""
    if not isinstance(item, dict):
        return _RawRow(problem=f"expected a JSON object, got {type(item).__name__}")
    key_a, key_b = spec.text_keys
    absent = [key for key in (key_a, key_b) if key is not None and key not in item]
    if absent:
        return _RawRow(problem=f"no key {', '.join(map(repr, absent))} (keys: {', '.join(item)})")
    return _RawRow(item[key_a], item[key_b] if key_b else None, item.get("label"))


def _column(path: Path, columns: Sequence[str], name: str | None, spec: TaskSpec) -> int | None:
    """Position of column ``name`` in the header; GlueDataError naming the file otherwise."""
    if name is None:
        return None
    if name not in columns:
        raise GlueDataError(f"{path}, line 1: no column '{name}' in the header ({', '.join(columns)}); "
                            f"{spec.name} files need it")
    return list(columns).index(name)


# --- validation ----------------------------------------------------------------------------


def _collect(spec: TaskSpec, split: SplitSpec, path: Path, rows: Iterable[tuple[str, _RawRow]], skip_malformed: bool,
             text_columns: tuple[str, str | None], label_column: str, label_index_ok: bool) -> list[GlueExample]:
    """Validate raw rows into examples, raising on (or skipping and counting) malformed ones.

    ``text_columns`` and ``label_column`` name the file's columns in messages; ``label_index_ok``
    accepts class indices as labels (CSV/JSON; GLUE TSVs must use the task's own label strings).
    A file that leaves no example (no rows, no labels, every row skipped) raises a GlueDataError.
    """
    rows = iter(rows)
    examples, skipped, count, labelled = [], [], 0, 0  # labelled: rows not known to lack a label
    for idx, (where, raw) in enumerate(rows):
        count += 1
        labelled += not _unlabelled(raw)
        try:
            examples.append(_example(spec, split, idx, raw, f"{path}, {where}", text_columns, label_index_ok))
        except _MalformedRow as err:
            if not skip_malformed:
                if split.labelled and not labelled and all(_unlabelled(r) for _, r in rows):
                    raise GlueDataError(_no_labels(spec, split, path, label_column)) from None
                raise GlueDataError(f"{path}, {where}: {err}; fix the row or load with skip_malformed=True "
                                    "to skip such rows") from None
            skipped.append(f"{where}: {err}")
    if not examples:
        raise GlueDataError(_no_examples(spec, split, path, count, labelled, skipped, label_column))
    if skipped:
        logger.warning("%s: skipped %d malformed row(s); first at %s", path, len(skipped), skipped[0])
    return examples


def _no_examples(spec: TaskSpec, split: SplitSpec, path: Path, count: int, labelled: int, skipped: list[str],
                 label_column: str) -> str:
    """Why a non-empty file gave no example: no data rows, no labels, or every row skipped as malformed."""
    if not count:
        what = "is an empty JSON array" if path.suffix.lower() == ".json" else "has a header but no rows"
        return f"{spec.name} {split.name}: {path} {what}; the split needs at least one example"
    if split.labelled and not labelled:
        return _no_labels(spec, split, path, label_column)
    return (f"{spec.name} {split.name}: all {count} row(s) of {path} are malformed, the first at {skipped[0]}; "
            "skip_malformed left no example: fix the file")


def _no_labels(spec: TaskSpec, split: SplitSpec, path: Path, label_column: str) -> str:
    """The message for a train or dev file without a label in any row, most likely a test file."""
    return (f"{spec.name} {split.name}: no row of {path} has a label in '{label_column}'; {split.kind} files need "
            "one in every row (test files have none: is this a test file?)")


def _example(spec: TaskSpec, split: SplitSpec, idx: int, raw: _RawRow, where: str,
             text_columns: tuple[str, str | None], label_index_ok: bool) -> GlueExample:
    if raw.problem:
        raise _MalformedRow(raw.problem)
    column_a, column_b = text_columns
    text_a = _text(raw.text_a, column_a)
    text_b = _text(raw.text_b, column_b) if column_b else None
    label = _label(spec, raw.label, where, label_index_ok) if split.labelled else None
    return GlueExample(idx, text_a, text_b, label)


def _text(value: object, column: str) -> str:
    if not isinstance(value, str):
        raise _MalformedRow(f"text in '{column}' must be a string, got {value!r}")
    if not value.strip():
        raise _MalformedRow(f"empty text in '{column}'")
    return value


def _label(spec: TaskSpec, value: object, where: str, index_ok: bool) -> int | float:
    """A class index or a score from a file's label field.

    Classes are accepted as written in GLUE files or as hub names ("entailment", "1"); CSV and
    JSON may also give the class index. Missing values (empty, null, the hub's -1) are malformed.
    """
    if _missing_label(value):
        raise _MalformedRow("missing label")
    if spec.is_regression:
        return _score(spec, value, where)
    for classes in (spec.file_labels, spec.label_names):
        if value in classes:
            return classes.index(value)
    index = _as_int(value) if index_ok else None
    if index is not None and 0 <= index < spec.num_labels:
        return index
    allowed = ", ".join(dict.fromkeys((*spec.file_labels, *spec.label_names)))
    allowed += f" or an index 0-{spec.num_labels - 1}" if index_ok else ""
    raise GlueDataError(f"{where}: label {value!r} is not a {spec.name} label (allowed: {allowed})")


def _unlabelled(raw: _RawRow) -> bool:
    """A well-formed row without a label (a row that is malformed already may have lost its label)."""
    return raw.problem is None and _missing_label(raw.label)


def _missing_label(value: object) -> bool:
    """Empty, null, or the hub's -1: how files mark an example without a label."""
    return value is None or value == "" or value == -1 or value == "-1"


def _score(spec: TaskSpec, value: object, where: str) -> float:
    """An STS-B score; a value that is not a number (text, true/false, NaN) is a malformed row."""
    low, high = spec.score_range
    score = _as_number(value)
    if score is None:
        raise _MalformedRow(f"score {value!r} is not a number ({spec.name} labels are scores from {low:g} to {high:g})")
    if not low <= score <= high:
        raise GlueDataError(f"{where}: score {value!r} is outside {spec.name}'s range [{low:g}, {high:g}]")
    return score


def _as_number(value: object) -> float | None:
    """``value`` as a float when it is a number (3.8, "3.8"), else None: JSON's true/false and NaN are not."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _check_label_spread(spec: TaskSpec, split: SplitSpec, examples: Sequence[GlueExample],
                        source: PathLike) -> None:
    """Labels that cannot train or score: an STS-B dev split with one score only raises (Pearson and
    Spearman are undefined for it, and need two rows); a train split with one label only is logged
    as a warning (the model can learn nothing but that label), and so is a dev split whose one class
    makes the task's main metric constant (MCC always 0; F1 always 0 without a positive example),
    since its evaluations then cannot pick the best checkpoint."""
    values = {e.label for e in examples}
    if not split.labelled or len(values) != 1:
        return
    value = values.pop()
    shown = f"{value:g}" if spec.is_regression else repr(spec.label_names[value])
    if spec.is_regression and split.kind == "dev":
        raise GlueDataError(f"{spec.name} {split.name}: all {len(examples)} row(s) of {source} have the score "
                            f"{shown}; Pearson and Spearman correlations need at least two different scores: "
                            "give the whole dev file")
    if split.kind == "train":
        logger.warning("%s %s: all %d row(s) of %s have the label %s; the model can learn nothing but that label: "
                       "is this the right file?", spec.name, split.name, len(examples), source, shown)
    elif spec.main_metric == "matthews_correlation" or (spec.main_metric == "f1" and value == 0):
        logger.warning("%s %s: all %d row(s) of %s have the label %s; %s is 0 whatever the model predicts, so the "
                       "evaluations cannot pick the best checkpoint: give the whole dev file", spec.name, split.name,
                       len(examples), source, shown, spec.main_metric)


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is one (1, "1"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None
