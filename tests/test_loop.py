"""The training loop every job shares, driven by a fake engine (no model, no DeepSpeed): when it
logs, evaluates and saves, what its metrics records average, where a resumed run continues, and
how a stop signal or a NaN loss ends it."""

from __future__ import annotations

import itertools
import logging
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from widenet_ds.engine.guards import NonFiniteGuard, NonFiniteLossError
from widenet_ds.jobs.loop import Schedule, TrainingLoop

TOKENS_PER_BATCH = 6  # the fake batch: 2 sequences of 3 real tokens


class FakeEngine:
    """Returns the given losses one per forward; ``on_forward(n)`` runs before the n-th forward (from 1)."""

    device = torch.device("cpu")

    def __init__(self, losses, on_forward=None):
        self.losses = iter(losses)
        self.on_forward = on_forward or (lambda n: None)
        self.forwards = self.backwards = self.steps = 0
        self.training = False

    def __call__(self, **batch):
        self.forwards += 1
        self.on_forward(self.forwards)
        return SimpleNamespace(loss=torch.tensor(float(next(self.losses))))

    def backward(self, loss):
        self.backwards += 1

    def step(self):
        self.steps += 1

    def get_lr(self):
        return [1e-3]

    def train(self):
        self.training = True


class FakeMetrics:
    def __init__(self):
        self.written: list[tuple[str, dict]] = []

    def write(self, record, prefix="train"):
        self.written.append((prefix, dict(record)))

    def steps(self, prefix: str) -> list[int]:
        return [record["step"] for kind, record in self.written if kind == prefix]


def _batches():
    return itertools.repeat({"input_ids": torch.ones(2, 4, dtype=torch.long),
                             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])})


def _loop(engine, schedule, grad_accum=1, guard=None, **hooks) -> tuple[TrainingLoop, FakeMetrics]:
    metrics = FakeMetrics()
    loop = TrainingLoop(engine, _batches(), schedule, grad_accum=grad_accum, metrics=metrics,
                        guard=guard or NonFiniteGuard(), **hooks)
    return loop, metrics


def test_the_schedule_logs_evaluates_and_saves_at_its_multiples_and_at_the_last_step():
    schedule = Schedule(max_steps=7, log_every=3, eval_every=2, save_every=3)
    steps = range(1, 8)
    assert [s for s in steps if schedule.logs(s)] == [3, 6, 7]
    assert [s for s in steps if schedule.evaluates(s)] == [2, 4, 6, 7]
    assert [s for s in steps if schedule.saves(s)] == [3, 6, 7]
    never = Schedule(max_steps=7, eval_every=0, save_every=0)
    assert not any(never.evaluates(s) or never.saves(s) for s in steps)
    assert [s for s in steps if Schedule(max_steps=7, eval_at_end=True).evaluates(s)] == [7]


def test_the_loop_records_evaluates_and_saves_on_the_schedule_in_that_order():
    events = []
    engine = FakeEngine(itertools.count(1))
    loop, metrics = _loop(engine, Schedule(max_steps=7, log_every=3, eval_every=2, save_every=3),
                          evaluate=lambda step: events.append(("eval", step)) or {"score": step / 10},
                          after_eval=lambda step, result: events.append(("after_eval", step, result["score"])),
                          save=lambda step: events.append(("save", step)), finish=lambda: events.append("finish"))
    state = {"step": 0}
    records = loop.run(state)

    assert [r["step"] for r in records] == metrics.steps("train") == [3, 6, 7]
    assert metrics.steps("eval") == [2, 4, 6, 7]
    assert [record["score"] for kind, record in metrics.written if kind == "eval"] == [0.2, 0.4, 0.6, 0.7]
    assert events == [("eval", 2), ("after_eval", 2, 0.2), ("save", 3), ("eval", 4), ("after_eval", 4, 0.4),
                      ("eval", 6), ("after_eval", 6, 0.6), ("save", 6), ("eval", 7), ("after_eval", 7, 0.7),
                      ("save", 7), "finish"]
    assert state == {"step": 7, "tokens": 7 * TOKENS_PER_BATCH}
    assert engine.training and engine.forwards == engine.backwards == engine.steps == 7


def test_a_record_averages_every_micro_batch_of_its_window():
    """grad_accum 2, log_every 3: the first record is the mean of losses 1..6, the last one of 7 and 8."""
    loop, metrics = _loop(FakeEngine(itertools.count(1)), Schedule(max_steps=4, log_every=3), grad_accum=2)
    records = loop.run({"step": 0})
    assert [r["step"] for r in records] == [3, 4]
    assert records[0]["loss"] == pytest.approx(3.5) and records[1]["loss"] == pytest.approx(7.5)
    assert records[0]["lr"] == 1e-3 and records[0]["tokens_per_s"] > 0 and 0 <= records[0]["data_wait_fraction"] <= 1


def test_a_resumed_loop_continues_from_the_saved_step_and_token_count():
    engine = FakeEngine(itertools.count(1))
    evaluated = []
    loop, metrics = _loop(engine, Schedule(max_steps=7, log_every=1, eval_every=2),
                          evaluate=lambda step: evaluated.append(step) or {"score": 0.0})
    state = {"step": 5, "tokens": 100, "sampler": "kept"}
    loop.run(state)
    assert engine.steps == 2 and metrics.steps("train") == [6, 7] and evaluated == [6, 7]
    assert state == {"step": 7, "tokens": 100 + 2 * TOKENS_PER_BATCH, "sampler": "kept"}
    engine = FakeEngine(itertools.count(1))
    assert _loop(engine, Schedule(max_steps=7))[0].run({"step": 7}) == [] and engine.forwards == 0


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_a_stop_signal_ends_the_loop_after_its_step_with_a_record_and_on_stop(action):
    """SIGTERM during step 2: the ranks learn of it with the next step's check, so step 3 is the last;
    its record is written although log_every is 10, on_stop gets the cause, and neither evaluation
    nor save runs after it."""
    before = signal.getsignal(signal.SIGTERM)
    engine = FakeEngine(itertools.count(1), on_forward=lambda n: n == 4 and os.kill(os.getpid(), signal.SIGTERM))
    stops, others = [], []
    loop, metrics = _loop(engine, Schedule(max_steps=9, log_every=10, eval_every=1, save_every=1), grad_accum=2,
                          guard=NonFiniteGuard(action=action), preempt_grace=30.0,
                          evaluate=lambda step: others.append(("eval", step)) or {},
                          save=lambda step: others.append(("save", step)),
                          on_stop=lambda step, cause: stops.append((step, cause)))
    state = {"step": 0}
    records = loop.run(state)
    assert stops == [(3, "SIGTERM")] and state["step"] == 3 and engine.steps == 6
    assert [r["step"] for r in records] == [3] and records[0]["loss"] == pytest.approx(3.5)  # mean of losses 1..6
    assert others == [("eval", 1), ("save", 1), ("eval", 2), ("save", 2)]
    assert signal.getsignal(signal.SIGTERM) == before  # the loop's handlers are gone


def test_without_a_grace_period_the_loop_leaves_the_signal_handlers_alone():
    """A job that cannot resume keeps the usual effect of SIGTERM (the process ends)."""
    seen = []
    engine = FakeEngine(itertools.count(1), on_forward=lambda n: seen.append(signal.getsignal(signal.SIGTERM)))
    _loop(engine, Schedule(max_steps=2))[0].run({"step": 0})
    assert seen == [signal.getsignal(signal.SIGTERM)] * 2


def test_a_nan_loss_stops_the_loop_before_its_optimizer_step_and_any_save():
    saved = []
    engine = FakeEngine([1.0, 2.0, float("nan"), 4.0])
    loop, _ = _loop(engine, Schedule(max_steps=4, save_every=1), save=saved.append)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        loop.run({"step": 0})
    assert saved == [1, 2] and engine.steps == 2


def test_a_loop_counts_what_its_count_says_and_logs_every_number_of_an_evaluation(caplog):
    """An image job counts images (here: rows) instead of real tokens; the evaluation's log line shows
    its floats (rounded) and integers, not its per-block lists."""

    class RowCountingLoop(TrainingLoop):
        def count(self, batch):
            return len(batch["input_ids"])

    logger = logging.getLogger("test_loop.job")
    loop = RowCountingLoop(FakeEngine(itertools.count(1)), _batches(), Schedule(max_steps=3, log_every=3,
                                                                                  eval_every=3),
                           grad_accum=1, metrics=FakeMetrics(), guard=NonFiniteGuard(), logger=logger,
                           evaluate=lambda step: {"top1": 0.512345, "images": 9, "per_block": [0.1, 0.2]})
    state = {"step": 0}
    with caplog.at_level(logging.INFO, logger=logger.name):
        records = loop.run(state)
    assert state["tokens"] == 3 * 2 and records[0]["tokens"] == 3 * 2  # 2 rows a batch, not 6 real tokens
    assert "step 3: {'top1': 0.5123, 'images': 9}" in caplog.text
