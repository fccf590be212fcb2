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


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that report a user's mistake (each message says what to fix)."""
    from ..analysis.errors import ReportError
    from ..config import ConfigError
    from ..data import CacheError, CorpusError, TokenizerError
    from ..data.images import ImageDataError
    from ..distributed import MissingBuildToolError, RankZeroError
    from ..engine.checkpointing import CheckpointError
    from ..engine.guards import NonFiniteLossError
    from ..glue import GlueDataError
    from ..safe_io import UnsafeFileError
    from ..squad import SquadDataError
    from .run_dir import OutputDirError

    return (ConfigError, CheckpointError, CorpusError, TokenizerError, CacheError, GlueDataError, OutputDirError,
            UnsafeFileError, NonFiniteLossError, RankZeroError, SquadDataError, ReportError, ImageDataError,
            MissingBuildToolError)


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
