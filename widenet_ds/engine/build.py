"""The DeepSpeed engine around a WideNet model: optimizer parameter groups (MoE-aware),
the optimizer named in the JSON, and ``deepspeed.initialize``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .ds_config import RunConfig

NO_DECAY = ("bias", "LayerNorm", "_norm", "final_norm")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay / no-decay groups (no decay on biases and LayerNorms), split by DeepSpeed into
    expert and non-expert groups so expert gradients reduce over the expert data-parallel group."""
    from ..modeling.deepspeed_moe import split_moe_param_groups

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(tag in name for tag in NO_DECAY) else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_moe_param_groups(groups)


def build_optimizer(model: nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW (PyTorch's; fused on GPU) or LAMB (``widenet_ds.engine.optim.Lamb``: trust ratio per parameter
    tensor, also on the flat buffers and partitions of DeepSpeed's bf16 and ZeRO optimizers)."""
    params = dict(spec.get("params", {}))
    groups = param_groups(model, params.pop("weight_decay", 0.01))
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    if spec["type"] == "Lamb":
        from .optim import Lamb

        return Lamb(groups, **params)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **params)


def initialize_engine(model: nn.Module, run: RunConfig):
    """``deepspeed.initialize`` with our optimizer; returns (engine, optimizer, lr_scheduler).

    DeepSpeed creates the expert-parallel groups for every MoE layer here (ep_size from the
    model, which was built with the JSON's ``moe.ep_size``). DeepSpeed's bf16 optimizer gets
    multi-tensor gradient norm and clipping (``widenet_ds.engine.grad_norm``), and its checkpoint engine
    reads every file through ``widenet_ds.safe_io.load_pt`` (``torch.load(weights_only=False)`` in
    DeepSpeed would run code planted in a checkpoint)."""
    import deepspeed

    from .grad_norm import use_foreach_grad_norm

    use_foreach_grad_norm()
    optimizer = build_optimizer(model, run.optimizer)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=run.deepspeed)
    read_checkpoints_safely(engine)
    return engine, optimizer, scheduler


def read_checkpoints_safely(engine) -> None:
    """Route every read of DeepSpeed's checkpoint engine (model, expert, optimizer files) through the
    safe loader. DeepSpeed makes all its checkpoint reads through ``engine.checkpoint_engine.load``."""
    from ..safe_io import load_pt

    def load(path, map_location=None):
        return load_pt(path, map_location=map_location)

    engine.checkpoint_engine.load = load
