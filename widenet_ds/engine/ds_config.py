"""Reading and checking a DeepSpeed JSON from ``ds_configs/`` before any compute.

The JSON is the home of the engine settings (precision, ZeRO, optimizer, scheduler,
batch, clipping) and of WideNet's ``moe`` block. DeepSpeed silently ignores keys it does
not know, so a typo would quietly change a run: unknown keys are refused here, with the
closest known key as a hint. Every problem is reported at once.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, MoESettings

# DeepSpeed's top-level keys (deepspeed 0.19 docs and runtime/config.py), plus our "moe".
DEEPSPEED_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16 amp
torch_autocast zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer gradient_clipping
prescale_gradients gradient_predivide_factor gradient_allreduce_op sparse_gradients steps_per_print
wall_clock_breakdown dump_state memory_breakdown activation_checkpointing flops_profiler tensorboard csv_monitor
wandb comet comms_logger autotuning elasticity checkpoint data_types communication_data_type
seq_parallel_communication_data_type dataloader_drop_last aio compression_training data_efficiency
curriculum_learning compile disable_allgather disable_python_gc log_level use_data_before_expert_parallelism
managed_gradient_accumulation pipeline sparse_attention timers nebula hybrid_engine monitor_config
""".split())
PROJECT_KEYS = frozenset({"moe", "nonfinite_loss", "augmentation"})  # augmentation: read by the image job
NONFINITE_ACTIONS = ("stop", "skip")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
OPTIMIZERS = ("AdamW", "Lamb")


@dataclass
class RunConfig:
    """A checked DeepSpeed JSON: what goes to ``deepspeed.initialize`` and what WideNet uses itself."""

    path: str  # where it was read from
    deepspeed: dict[str, Any]  # the engine config (resolved batch keys, no optimizer, no moe block)
    optimizer: dict[str, Any]  # {"type": "AdamW" | "Lamb", "params": {...}}: built by the project
    moe: MoESettings  # the MoE's run-time settings
    nonfinite_loss: dict[str, Any]  # {"action": "stop" | "skip", "max_consecutive": N}: a NaN/inf loss
    micro_batch_size: int  # sequences per rank per forward
    grad_accum: int  # forwards per optimizer step
    world_size: int  # ranks the batch keys were resolved for
    notes: list[str] = field(default_factory=list)  # settings that run but likely not as meant: the jobs warn

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def precision(self) -> str:
        for name in ("bf16", "fp16"):
            if self.deepspeed.get(name, {}).get("enabled", False):
                return name
        return "fp32"

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    def to_dict(self) -> dict[str, Any]:
        """The JSON in effect (engine + optimizer + moe), as written into output dirs and checkpoints."""
        return {**self.deepspeed, "optimizer": self.optimizer, "moe": self.moe.to_dict(),
                "nonfinite_loss": self.nonfinite_loss}


def load_run_config(path: str | Path, world_size: int = 1, cuda: bool = False,
                    max_steps: int | None = None) -> RunConfig:
    """Read and check a DeepSpeed JSON for a run on ``world_size`` ranks.

    ``"auto"`` in the scheduler's ``total_num_steps`` becomes ``max_steps``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("DeepSpeed config", [f"{path}: no such file (see ds_configs/ for examples)"])
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("DeepSpeed config", [f"{path}: not valid JSON ({err})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError("DeepSpeed config", [f"{path}: the top level must be a JSON object"])
    return check_run_config(raw, str(path), world_size, cuda, max_steps)


def check_run_config(raw: dict[str, Any], source: str, world_size: int = 1, cuda: bool = False,
                     max_steps: int | None = None) -> RunConfig:
    """Check a parsed DeepSpeed JSON; see ``load_run_config``."""
    problems: list[str] = []
    for key in raw:
        if key not in DEEPSPEED_KEYS | PROJECT_KEYS:
            hint = difflib.get_close_matches(key, sorted(DEEPSPEED_KEYS | PROJECT_KEYS), n=1)
            problems.append(f"unknown key '{key}' (DeepSpeed would silently ignore it)"
                            + (f"; did you mean '{hint[0]}'?" if hint else ""))
    engine = {k: copy.deepcopy(v) for k, v in raw.items() if k not in PROJECT_KEYS | {"optimizer"}}
    moe, moe_problems = MoESettings._parse(raw.get("moe"), "moe")
    problems += moe_problems
    micro, accum = _resolve_batch(engine, world_size, problems)
    optimizer = _check_optimizer(raw.get("optimizer"), engine, problems)
    _check_precision_and_zero(engine, cuda, problems)
    _check_parallel(moe, world_size, problems)
    notes = moe.warnings("moe")
    _resolve_scheduler(engine, max_steps, problems, notes)
    # DeepSpeed's throughput timer (on by default) synchronises the device when a forward starts and
    # when a step ends, twice per micro-batch: the GPU idles while the host queues the next work (seen in
    # the pretraining job's profile on an H200). The jobs measure their own throughput; a config that
    # sets "timers" keeps its own.
    engine.setdefault("timers", {"throughput": {"enabled": False}})
    nonfinite = _check_nonfinite(raw.get("nonfinite_loss", {}), problems)
    if problems:
        raise ConfigError(f"DeepSpeed config {source}", problems)
    return RunConfig(source, engine, optimizer, moe, nonfinite, micro, accum, world_size, notes)


def _check_nonfinite(block: Any, problems: list[str]) -> dict[str, Any]:
    """What a NaN/inf loss does: stop the run (default) or skip the batch, at most N in a row."""
    settings = {"action": "stop", "max_consecutive": 5, **(block if isinstance(block, dict) else {})}
    unknown = sorted(set(settings) - {"action", "max_consecutive"})
    if not isinstance(block, dict) or unknown:
        problems.append(f"nonfinite_loss must be {{\"action\": \"stop\" | \"skip\", \"max_consecutive\": N}}, "
                        f"got {block!r}")
    elif settings["action"] not in NONFINITE_ACTIONS or not _positive_int(settings["max_consecutive"]):
        problems.append(f"nonfinite_loss: action must be one of {NONFINITE_ACTIONS} and max_consecutive a "
                        f"positive integer, got {block!r}")
    return settings


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _resolve_batch(engine: dict[str, Any], world: int, problems: list[str]) -> tuple[int, int]:
    """Fill in the third batch key from the two given (DeepSpeed's rule: global = micro * accum * world)."""
    given = {k: engine[k] for k in BATCH_KEYS if k in engine}
    bad = [k for k, v in given.items() if not _positive_int(v)]
    problems += [f"{k} must be a positive integer, got {given[k]!r}" for k in bad]
    if bad:
        return 1, 1
    if len(given) != 2:
        problems.append(f"give exactly two of {', '.join(BATCH_KEYS)} (got {', '.join(given) or 'none'}); "
                        "the third follows from them and the number of ranks")
        return 1, 1
    total, micro, accum = (given.get(k) for k in BATCH_KEYS)
    if total is None:
        total = micro * accum * world
    elif micro is None:
        if total % (accum * world):
            problems.append(f"train_batch_size {total} is not divisible by gradient_accumulation_steps {accum} "
                            f"x {world} rank(s)")
        micro = max(total // (accum * world), 1)
    else:
        if total % (micro * world):
            problems.append(f"train_batch_size {total} is not divisible by train_micro_batch_size_per_gpu "
                            f"{micro} x {world} rank(s)")
        accum = max(total // (micro * world), 1)
    engine.update(train_batch_size=micro * accum * world, train_micro_batch_size_per_gpu=micro,
                  gradient_accumulation_steps=accum)
    return micro, accum


def _check_optimizer(block: Any, engine: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    if not isinstance(block, dict) or block.get("type") not in OPTIMIZERS:
        problems.append(f"optimizer must be {{\"type\": one of {OPTIMIZERS}, \"params\": {{...}}}}, got {block!r}")
        return {}
    params = block.get("params", {})
    if not isinstance(params, dict):
        problems.append(f"optimizer.params must be a JSON object, got {params!r}")
        return {}
    unknown = sorted(set(params) - {"lr", "betas", "eps", "weight_decay"})
    if unknown:
        problems.append(f"optimizer.params: unknown key(s) {unknown} (known: lr, betas, eps, weight_decay)")
    problems += _optimizer_value_problems(params)
    zero = engine.get("zero_optimization", {}).get("stage", 0)
    if block["type"] == "Lamb" and zero > 0 and not engine.get("zero_allow_untested_optimizer", False):
        problems.append("optimizer Lamb under ZeRO needs \"zero_allow_untested_optimizer\": true (DeepSpeed's "
                        "switch for optimizers it does not ship; the project's Lamb keeps a trust ratio per "
                        "tensor on ZeRO partitions)")
    return {"type": block["type"], "params": dict(params)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optimizer_value_problems(params: dict[str, Any]) -> list[str]:
    """Values no optimizer trains with: a learning rate that is not a positive number, betas outside [0, 1)."""
    problems = []
    if "lr" in params and not (_number(params["lr"]) and params["lr"] > 0):
        problems.append(f"optimizer.params.lr must be a number > 0, got {params['lr']!r}")
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
        problems.append(f"optimizer.params.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")
    if "eps" in params and not (_number(params["eps"]) and params["eps"] > 0):
        problems.append(f"optimizer.params.eps must be a number > 0, got {params['eps']!r}")
    if "weight_decay" in params and not (_number(params["weight_decay"]) and params["weight_decay"] >= 0):
        problems.append(f"optimizer.params.weight_decay must be a number >= 0, got {params['weight_decay']!r}")
    return problems


def _check_precision_and_zero(engine: dict[str, Any], cuda: bool, problems: list[str]) -> None:
    fp16 = engine.get("fp16", {}).get("enabled", False)
    if fp16 and engine.get("bf16", {}).get("enabled", False):
        problems.append("fp16 and bf16 are both enabled: pick one")
    if fp16 and not cuda:
        problems.append("fp16 needs a GPU (DeepSpeed refuses it on CPU): use bf16 or fp32 here")
    zero = engine.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0, 1 or 2, got {stage!r}")
    if stage == 3:
        problems.append("zero_optimization.stage 3 does not support DeepSpeed's MoE layer: use stage 0, 1 or 2")
    if stage == 2:
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero.get(key, True) is not True:
                problems.append(f"zero_optimization.{key} must be true with MoE at stage 2")


def _check_parallel(moe: MoESettings, world: int, problems: list[str]) -> None:
    if isinstance(moe.ep_size, int) and moe.ep_size >= 1 and world % moe.ep_size:
        problems.append(f"moe.ep_size {moe.ep_size} does not divide the {world} rank(s) of this run")


def _resolve_scheduler(engine: dict[str, Any], max_steps: int | None, problems: list[str], notes: list[str]) -> None:
    """Fill ``"auto"`` steps with ``max_steps``; refuse a schedule that ends before the run or never warms up.

    A decaying schedule (WarmupDecayLR, WarmupCosineLR) that ends before ``max_steps`` would run the
    remaining steps at its final learning rate (0 by default): training that silently stops learning."""
    params = engine.get("scheduler", {}).get("params", {})
    if params.get("total_num_steps") == "auto":
        if max_steps is None:
            problems.append("scheduler.params.total_num_steps is \"auto\" but no --max_steps was given")
            return
        params["total_num_steps"] = max_steps
    for key in ("warmup_min_lr", "warmup_max_lr", "cos_min_ratio"):
        if key in params and not (_number(params[key]) and params[key] >= 0):
            problems.append(f"scheduler.params.{key} must be a number >= 0, got {params[key]!r}")
    total = params.get("total_num_steps")
    if total is None:
        return
    if not (isinstance(total, int) and not isinstance(total, bool) and total > 0):
        problems.append(f"scheduler.params.total_num_steps must be a positive integer or \"auto\", got {total!r}")
        return
    if max_steps and total < max_steps:
        problems.append(f"scheduler.params.total_num_steps is {total} but the run has {max_steps} steps: the "
                        f"learning rate would reach its end value at step {total} and stay there for the remaining "
                        f"{max_steps - total}; set total_num_steps to \"auto\" (the run's length) or to at least "
                        f"{max_steps}")
    warmup = params.get("warmup_num_steps", 0)
    if _number(warmup) and warmup > total:
        notes.append(f"scheduler.params.warmup_num_steps {warmup} is more than the run's {total} steps: the "
                     "learning rate never reaches warmup_max_lr")
