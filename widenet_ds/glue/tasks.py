"""The GLUE task registry: one ``TaskSpec`` per task, the single source of truth for the
data loaders, the metrics, the submission writer and the results table.

Each split is described once (``SplitSpec``): its hub split name, its file in the GLUE
download layout (``<data_dir>/<Folder>/<file>.tsv``) and, for test splits, the GLUE
submission file it becomes. MNLI also carries the diagnostic set AX (split ``ax``,
hub config ``ax``, file ``diagnostic/diagnostic.tsv``), predicted by the MNLI model and
submitted as the optional ``AX.tsv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

HUB_DATASET = "nyu-mll/glue"

SplitKind = Literal["train", "dev", "test", "diagnostic"]


class GlueDataError(ValueError):
    """GLUE data, a task name, a split or a results file that cannot be used; the message says where
    and what to fix."""


@dataclass(frozen=True)
class SplitSpec:
    """One split of a task and where each source keeps it."""

    name: str  # split name as on the hub, e.g. "validation_matched"
    kind: SplitKind  # train and dev splits are labelled; test and diagnostic splits are not
    tsv_path: str  # file in the GLUE download layout, relative to data_dir, e.g. "MNLI/dev_matched.tsv"
    submission_file: str | None = None  # GLUE submission file written from this split's predictions
    hub_config: str | None = None  # hub config holding the split when it is not the task's own (AX)
    hub_split: str | None = None  # split name inside hub_config when it differs from name (AX: "test")
    renamed_metrics: dict[str, str] = field(default_factory=dict)  # metric key -> key reported for this split

    @property
    def labelled(self) -> bool:
        return self.kind in ("train", "dev")


@dataclass(frozen=True)
class TsvLayout:
    """Columns of a task's GLUE TSV files, by header name."""

    text_a: str  # column of the first sentence
    text_b: str | None  # column of the second sentence; None for single-sentence tasks
    label: str  # column of the gold label (train and dev files only)
    headerless_columns: tuple[str, ...] = ()  # names of the columns of train/dev files written without a header


@dataclass(frozen=True)
class TaskSpec:
    """Everything the GLUE layer knows about one task."""

    name: str  # registry key, e.g. "mnli"
    hub_config: str  # config of the hub dataset nyu-mll/glue
    folder: str  # folder in the GLUE download layout, e.g. "MNLI"
    display_name: str  # column header in result tables, e.g. "MNLI-m"
    text_keys: tuple[str, str | None]  # hub / CSV / JSON columns holding text_a and text_b
    tsv: TsvLayout  # how the GLUE TSV files lay out text and label
    label_names: tuple[str, ...]  # class names in label-index order, as on the hub; () for regression
    file_labels: tuple[str, ...]  # the same classes as written in GLUE TSVs and submission files
    metrics: tuple[str, ...]  # metrics computed on each dev split (names of compute_metrics keys)
    main_metric: str  # metric key that selects the best checkpoint
    headline_metrics: tuple[str, ...]  # metric keys averaged into the task's score in results tables
    splits: tuple[SplitSpec, ...]  # every split, train first
    score_range: tuple[float, float] | None = None  # regression tasks only: the range of gold scores

    @property
    def is_regression(self) -> bool:
        return self.score_range is not None

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier head: 1 for regression (STS-B), else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.text_keys[1] is not None

    @property
    def dev_splits(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.splits if s.kind == "dev")

    @property
    def test_splits(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.splits if s.kind == "test")

    @property
    def default_splits(self) -> tuple[str, ...]:
        """Splits loaded when none are named: train, dev and test (not the diagnostic set)."""
        return tuple(s.name for s in self.splits if s.kind != "diagnostic")

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Every key reported over all dev splits, e.g. ("accuracy", "mnli_mm") for MNLI."""
        keys = [s.renamed_metrics.get(m, m) for s in self.splits if s.kind == "dev" for m in self.metrics]
        return tuple(dict.fromkeys(keys))

    def file_columns(self, labelled: bool) -> tuple[str, ...]:
        """Columns (CSV header) or keys (JSON) a file of this task needs: the hub's sentence keys,
        then ``label`` in train and dev files. Test rows are numbered by their position in the file."""
        return (*(key for key in self.text_keys if key), *(("label",) if labelled else ()))

    def split(self, name: str) -> SplitSpec:
        """The split called ``name``; GlueDataError listing the task's splits otherwise."""
        for spec in self.splits:
            if spec.name == name:
                return spec
        valid = ", ".join(s.name for s in self.splits)
        raise GlueDataError(f"task '{self.name}' has no split '{name}' (valid: {valid})")


def _standard_splits(folder: str, submission_file: str) -> tuple[SplitSpec, ...]:
    """train / validation / test in ``<folder>/train.tsv, dev.tsv, test.tsv``."""
    return (SplitSpec("train", "train", f"{folder}/train.tsv"),
            SplitSpec("validation", "dev", f"{folder}/dev.tsv"),
            SplitSpec("test", "test", f"{folder}/test.tsv", submission_file=submission_file))


_MNLI_SPLITS = (
    SplitSpec("train", "train", "MNLI/train.tsv"),
    SplitSpec("validation_matched", "dev", "MNLI/dev_matched.tsv"),
    SplitSpec("validation_mismatched", "dev", "MNLI/dev_mismatched.tsv", renamed_metrics={"accuracy": "mnli_mm"}),
    SplitSpec("test_matched", "test", "MNLI/test_matched.tsv", submission_file="MNLI-m.tsv"),
    SplitSpec("test_mismatched", "test", "MNLI/test_mismatched.tsv", submission_file="MNLI-mm.tsv"),
    SplitSpec("ax", "diagnostic", "diagnostic/diagnostic.tsv", submission_file="AX.tsv",
              hub_config="ax", hub_split="test"),
)

_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("cola", "cola", "CoLA", "CoLA", ("sentence", None),
             TsvLayout("sentence", None, "label", headerless_columns=("source", "label", "original_mark", "sentence")),
             label_names=("unacceptable", "acceptable"), file_labels=_BINARY,
             metrics=("matthews_correlation",), main_metric="matthews_correlation",
             headline_metrics=("matthews_correlation",), splits=_standard_splits("CoLA", "CoLA.tsv")),
    TaskSpec("sst2", "sst2", "SST-2", "SST-2", ("sentence", None), TsvLayout("sentence", None, "label"),
             label_names=("negative", "positive"), file_labels=_BINARY,
             metrics=("accuracy",), main_metric="accuracy", headline_metrics=("accuracy",),
             splits=_standard_splits("SST-2", "SST-2.tsv")),
    TaskSpec("mrpc", "mrpc", "MRPC", "MRPC", ("sentence1", "sentence2"),
             TsvLayout("#1 String", "#2 String", "Quality"),
             label_names=("not_equivalent", "equivalent"), file_labels=_BINARY,
             metrics=("f1", "accuracy"), main_metric="f1", headline_metrics=("f1", "accuracy"),
             splits=_standard_splits("MRPC", "MRPC.tsv")),
    TaskSpec("stsb", "stsb", "STS-B", "STS-B", ("sentence1", "sentence2"), TsvLayout("sentence1", "sentence2", "score"),
             label_names=(), file_labels=(), metrics=("pearson", "spearmanr"), main_metric="spearmanr",
             headline_metrics=("pearson", "spearmanr"), splits=_standard_splits("STS-B", "STS-B.tsv"),
             score_range=(0.0, 5.0)),
    TaskSpec("qqp", "qqp", "QQP", "QQP", ("question1", "question2"),
             TsvLayout("question1", "question2", "is_duplicate"),
             label_names=("not_duplicate", "duplicate"), file_labels=_BINARY,
             metrics=("f1", "accuracy"), main_metric="f1", headline_metrics=("f1", "accuracy"),
             splits=_standard_splits("QQP", "QQP.tsv")),
    TaskSpec("mnli", "mnli", "MNLI", "MNLI-m", ("premise", "hypothesis"),
             TsvLayout("sentence1", "sentence2", "gold_label"),
             label_names=("entailment", "neutral", "contradiction"),
             file_labels=("entailment", "neutral", "contradiction"),
             metrics=("accuracy",), main_metric="accuracy", headline_metrics=("accuracy",), splits=_MNLI_SPLITS),
    TaskSpec("qnli", "qnli", "QNLI", "QNLI", ("question", "sentence"), TsvLayout("question", "sentence", "label"),
             label_names=_ENTAILMENT, file_labels=_ENTAILMENT,
             metrics=("accuracy",), main_metric="accuracy", headline_metrics=("accuracy",),
             splits=_standard_splits("QNLI", "QNLI.tsv")),
    TaskSpec("rte", "rte", "RTE", "RTE", ("sentence1", "sentence2"), TsvLayout("sentence1", "sentence2", "label"),
             label_names=_ENTAILMENT, file_labels=_ENTAILMENT,
             metrics=("accuracy",), main_metric="accuracy", headline_metrics=("accuracy",),
             splits=_standard_splits("RTE", "RTE.tsv")),
    TaskSpec("wnli", "wnli", "WNLI", "WNLI", ("sentence1", "sentence2"), TsvLayout("sentence1", "sentence2", "label"),
             label_names=("not_entailment", "entailment"), file_labels=_BINARY,
             metrics=("accuracy",), main_metric="accuracy", headline_metrics=("accuracy",),
             splits=_standard_splits("WNLI", "WNLI.tsv")),
)}


def get_task(name: str) -> TaskSpec:
    """The task called ``name``: case-insensitive, hyphens ignored ("SST-2", "sts-b" work).

    Raises GlueDataError listing the valid names for anything else.
    """
    key = str(name).lower().replace("-", "")
    if key not in TASKS:
        raise GlueDataError(f"unknown GLUE task {name!r} (valid: {', '.join(TASKS)})")
    return TASKS[key]


def describe_task_columns() -> str:
    """What a user's CSV / JSON / JSONL files must hold, as a short text for ``--help``: a title
    line, then one line per task with the columns of train/dev files, of test files, and the
    label values (a class as its index or its name; STS-B a score).

    Rendered from the registry, so it says exactly what the loaders check.
    """
    lines = ["CSV/JSON/JSONL columns per task (.tsv files: GLUE's own layout); a label is a class index or name; "
             "test rows are numbered in file order:"]
    width = max(len(name) for name in TASKS)
    for spec in TASKS.values():
        lines.append(f"  {spec.name:<{width}}  train/dev: {', '.join(spec.file_columns(True))}; "
                     f"test: {', '.join(spec.file_columns(False))}; label: {_label_values(spec)}")
    return "\n".join(lines) + "\n"


def _label_values(spec: TaskSpec) -> str:
    """``0=unacceptable, 1=acceptable``, or the score range of a regression task."""
    if spec.is_regression:
        low, high = spec.score_range
        return f"a score from {low:g} to {high:g}"
    return ", ".join(f"{index}={name}" for index, name in enumerate(spec.label_names))
