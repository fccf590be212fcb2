"""The training loop every job shares, and its parts.

``TrainingLoop`` runs optimizer steps to the end of a ``Schedule`` and does, around each step,
what every job needs: the metrics window and its records, the non-finite loss guard, the
profiler, the progress bar, the evaluation and checkpoint cadence, a clean stop on a
pre-emption signal, and a restart from a resumed step. A job supplies only what differs: its
batches, its evaluation, its checkpoint and its reaction to a stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from ..config import WideNetConfig
from ..distributed import is_main_process
from ..engine.guards import NonFiniteGuard
from .console import library_logs_above_bar
from .preemption import StopSignals

log = logging.getLogger(__name__)

# Output fields averaged over a log window, when the model's output has them.
_WINDOW_FIELDS = ("loss", "mlm_loss", "sop_loss", "task_loss", "aux_loss", "expert_counts", "dropped_fraction")


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class MetricWindow:
    """Losses and routing statistics summed since the last log line (kept on the device: no sync per step).

    With ``flop_config`` (pretraining) it also counts model FLOPs (``widenet_ds.modeling.flops.pretraining_flops``) and
    records ``model_tflop_per_s_per_gpu``, averaged over the ranks. ``tokens`` in a record: the real tokens
    seen so far on all ranks, from ``tokens_seen`` (those before a resume) on."""

    def __init__(self, flop_config: WideNetConfig | None = None, tokens_seen: int = 0):
        self.flop_config = flop_config
        self.tokens_seen = tokens_seen
        self.reset()

    def reset(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.tokens = 0
        self.data_wait = 0.0  # seconds the loop waited for its next batch
        self.flops = 0.0  # a device tensor once an MoE's kept routes are added
        self.start = time.perf_counter()

    def add(self, out, tokens: int, batch: dict[str, torch.Tensor] | None = None) -> None:
        for key in _WINDOW_FIELDS:
            value = getattr(out, key, None)
            if value is not None:
                value = value.detach().float()
                # a copy: the output may be a buffer the next step overwrites (CUDA graphs)
                self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1
        self.tokens += tokens
        if self.flop_config is not None and batch is not None:
            from ..modeling.flops import pretraining_flops

            self.flops = self.flops + pretraining_flops(self.flop_config, batch, out, tokens)

    def record(self, step: int, lr: float, world: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        record: dict[str, Any] = {"step": step}
        for key, value in self.sums.items():
            mean = mean_over_ranks(value / self.count)
            if key == "expert_counts":
                record["expert_load"] = (mean / mean.sum(-1, keepdim=True)).tolist()  # (T, E) shares
            else:
                record[key] = mean.tolist()
        self.tokens_seen += self.tokens * world
        record.update(lr=lr, tokens=self.tokens_seen, tokens_per_s=self.tokens * world / max(elapsed, 1e-9),
                      data_wait_fraction=self.data_wait / max(elapsed, 1e-9))
        if self.flop_config is not None and self.count:
            device = self.sums["loss"].device  # NCCL reduces device tensors only
            flops = mean_over_ranks(torch.as_tensor(self.flops, dtype=torch.float64, device=device)).item()
            record["model_tflop_per_s_per_gpu"] = flops / max(elapsed, 1e-9) / 1e12
        return record


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The real (unpadded) tokens of a micro-batch, counted on the host before the copy: no GPU sync."""
    return int(batch["attention_mask"].sum())


def train_step(engine, batches, grad_accum: int, window: MetricWindow, guard: NonFiniteGuard, step: int,
               stop_requested: bool = False, count: Callable[[dict[str, torch.Tensor]], int] = real_tokens) -> bool:
    """One optimizer step: ``grad_accum`` forward/backward passes (DeepSpeed steps at the boundary).

    A NaN/inf loss on any rank stops the run before the optimizer step, or its batch is skipped before
    backward (``guard``; stopping reads the losses once per step, skipping once per micro-batch).
    ``count(batch)`` is what a micro-batch adds to the window's ``tokens`` (its real tokens; an image
    job counts images). Returns whether any rank was asked to stop (``stop_requested``: a pre-emption
    signal), agreed by every rank at this step."""
    done, losses, stop = 0, [], False
    while done < grad_accum:
        start = time.perf_counter()
        batch = next(batches)
        window.data_wait += time.perf_counter() - start
        tokens = count(batch)
        out = engine(**{k: v.to(engine.device, non_blocking=True) for k, v in batch.items()})
        if guard.checks_each_batch and guard.should_skip(out.loss, step):
            continue
        engine.backward(out.loss)
        if not guard.checks_each_batch:
            losses.append(out.loss.detach().clone())  # a copy: the next CUDA-graph replay overwrites out.loss
            if done == grad_accum - 1:
                stop = guard.check_step(losses, step, stop_requested)
        engine.step()
        window.add(out, tokens, batch)
        done += 1
    return guard.any_rank(stop_requested, engine.device) if guard.checks_each_batch else stop


class StepProfiler:
    """``torch.profiler`` around optimizer steps ``first..last``: ``begin(step)`` before a step,
    ``end(step)`` after it. Writes ``trace_rank<r>.json.gz`` (open in Perfetto or chrome://tracing) and
    ``ops_rank<r>.txt`` (operators by GPU time and by host time, and the wall time of the steps) into
    ``directory``. Inactive without steps or outside them."""

    def __init__(self, steps: tuple[int, int] | None, directory: Path):
        self.steps = steps
        self.directory = Path(directory)
        self.profiler = None
        self.start = 0.0

    def begin(self, step: int) -> None:
        if self.steps is None or step != self.steps[0]:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities, record_shapes=True)
        self.profiler.__enter__()
        self.start = time.perf_counter()

    def end(self, step: int) -> None:
        if self.profiler is None or step != self.steps[1]:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.start
        self.profiler.__exit__(None, None, None)
        self.write(self.profiler, wall)
        self.profiler = None

    def write(self, prof, wall: float) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.directory.mkdir(parents=True, exist_ok=True)
        count = self.steps[1] - self.steps[0] + 1
        averages = prof.key_averages()
        by_gpu = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        text = [f"optimizer steps {self.steps[0]}..{self.steps[1]} ({count}): {wall * 1e3:.1f} ms wall, "
                f"{wall * 1e3 / count:.1f} ms per step\n",
                f"by {by_gpu}:", averages.table(sort_by=by_gpu, row_limit=60, max_name_column_width=90),
                "by self_cpu_time_total:", averages.table(sort_by="self_cpu_time_total", row_limit=40,
                                                          max_name_column_width=90)]
        (self.directory / f"ops_rank{rank}.txt").write_text("\n".join(text))
        prof.export_chrome_trace(str(self.directory / f"trace_rank{rank}.json.gz"))  # gzipped by its suffix
        log.info("profile of steps %d..%d written to %s", *self.steps, self.directory)


@dataclass(frozen=True)
class Schedule:
    """When the loop writes a metrics record, evaluates and saves; steps are optimizer steps from 1.

    An ``*_every`` of 0 means never. The last step always writes a record, and evaluates or saves
    where that ``*_every`` is set, so a run ends with its final numbers and weights. ``eval_at_end``
    evaluates at the last step even with ``eval_every`` 0 (fine-tuning keeps its best evaluation,
    so it needs at least one)."""

    max_steps: int
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    eval_at_end: bool = False

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def evaluates(self, step: int) -> bool:
        return self._due(self.eval_every, step) or (self.eval_at_end and step == self.max_steps)

    def saves(self, step: int) -> bool:
        return self._due(self.save_every, step)

    def _due(self, every: int, step: int) -> bool:
        return every > 0 and (step % every == 0 or step == self.max_steps)


class _NoStopSignals:
    """Stands in for ``StopSignals`` in a job that is not pre-empted cleanly: handlers stay as they are."""

    requested = False
    name = ""

    def __enter__(self) -> _NoStopSignals:
        return self

    def __exit__(self, *exc) -> None:
        return None


def _is_number(value: Any) -> bool:
    """A metric the evaluation log line shows (per-block lists stay in ``metrics.jsonl`` only)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Progress-bar fields: record key -> (label, format)
_BAR_FIELDS = {"loss": ("loss", "{:.3f}"), "lr": ("lr", "{:.2e}"), "tokens_per_s": ("tok_s", "{:.0f}")}


class TrainingLoop:
    """Optimizer steps from ``state["step"]`` to ``schedule.max_steps``, with everything around them.

    Each step runs ``grad_accum`` micro-batches from ``batches`` through ``train_step`` (the
    ``guard`` decides what a NaN/inf loss does) and counts it in ``state`` (``"step"``, and
    ``"tokens"``: this rank's real tokens, or what ``count`` counts), so a job's checkpoint saves the loop's position and a
    resumed job continues from it. Around the steps: ``profiler`` (``StepProfiler``), a progress
    bar on rank 0 (log lines, DeepSpeed's included, print above it: ``widenet_ds.jobs.console``),
    a ``metrics`` record of the ``window`` every ``schedule.log_every`` steps, and an evaluation
    and a checkpoint at the schedule's steps. With ``preempt_grace`` (seconds) a SIGTERM /
    SIGUSR1 ends the run cleanly at a step boundary that every rank agrees on (the flag travels
    with the guard's all-reduce): the step's record is written, ``on_stop`` is called and the
    loop returns; without it the signals keep their usual effect.

    Extension points, each a keyword argument (None: the loop skips it):

    - ``evaluate(step) -> dict[str, float]``: the job's evaluation; the loop writes it to
      ``metrics.jsonl`` (prefix ``eval``) and logs ``step N: {...}`` (its numbers, rounded) with
      the job's ``logger``, on a line of its own above the progress bar.
    - ``after_eval(step, metrics)``: what the job does with an evaluation (keep the best model,
      collect statistics), after it was recorded.
    - ``save(step)``: write a checkpoint at the schedule's save steps.
    - ``on_stop(step, cause)``: a stop signal ended the run after ``step`` (save, record why).
    - ``finish()``: after the last step, while stop signals are still handled (wait for a
      checkpoint written in the background).

    For more, subclass and override ``count`` (what a micro-batch adds to ``tokens``: an image
    job counts images), ``make_record`` (the fields of a metrics record) or ``run_step`` (what one
    optimizer step is). ``run`` returns the metrics records written.
    ``metrics`` is anything with ``write(record, prefix="train")`` (``MetricsWriter``). A job's
    ``fit`` is then a few lines (``widenet_ds.jobs.finetune.fit``)::

        schedule = Schedule(max_steps=1000, log_every=10, eval_every=200, eval_at_end=True)
        loop = TrainingLoop(engine, batches, schedule, grad_accum=run.grad_accum, metrics=writer,
                            guard=NonFiniteGuard(**run.nonfinite_loss), evaluate=lambda step: evaluate(job),
                            logger=log)
        records = loop.run({"step": 0})
    """

    def __init__(self, engine, batches: Iterator[dict[str, torch.Tensor]], schedule: Schedule, *, grad_accum: int,
                 metrics, guard: NonFiniteGuard, window: MetricWindow | None = None,
                 profiler: StepProfiler | None = None, description: str = "train",
                 bar_fields: tuple[str, ...] = ("loss", "lr"), preempt_grace: float | None = None,
                 evaluate: Callable[[int], dict[str, float]] | None = None,
                 after_eval: Callable[[int, dict[str, float]], None] | None = None,
                 save: Callable[[int], None] | None = None, on_stop: Callable[[int, str], None] | None = None,
                 finish: Callable[[], None] | None = None, logger: logging.Logger | None = None,
                 console: TextIO | None = None):
        self.engine, self.batches, self.schedule = engine, batches, schedule
        self.grad_accum, self.metrics, self.guard = grad_accum, metrics, guard
        self.window = window if window is not None else MetricWindow()
        self.profiler = profiler
        self.description, self.bar_fields, self.preempt_grace = description, bar_fields, preempt_grace
        self.evaluate, self.after_eval, self.save = evaluate, after_eval, save
        self.on_stop, self.finish = on_stop, finish
        self.log = logger or log
        self.console = console  # the progress bar's stream (default: stderr)

    def run(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Train until ``state["step"]`` reaches ``schedule.max_steps`` or a stop signal; returns the records."""
        from tqdm.auto import tqdm

        state.setdefault("step", 0)
        state.setdefault("tokens", 0)
        records: list[dict[str, Any]] = []
        bar = tqdm(total=self.schedule.max_steps, initial=state["step"], disable=not is_main_process(),
                   desc=self.description, file=self.console)
        self.engine.train()
        with self._stop_signals() as signals, library_logs_above_bar():
            while state["step"] < self.schedule.max_steps:
                step = state["step"] + 1
                tokens_before = self.window.tokens
                stop = self.run_step(step, signals.requested)
                state["step"] = step
                state["tokens"] += self.window.tokens - tokens_before  # this rank's real (unpadded) tokens
                bar.update(1)
                if self.schedule.logs(step) or stop:
                    records.append(self.write_record(step, bar))
                if stop:
                    if self.on_stop is not None:
                        self.on_stop(step, signals.name or "a stop signal on another rank")
                    break
                if self.evaluate is not None and self.schedule.evaluates(step):
                    self.run_evaluation(step)
                if self.save is not None and self.schedule.saves(step):
                    self.save(step)
            if self.finish is not None:
                self.finish()
        bar.close()
        return records

    def _stop_signals(self):
        return StopSignals(self.preempt_grace) if self.preempt_grace is not None else _NoStopSignals()

    def run_step(self, step: int, stop_requested: bool) -> bool:
        """One optimizer step (profiled when asked); returns whether any rank was asked to stop."""
        if self.profiler is not None:
            self.profiler.begin(step)
        stop = train_step(self.engine, self.batches, self.grad_accum, self.window, self.guard, step,
                          stop_requested=stop_requested, count=self.count)
        if self.profiler is not None:
            self.profiler.end(step)
        return stop

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What a micro-batch adds to the window's and the state's ``tokens``: its real tokens."""
        return real_tokens(batch)

    def make_record(self, step: int) -> dict[str, Any]:
        """The metrics record of the window that ends at ``step`` (means over the window and the ranks)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        return self.window.record(step, self.engine.get_lr()[0], world)

    def write_record(self, step: int, bar) -> dict[str, Any]:
        """Write the window's record to the metrics, show it on the bar, start a new window."""
        record = self.make_record(step)
        self.metrics.write(record)
        bar.set_postfix({label: form.format(record[key]) for key, (label, form) in _BAR_FIELDS.items()
                         if key in self.bar_fields and key in record})
        self.window.reset()
        return record

    def run_evaluation(self, step: int) -> dict[str, float]:
        """Evaluate, record the result in the metrics and the log, hand it to ``after_eval``."""
        result = self.evaluate(step)
        self.metrics.write({"step": step, **result}, prefix="eval")
        self.log.info("step %d: %s", step, {k: round(v, 4) for k, v in result.items() if _is_number(v)})
        if self.after_eval is not None:
            self.after_eval(step, result)
        return result
