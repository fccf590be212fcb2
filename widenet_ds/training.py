"""Pieces every training job (pretraining, GLUE fine-tuning) shares: model-config overrides from
the command line, the run record written into the output folder, and the metrics of a log window."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError, WideNetConfig
from .guards import NonFiniteGuard
from .ds_config import RunConfig
from .metrics_log import is_main_process

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Output fields averaged over a log window, when the model's output has them.
_WINDOW_FIELDS = ("loss", "mlm_loss", "sop_loss", "task_loss", "aux_loss", "expert_counts", "dropped_fraction")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default, except where there is none (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default == [] or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def at_least(low: int):
    """argparse type: an integer >= ``low`` (e.g. ``at_least(1)`` for a number of steps)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a number > 0")
    return value


def add_output_arguments(group, resumable: bool) -> None:
    """``--overwrite_output_dir`` and, for a job that can be pre-empted and resumed, ``--preempt_grace``."""
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="start again in an output_dir that holds an earlier run: deletes that run's checkpoints "
                            "and records first (without it such a folder is refused"
                            + (", and --resume auto continues the run there)" if resumable else ")"))
    if resumable:
        from .preemption import DEFAULT_GRACE_S

        group.add_argument("--preempt_grace", type=positive_float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                           help="on SIGTERM or SIGUSR1 (a scheduler's warning before it kills the job) finish the "
                                "step, save a checkpoint and exit 0; exit 1 if that takes longer than this")


def add_launcher_arguments(group, default_config: str) -> None:
    """``--deepspeed_config``, ``--local_rank`` (appended by the deepspeed launcher) and ``--deepspeed``
    (DeepSpeed's examples pass it; the JSON is always used). DeepSpeed's ``add_config_arguments`` is
    not used: it adds the deprecated ``--deepscale*`` options too."""
    group.add_argument("--deepspeed_config", metavar="JSON", default=None,
                       help=f"the DeepSpeed JSON: engine, batch, optimizer, scheduler and the moe block "
                            f"(default: {default_config})")
    group.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def compile_variant(text: str) -> str:
    """argparse type of ``--compile``: 'none' or 'scope[:setting...]' (``compile_settings``)."""
    from .modeling import compile_settings

    try:
        compile_settings(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_compile_argument(group, padding: str) -> None:
    """``--compile SCOPE[:SETTING...]``: ``torch.compile`` the model (widenet_ds.modeling.compile_model);
    ``padding`` says how the job pads a compiled model's batches."""
    group.add_argument("--compile", default="none", type=compile_variant, metavar="SCOPE[:SETTING...]",
                       help="torch.compile the model: 'model' (one graph; on a GPU the fastest, see "
                            "benchmarks/README.md), 'blocks', 'parts' or 'none'; settings after the scope: a "
                            "torch.compile mode, e.g. 'model:reduce-overhead' (CUDA graphs: the least host time "
                            f"per step), and/or Inductor options name[=value]. {padding}. The first steps compile "
                            "(about a minute); parameter and checkpoint names do not change")


def check_cuda_graphs(variant: str, run: RunConfig) -> None:
    """Refuse, before any compute, CUDA graphs with gradients kept across the micro-batches of a step.

    A CUDA-graph replay writes its outputs, gradients included, into the memory of the previous
    replay. Where the engine keeps a micro-batch's gradients in ``param.grad`` until the next one
    adds to them, the next replay has overwritten them (torch raises "accessing tensor output of
    CUDAGraphs that has been overwritten", seen on an H200 with the bf16 optimizer's default). With
    one micro-batch per step, or with DeepSpeed's bf16 optimizer moving each gradient into its fp32
    buffer as it is made (``immediate_grad_update``), nothing is kept."""
    from .modeling import uses_cuda_graphs

    if run.grad_accum == 1 or not uses_cuda_graphs(variant):
        return
    bf16 = run.deepspeed.get("bf16", {})
    moves_each_gradient = (bf16.get("enabled", False) and bf16.get("immediate_grad_update", False)
                           and run.zero_stage <= 1
                           and run.deepspeed.get("data_types", {}).get("grad_accum_dtype") == "fp32")
    if not moves_each_gradient:
        raise ConfigError("--compile", [
            f"{variant!r} records CUDA graphs, whose replays overwrite the gradients this engine keeps between the "
            f"{run.grad_accum} micro-batches of a step: in {run.path} use \"bf16\": {{\"enabled\": true, "
            "\"immediate_grad_update\": true}, \"data_types\": {\"grad_accum_dtype\": \"fp32\"} and ZeRO stage 0 "
            "or 1 (as ds_configs/pretrain_1gpu.json), or one micro-batch per step, or --compile without CUDA graphs "
            "(e.g. 'model')"])


def compile_if_asked(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    if variant != "none":
        from .modeling import compile_model

        compile_model(model, variant)
        log.info("compiled the model (%s): the first steps are slow", variant)
    return model


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["num_experts=8", "pre_layer_norm=false"]`` -> typed values (JSON syntax, else a string)."""
    out, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--override {item!r}: expected FIELD=VALUE")
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if problems:
        raise ConfigError("command line", problems)
    return out


def git_hash() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_record(output_dir: Path, config: WideNetConfig, run: RunConfig, args: argparse.Namespace,
                     job: str) -> None:
    """The resolved model config, DeepSpeed config, the job's name and the git hash, in output_dir (rank 0)."""
    if not is_main_process():
        return
    config.to_json_file(output_dir / "model_config.json", use_diff=False)
    (output_dir / "ds_config.json").write_text(json.dumps(run.to_dict(), indent=2))
    record = {"job": job, "git": git_hash(), "args": {k: v for k, v in vars(args).items() if k != "deepspeed"},
              "world_size": run.world_size, "precision": run.precision, "zero_stage": run.zero_stage,
              "optimizer": run.optimizer["type"],
              "lamb_trust_ratio": "per parameter tensor (widenet_ds.optim.Lamb)"
              if run.optimizer["type"] == "Lamb" else None}
    (output_dir / "run.json").write_text(json.dumps(record, indent=2))


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class MetricWindow:
    """Losses and routing statistics summed since the last log line (kept on the device: no sync per step).

    With ``flop_config`` (pretraining) it also counts model FLOPs (``widenet_ds.flops.pretraining_flops``) and
    records ``model_tflop_per_s_per_gpu``, averaged over the ranks."""

    def __init__(self, flop_config: WideNetConfig | None = None):
        self.flop_config = flop_config
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
            from .flops import pretraining_flops

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
        record.update(lr=lr, tokens_per_s=self.tokens * world / max(elapsed, 1e-9),
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


def profile_steps(text: str) -> tuple[int, int]:
    """argparse type of ``--profile``: 'FIRST:LAST' (optimizer steps, both included) or one step 'N'."""
    first, _, last = text.partition(":")
    try:
        steps = int(first), int(last or first)
    except ValueError:
        steps = (0, 0)
    if not 1 <= steps[0] <= steps[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: optimizer steps FIRST:LAST with 1 <= FIRST <= LAST, e.g. 41:43")
    return steps


def add_profile_argument(group) -> None:
    group.add_argument("--profile", type=profile_steps, metavar="FIRST:LAST",
                       help="torch.profiler over these optimizer steps: a Chrome/Perfetto trace and tables of the "
                            "busiest operators (host and GPU) per rank in output_dir/profile/; pick steps after the "
                            "first ones (compilation, CUDA-graph recording)")


def check_profile_steps(steps: tuple[int, int] | None, max_steps: int) -> None:
    """Refuse, before any compute, a profile range the run never reaches."""
    if steps is not None and steps[1] > max_steps:
        raise ConfigError("command line", [f"--profile {steps[0]}:{steps[1]} ends after the run's last step "
                                           f"({max_steps}); profile steps within it"])


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
