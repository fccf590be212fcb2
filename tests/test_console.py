"""Lines printed beside the progress bar (evaluation results, warnings) start on a line of their
own, in a log file and on a terminal, and the training loop's evaluation line is one of them."""

from __future__ import annotations

import io
import itertools
import logging
import re

import pytest
from test_loop import FakeEngine, _loop
from tqdm.auto import tqdm

from widenet_ds.jobs.console import write_line
from widenet_ds.jobs.loop import Schedule
from widenet_ds.jobs.metrics import _TqdmAwareHandler, get_logger


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def rendered(text: str) -> list[str]:
    """The lines a terminal shows: a carriage return goes back to the line's start and overwrites."""
    lines = []
    for raw in text.split("\n"):
        screen = ""
        for part in raw.split("\r"):
            screen = part + screen[len(part):]
        lines.append(screen.rstrip())
    return lines


def test_in_a_log_file_a_line_written_beside_a_bar_starts_a_line_of_its_own():
    log_file = io.StringIO()
    bar = tqdm(total=4, file=log_file, desc="pretrain", mininterval=0)
    bar.update(1)
    write_line("step 1: {'eval_loss': 1.0}", log_file)
    write_line("second line", log_file)
    bar.update(1)
    bar.close()
    lines = log_file.getvalue().split("\n")  # a file viewer does not act on carriage returns
    assert "step 1: {'eval_loss': 1.0}" in lines and "second line" in lines
    assert "" not in lines[:-1]  # no empty line between the bar and the text either
    assert any("pretrain:  25%" in line for line in lines[:lines.index("step 1: {'eval_loss': 1.0}")])


def test_on_a_terminal_the_bar_is_erased_and_drawn_again_below_the_line():
    terminal = Terminal()
    bar = tqdm(total=4, file=terminal, desc="pretrain", mininterval=0)
    bar.update(1)
    write_line("step 1: {'eval_loss': 1.0}", terminal)
    screen = rendered(terminal.getvalue())
    bar.close()
    assert screen[0] == "step 1: {'eval_loss': 1.0}" and screen[1].startswith("pretrain:  25%")


def test_without_a_bar_a_line_is_written_as_it_is():
    log_file = io.StringIO()
    write_line("plain", log_file)
    assert log_file.getvalue() == "plain\n"


@pytest.mark.parametrize("stream", [io.StringIO, Terminal])
def test_the_loops_evaluation_and_deepspeeds_lines_are_not_glued_to_the_progress_bar(stream):
    """The job's logger, DeepSpeed's logger (a warning at the first step) and the loop's bar write to
    one stream, as they do to a log file of stdout and stderr together."""
    from deepspeed.utils import logger as deepspeed_logger

    output = stream()
    get_logger()
    handler = next(h for h in logging.getLogger("widenet_ds").handlers if isinstance(h, _TqdmAwareHandler))
    deepspeed_handler = next(h for h in deepspeed_logger.handlers if type(h) is logging.StreamHandler)
    previous = handler.stream, deepspeed_handler.stream  # maybe a closed stream of an earlier test: not flushed
    handler.stream = deepspeed_handler.stream = output
    warn = "Attempting to get learning rate from scheduler before it has started"
    engine = FakeEngine(itertools.count(1), on_forward=lambda n: n == 2 and deepspeed_logger.warning(warn))
    try:
        loop, _ = _loop(engine, Schedule(max_steps=4, log_every=1, eval_every=2),
                        evaluate=lambda step: {"eval_loss": step / 4}, description="finetune rte",
                        logger=logging.getLogger("widenet_ds.jobs.finetune"), console=output)
        loop.run({"step": 0})
    finally:
        handler.stream, deepspeed_handler.stream = previous
    assert deepspeed_handler in deepspeed_logger.handlers  # restored after the loop
    text = output.getvalue()
    lines = rendered(text) if stream is Terminal else text.split("\n")  # a file viewer keeps each "\r" part
    evaluations = [line for line in lines if "step " in line and "eval_loss" in line]
    pattern = r"\d\d:\d\d:\d\d INFO widenet_ds\.jobs\.finetune: step (\d): \{'eval_loss': [\d.]+\}"
    assert [re.fullmatch(pattern, line).group(1) for line in evaluations] == ["2", "4"], lines
    assert sum(re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+\] \[WARNING\]", line) is not None and warn in line
               for line in lines) == 1, lines
    assert any("finetune rte: 100%" in line for line in lines), lines
