"""``torch.compile`` for a job: compile the model as ``--compile`` asks, and refuse, before any compute,
settings whose CUDA graphs would overwrite gradients the engine keeps between micro-batches."""

from __future__ import annotations

import logging

import torch

from ..config import ConfigError
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
    from ..modeling import uses_cuda_graphs

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
        from ..modeling import compile_model

        compile_model(model, variant)
        log.info("compiled the model (%s): the first steps are slow", variant)
    return model
