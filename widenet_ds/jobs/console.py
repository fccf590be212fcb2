"""Console output beside a progress bar: every line a job prints starts on a line of its own.

``tqdm.write`` clears the bar's line before writing, which works on a terminal, where the
carriage return and the blanks erase the bar. In a log file (``> run.log``, a scheduler's
output file, a CI log) nothing is erased: the bar's text stays, and the next line would be
glued to its end. ``write_line`` ends the bar's line first there.
"""

from __future__ import annotations

import sys
from typing import TextIO


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
