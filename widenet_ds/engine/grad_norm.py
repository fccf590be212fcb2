"""Multi-tensor gradient norm and clipping for DeepSpeed's bf16 optimizer.

DeepSpeed's ``BF16_Optimizer`` (bf16 under ZeRO 1-2, e.g. with fp32 gradient accumulation, as
``ds_configs/pretrain_1gpu.json``) computes the global gradient norm one tensor at a time
(``deepspeed.runtime.utils.get_global_norm_of_tensors``: a norm kernel per tensor) and clips one
tensor at a time (``clip_tensors_by_global_norm``: a multiply per tensor). On a GPU every one is
a kernel launch from Python, and the clipping comes after the step's host synchronisation, with
the GPU idle until the last launch: widenet-base-e4 has 91 parameter tensors (per-block
LayerNorms, experts), ALBERT 32. ``use_foreach_grad_norm`` swaps both for versions built on
``torch._foreach_norm`` / ``torch._foreach_mul_`` (a few multi-tensor kernels), with DeepSpeed's
reductions over model- and expert-parallel groups left as they are. Same values up to float
rounding (tests/test_engine.py).
"""

from __future__ import annotations

import torch

_DEEPSPEED: dict = {}  # DeepSpeed's own functions, once replaced


def global_norm_of_tensors(input_tensors, norm_type=2, mpu=None, moe_ep_group=None):
    """``get_global_norm_of_tensors`` with the local 2-norm from one multi-tensor kernel.

    The local norm goes to DeepSpeed's function as a one-element tensor, whose norm is itself:
    DeepSpeed then sums its square over the model- and expert-parallel groups exactly as before.
    Other norms and empty lists go to DeepSpeed's function unchanged."""
    deepspeed_norm = _DEEPSPEED["get_global_norm_of_tensors"]
    if float(norm_type) != 2.0 or len(input_tensors) == 0:
        return deepspeed_norm(input_tensors, norm_type=norm_type, mpu=mpu, moe_ep_group=moe_ep_group)
    tensors = [t.detach() if t.dtype == torch.float32 else t.detach().float() for t in input_tensors]
    local = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2.0)))
    return deepspeed_norm([local.reshape(1)], norm_type=2, mpu=mpu, moe_ep_group=moe_ep_group)


def clip_tensors_by_global_norm(input_tensors, max_norm=1.0, global_norm=None, mpu=None, eps=1e-6):
    """``clip_tensors_by_global_norm`` with one multi-tensor multiply; returns the global norm."""
    if global_norm is None:
        global_norm = global_norm_of_tensors(input_tensors, mpu=mpu)
    clip_coef = max_norm / (global_norm + eps)
    if clip_coef < 1:
        torch._foreach_mul_([t.detach() for t in input_tensors], clip_coef)
    return global_norm


def use_foreach_grad_norm() -> None:
    """Install both in DeepSpeed's modules (once; process-wide): its bf16 optimizer and the MoE
    norm helper (``get_norm_with_moe_layers``) look them up there."""
    if _DEEPSPEED:
        return
    from deepspeed.runtime import bf16_optimizer
    from deepspeed.runtime import utils as ds_utils

    _DEEPSPEED["get_global_norm_of_tensors"] = ds_utils.get_global_norm_of_tensors
    for module in (ds_utils, bf16_optimizer):
        module.get_global_norm_of_tensors = global_norm_of_tensors
    bf16_optimizer.clip_tensors_by_global_norm = clip_tensors_by_global_norm
