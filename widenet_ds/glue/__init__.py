"""GLUE data and metrics: the task registry, loaders (hub, GLUE download layout, CSV/JSON),
encoding, official metrics, submission files and the results table."""

from .data import GlueExample, load_glue, load_split, to_dataset
from .encoding import collate, encode
from .metrics import (
                    compute_dev_metrics,
                    compute_metrics,
                    predictions_from_logits,
                    to_predictions,
)
from .submission import write_split_submission, write_submission
from .table import results_table, task_score
from .tasks import (
                    HUB_DATASET,
                    TASKS,
                    GlueDataError,
                    SplitSpec,
                    TaskSpec,
                    TsvLayout,
                    describe_task_columns,
                    get_task,
)

__all__ = [
    "HUB_DATASET", "TASKS", "GlueDataError", "GlueExample", "SplitSpec", "TaskSpec", "TsvLayout", "collate",
    "compute_dev_metrics", "compute_metrics", "describe_task_columns", "encode", "get_task", "load_glue", "load_split",
    "predictions_from_logits", "results_table", "task_score", "to_dataset", "to_predictions",
    "write_split_submission", "write_submission",
]
