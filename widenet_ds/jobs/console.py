"""Console output beside a progress bar: every line a job prints starts on a line of its own.

``tqdm.write`` clears the bar's line before writing, which works on a terminal, where the
carriage return and the blanks erase the bar. In a log file (``> run.log``, a scheduler's
output file, a CI log) nothing is erased: the bar's text stays, and the next line would be
glued to its end. ``write_line`` ends the bar's line first there; ``library_logs_above_bar``
sends DeepSpeed's own log lines through it while a bar runs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

LIBRARY_LOGGERS = ("DeepSpeed",)  # loggers of libraries that print while the loop trains


def write_line(text: str, file: TextIO | None = None) -> None:
    """Write ``text`` and a newline to ``file`` (default: stderr), on a line of its own, above any
    progress bar on that stream; the bar is drawn again below it."""
    from tqdm.auto import tqdm

    file = sys.stderr if file is None else file
    prefix = "" if is_terminal(file) or not bar_shown_on(file) else "\n"
    tqdm.write(prefix + text, file=file)


def is_terminal(file: TextIO) -> bool:
    """Whether ``file`` is a terminal (a carriage return there moves back over the bar)."""
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar_shown_on(file: TextIO) -> bool:
    """Whether an open, enabled progress bar draws on ``file`` (the streams ``tqdm.write`` clears)."""
    from tqdm.auto import tqdm

    std = (sys.stdout, sys.stderr)
    for bar in list(getattr(tqdm, "_instances", [])):
        if getattr(bar, "disable", True) or not hasattr(bar, "start_t"):
            continue
        if bar.fp == file or (file in std and bar.fp in std):
            return True
    return False


class _LineHandler(logging.Handler):
    """Stands in for a library's console handler: its lines, formatted as it does, via ``write_line``."""

    def __init__(self, original: logging.StreamHandler):
        super().__init__(original.level)
        self.original = original
        self.setFormatter(original.formatter)
        for item in original.filters:
            self.addFilter(item)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record), file=self.original.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextmanager
def library_logs_above_bar(names: tuple[str, ...] = LIBRARY_LOGGERS) -> Iterator[None]:
    """While a progress bar runs: the console lines of these libraries' loggers (DeepSpeed's warnings
    during the first steps) start on a line of their own too; their handlers are restored after."""
    swapped = []
    for name in names:
        logger = logging.getLogger(name)
        for index, handler in enumerate(logger.handlers):
            if type(handler) is logging.StreamHandler:  # a console handler, not a file's
                logger.handlers[index] = _LineHandler(handler)
                swapped.append((logger, index, handler))
    try:
        yield
    finally:
        for logger, index, handler in swapped:
            logger.handlers[index] = handler
