"""Every DeepSpeed MoE internal this package relies on, in one place.

WideNet's MoE lives inside DeepSpeed's own module tree, because DeepSpeed's engine finds MoE
layers by type (``MoE``), keeps expert parameters out of the data-parallel all-reduce by their
tags (``allreduce``, ``group_name``), and saves each expert to its own checkpoint file by its
parameter name (``...deepspeed_experts.<local index>...``). The tree, from ``MoEFeedForward``::

    moe                      deepspeed.moe.layer.MoE          (registers the expert-parallel group)
    moe.deepspeed_moe        MOELayer subclass (moe.py)       (gate, experts, ep_group, all-to-all)
    moe.deepspeed_moe.gate   TopKGate subclass (gate.py)      (the router's weight ``wg``)
    moe.deepspeed_moe.experts.deepspeed_experts.<i>           Experts subclass (experts.py)

The engine's expert-parallel plumbing (the rank layout of the groups, the optimizer's expert
parameter groups) comes from here too. Nothing else in ``widenet_ds`` imports ``deepspeed.moe``; tests/test_deepspeed_adapter.py checks
each name, signature and behaviour used here, so a DeepSpeed upgrade that changes one fails there
with a message naming it.
"""

from __future__ import annotations

import re

from deepspeed import comm as dist
from deepspeed.comm import pg_utils
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, TopKGate, _AllToAll, gumbel_rsample, multiplicative_jitter
from deepspeed.moe.utils import is_moe_param_group, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import Tensor, nn

__all__ = [
    "EXPERTS_ATTR", "EXPERT_FILE_GLOB", "EXPERT_KEY", "MOE_EXPERTS_PATH", "Experts", "MOELayer", "MoE", "TopKGate",
    "all_reduce_max", "all_to_all", "build_moe", "exchange_counts", "expert_module_prefix",
    "expert_parallel_rank_groups", "gumbel_rsample", "is_expert_key", "is_parallel", "multiplicative_jitter",
    "param_group_process_group", "split_moe_param_groups", "tensor_parallel_active",
]

# DeepSpeed's name of the expert ModuleList (``Experts.deepspeed_experts``): in every expert
# parameter's name, and so in every checkpoint key and expert checkpoint file of the MoE.
EXPERTS_ATTR = "deepspeed_experts"
# The experts' path from a ``MoEFeedForward``: ``MoE.deepspeed_moe`` -> ``MOELayer.experts`` -> the list.
MOE_EXPERTS_PATH = f"moe.deepspeed_moe.experts.{EXPERTS_ATTR}"
# A state-dict key of one expert's parameter: (prefix up to the list, local index, rest of the name).
EXPERT_KEY = re.compile(rf"(.*\.{EXPERTS_ATTR}\.)(\d+)(\..*)")
# DeepSpeed's expert checkpoint files in a tag folder (``_get_expert_ckpt_name``, model-parallel rank 0).
EXPERT_FILE_GLOB = "layer_*_expert_*_mp_rank_00_model_states.pt"


def is_expert_key(key: str) -> bool:
    """Whether a parameter / state-dict key belongs to an expert (DeepSpeed saves those apart)."""
    return f"{EXPERTS_ATTR}." in key


def expert_module_prefix(moe_ffn_name: str, expert: int) -> str:
    """The state-dict prefix of expert ``expert`` of the ``MoEFeedForward`` named ``moe_ffn_name``."""
    return f"{moe_ffn_name}.{MOE_EXPERTS_PATH}.{expert}."


def build_moe(hidden_size: int, expert: nn.Module, num_experts: int, ep_size: int, k: int, capacity_factor: float,
              eval_capacity_factor: float, min_capacity: int, drop_tokens: bool) -> MoE:
    """DeepSpeed's ``MoE`` container: its expert-parallel group name (``ep_size_<P>``) and ``ep_size``,
    and the registration ``deepspeed.initialize`` looks for. The caller replaces its ``deepspeed_moe``
    layer (gate and experts) with its own; the random draws made here (the expert ``expert`` copied,
    DeepSpeed's gate weight) are part of a seeded model's initial weights."""
    return MoE(hidden_size, expert, num_experts=num_experts, ep_size=ep_size, k=k, min_capacity=min_capacity,
               capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
               drop_tokens=drop_tokens, use_rts=False, use_tutel=False, top2_2nd_expert_sampling=False)


def is_parallel(group) -> bool:
    """Whether ``group`` is an expert-parallel group of more than one rank."""
    return pg_utils.is_parallel(group)


def all_reduce_max(value: Tensor, group) -> None:
    """In place: the largest ``value`` across ``group``."""
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)


def all_to_all(group, x: Tensor) -> Tensor:
    """DeepSpeed's differentiable all-to-all (``_AllToAll``): rank r's block g goes to rank g's
    block r along the first dimension; the backward is the same exchange of the gradients."""
    return _AllToAll.apply(group, x)


def exchange_counts(counts: Tensor, group) -> Tensor:
    """A non-differentiable all-to-all of a small integer tensor (one block per rank)."""
    out = counts.new_empty(counts.shape)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def tensor_parallel_active() -> bool:
    """Whether a tensor-parallel ``mpu`` is registered with DeepSpeed (its MOELayer then handles the
    duplicated tokens; this package's forward does not)."""
    return groups.mpu is not None


def expert_parallel_rank_groups(world_size: int, ep_size: int, data_before_expert: bool) -> list[list[int]]:
    """The expert-parallel groups' ranks, as ``deepspeed.initialize`` will lay them out (no model
    parallelism; ``data_before_expert``: the JSON's ``use_data_before_expert_parallelism``)."""
    expert_groups, _ = groups._get_expert_parallel_ranks(world_size, 1, ep_size,
                                                         use_data_before_expert_parallel_=data_before_expert)
    return expert_groups


def split_moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with the expert parameters split off into their own groups (by
    their ``group_name`` tag), so their gradients reduce over the expert data-parallel group."""
    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def param_group_process_group(param_group: dict):
    """The process group over which DeepSpeed partitions an optimizer parameter group: the expert
    data-parallel group for an expert group, the data-parallel group otherwise."""
    if is_moe_param_group(param_group):
        return groups._get_expert_data_parallel_group(param_group["name"])
    return groups._get_data_parallel_group()
