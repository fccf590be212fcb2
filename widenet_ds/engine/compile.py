"""``torch.compile`` for a job: parse ``--compile``'s ``scope[:setting...]``, compile the model as it
asks, and refuse, before any compute, settings whose CUDA graphs would overwrite gradients the
engine keeps between micro-batches."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..modeling.experts import BatchedExperts
from ..modeling.layers import Attention, Block, Embeddings, FeedForward
from ..modeling.models import MLMHead
from ..modeling.moe import GatherMOELayer
from .ds_config import RunConfig

log = logging.getLogger(__name__)


def check_cuda_graphs(variant: str, run: RunConfig) -> None:
    """Refuse, before any compute, CUDA graphs with gradients kept across the micro-batches of a step.

    A CUDA-graph replay writes its outputs, gradients included, into the memory of the previous
    replay. Where the engine keeps a micro-batch's gradients in ``param.grad`` until the next one
    adds to them, the next replay has overwritten them (torch raises "accessing tensor output of
    CUDAGraphs that has been overwritten" under the bf16 optimizer's default). With
    one micro-batch per step, or with DeepSpeed's bf16 optimizer moving each gradient into its fp32
    buffer as it is made (``immediate_grad_update``), nothing is kept."""
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
        compile_model(model, variant)
        log.info("compiled the model (%s): the first steps are slow", variant)
    return model


COMPILE_SCOPES = ("model", "blocks", "parts")


def compile_settings(variant: str) -> tuple[str, dict[str, Any]]:
    """``'scope[:setting...]'`` -> ``(scope, torch.compile keywords)``; ``'none'`` -> ``('none', {})``.

    A setting is a ``torch.compile`` mode (``torch._inductor.list_mode_options()``, e.g.
    ``reduce-overhead``: CUDA graphs) or an Inductor option ``name[=value]`` (``torch._inductor.config``,
    e.g. ``combo_kernels``; a bare name means True). Examples: ``model``, ``model:reduce-overhead``,
    ``model:max-autotune-no-cudagraphs:combo_kernels``. Raises ``ValueError`` naming every unknown piece.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    scope, *settings = variant.split(":")
    if scope == "none" and not settings:
        return scope, {}
    problems = [] if scope in COMPILE_SCOPES else [f"scope {scope!r}: choose one of {', '.join(COMPILE_SCOPES)}"]
    modes, options = [], {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if setting in list_mode_options():
            modes.append(setting)
        elif _has_option(inductor_config, name):
            options[name] = _option_value(value)
        else:
            problems.append(f"{setting!r} is neither a torch.compile mode ({', '.join(list_mode_options())}) "
                            "nor an Inductor option (torch._inductor.config)")
    if len(modes) > 1:
        problems.append(f"one mode at most, got {', '.join(modes)}")
    if problems:
        raise ValueError(f"compile setting {variant!r}: " + "; ".join(problems))
    if not options:
        return scope, {"mode": modes[0]} if modes else {}
    # torch.compile takes a mode or options, not both: the mode's options, then the ones given
    return scope, {"options": {**(list_mode_options(modes[0]) if modes else {}), **options}}


def uses_cuda_graphs(variant: str) -> bool:
    """Whether a ``compile_settings`` variant records CUDA graphs (``reduce-overhead``, ``max-autotune``,
    ``triton.cudagraphs``)."""
    from torch._inductor import list_mode_options

    _, kwargs = compile_settings(variant)
    options = list_mode_options(kwargs["mode"]) if "mode" in kwargs else kwargs.get("options", {})
    return bool(options.get("triton.cudagraphs", False))


def _has_option(config, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    if not head or not hasattr(config, head):
        return False
    return not rest or _has_option(getattr(config, head), rest)


def _option_value(text: str) -> Any:
    """'' and 'True' -> True, 'False' -> False, integers and floats as numbers, else the text."""
    if text in ("", "True", "False"):
        return text != "False"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def compile_model(model: nn.Module, scope: str = "model", **options) -> nn.Module:
    """``torch.compile`` (with ``options``) a WideNet model or encoder in place; returns it.

    ``scope`` may carry settings (``'model:reduce-overhead'``, see ``compile_settings``); ``options``
    are further ``torch.compile`` keywords. Scopes, largest first (all keep parameter and state-dict names):

    - ``model``: ``model`` as one graph (forward and backward each one compiled region; the fewest
      host operations per step). With expert parallelism the graph breaks where the ranks agree
      on the capacity (a host value), once per MoE call; the all-to-alls compile.
    - ``blocks``: every ``Block`` call (LayerNorms, shared attention, MoE or FFN, residuals) as
      one graph; the embeddings and the MLM head on their own.
    - ``parts``: embeddings, attention, dense FFNs, the MLM head and the MoE layer separately;
      with expert parallelism the MoE layer stays eager and only its batched experts compile.

    Compiled router noise and dropout draw other random numbers than eager (same distributions).
    """
    if scope.split(":")[0] not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {scope!r}: choose one of {', '.join(COMPILE_SCOPES)}")
    scope, settings = compile_settings(scope)
    options = {**settings, **options}
    if scope == "model":
        model.compile(**options)
        return model
    kinds = (Block, Embeddings, MLMHead) if scope == "blocks" else (Embeddings, Attention, FeedForward,
                                                                     BatchedExperts, MLMHead)
    for module in model.modules():
        if isinstance(module, kinds) or scope == "parts" and isinstance(module, GatherMOELayer) \
                and module.ep_size == 1:
            module.compile(**options)
    return model
