"""Pieces every training job (pretraining, GLUE fine-tuning) shares: model-config overrides from
the command line, the run record written into the output folder, and the metrics of a log window."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import WideNetConfig
from ..engine.guards import NonFiniteGuard

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


def train_step(engine, batches, grad_accum: int, window: MetricWindow, guard: NonFiniteGuard, step: int,
               stop_requested: bool = False) -> bool:
    """One optimizer step: ``grad_accum`` forward/backward passes (DeepSpeed steps at the boundary).

    A NaN/inf loss on any rank stops the run before the optimizer step, or its batch is skipped before
    backward (``guard``; stopping reads the losses once per step, skipping once per micro-batch).
    Returns whether any rank was asked to stop (``stop_requested``: a pre-emption signal), agreed by
    every rank at this step."""
    done, losses, stop = 0, [], False
    while done < grad_accum:
        start = time.perf_counter()
        batch = next(batches)
        window.data_wait += time.perf_counter() - start
        tokens = int(batch["attention_mask"].sum())  # counted on the host, before the copy: no GPU sync
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
