"""Command-line pieces the jobs share: the help formatter, argument types and the option groups for
output folders, the DeepSpeed launcher, ``--compile``, ``--profile`` and ``--override``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import ConfigError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default, except where there is none (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        no_default = action.default is None or action.default is False or action.default == []  # 0 is shown
        if no_default or "%(default)" in (action.help or ""):
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
    from ..engine.compile import compile_settings

    try:
        compile_settings(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text



def add_compile_argument(group, padding: str) -> None:
    """``--compile SCOPE[:SETTING...]``: ``torch.compile`` the model (widenet_ds.engine.compile.compile_model);
    ``padding`` says how the job pads a compiled model's batches."""
    group.add_argument("--compile", default="none", type=compile_variant, metavar="SCOPE[:SETTING...]",
                       help="torch.compile the model: 'model' (one graph; on a GPU the fastest, see "
                            "benchmarks/README.md), 'blocks', 'parts' or 'none'; settings after the scope: a "
                            "torch.compile mode, e.g. 'model:reduce-overhead' (CUDA graphs: the least host time "
                            f"per step), and/or Inductor options name[=value]. {padding}. The first steps compile "
                            "(about a minute); parameter and checkpoint names do not change")



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
                            "first ones (compilation, CUDA-graph recording) (default: none, no profile)")



def check_profile_steps(steps: tuple[int, int] | None, max_steps: int) -> None:
    """Refuse, before any compute, a profile range the run never reaches."""
    if steps is not None and steps[1] > max_steps:
        raise ConfigError("command line", [f"--profile {steps[0]}:{steps[1]} ends after the run's last step "
                                           f"({max_steps}); profile steps within it"])
