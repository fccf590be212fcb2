"""How the entry points in ``launch/`` end: a mistake a user can fix is one message, not a traceback.

Errors of bad input (a config, a data file, a checkpoint, the output folder) are printed once, by
rank 0, as ``error: <what is wrong, where, what to do>``, and the process exits with status 1. Set
``WIDENET_DS_DEBUG=1`` to get the Python traceback instead (on every rank).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_VARIABLE = "WIDENET_DS_DEBUG"


_PACKAGE = __name__.split(".")[0]

# Each exception type that reports a user's mistake: (module, class); each message says what to fix.
USER_ERRORS = (
    ("config", "ConfigError"), ("engine.checkpointing", "CheckpointError"), ("data.corpus", "CorpusError"),
    ("data.tokenizer", "TokenizerError"), ("data.dataset", "CacheError"), ("glue.tasks", "GlueDataError"),
    ("jobs.run_dir", "OutputDirError"), ("safe_io", "UnsafeFileError"), ("engine.guards", "NonFiniteLossError"),
    ("distributed", "RankZeroError"), ("squad.data", "SquadDataError"), ("analysis.errors", "ReportError"),
    ("data.images", "ImageDataError"), ("distributed", "MissingBuildToolError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The user-error types of the modules imported so far.

    An exception can only have been raised once its type's module ran, so the others cannot be the
    one being reported. Importing them here instead would load every job's dependencies (datasets,
    scikit-learn, Pillow for the image job, ...) on the way to printing one line, and a missing
    optional package would turn the message into an ImportError traceback."""
    found = []
    for module, name in USER_ERRORS:
        loaded = sys.modules.get(f"{_PACKAGE}.{module}")
        if loaded is not None:
            found.append(getattr(loaded, name))
    return tuple(found)


def main(entry: Callable[[], Any]) -> Any:
    """Call ``entry``; report a user error as one line on rank 0 and exit 1 (see the module docstring)."""
    if os.environ.get(DEBUG_VARIABLE) == "1":
        return entry()
    try:
        return entry()
    except user_errors() as err:
        from ..distributed import RankZeroError, is_main_process

        if is_main_process() and not isinstance(err, RankZeroError):
            print(f"error: {err}\n(set {DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
