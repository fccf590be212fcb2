"""Mapping expert weights between the full layout (all E experts, ep_size 1) and one
expert-parallel rank's local layout (E / ep_size experts, renumbered from 0).

DeepSpeed names expert parameters ``...deepspeed_experts.<local index>.<name>``
(``EXPERT_KEY``, from the one module that knows DeepSpeed's names); rank r of an ep_size-P
group holds global experts ``r * E/P ... (r + 1) * E/P - 1``.
"""

from __future__ import annotations

from torch import Tensor

from ..modeling.deepspeed_moe import EXPERT_KEY, expert_parallel_rank_groups, is_expert_key

__all__ = ["EXPERT_KEY", "expert_parallel_rank", "is_expert_key", "local_expert_range", "to_global_experts",
           "to_local_experts"]


def local_expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global indices of the experts that expert-parallel rank ``ep_rank`` holds."""
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def to_local_experts(state_dict: dict[str, Tensor], num_experts: int, ep_size: int,
                     ep_rank: int) -> dict[str, Tensor]:
    """From a full state dict, keep this rank's experts under their local indices."""
    wanted = local_expert_range(num_experts, ep_size, ep_rank)
    out = {}
    for key, value in state_dict.items():
        match = EXPERT_KEY.fullmatch(key)
        if match is None:
            out[key] = value
        elif int(match[2]) in wanted:
            out[f"{match[1]}{int(match[2]) - wanted.start}{match[3]}"] = value
    return out


def to_global_experts(state_dict: dict[str, Tensor], num_experts: int, ep_size: int,
                      ep_rank: int) -> dict[str, Tensor]:
    """Rename this rank's local expert keys to their global indices (the inverse of to_local_experts)."""
    first = local_expert_range(num_experts, ep_size, ep_rank).start
    out = {}
    for key, value in state_dict.items():
        match = EXPERT_KEY.fullmatch(key)
        out[key if match is None else f"{match[1]}{int(match[2]) + first}{match[3]}"] = value
    return out


def expert_parallel_rank(rank: int, world_size: int, ep_size: int, data_before_expert: bool = False) -> int:
    """This rank's index in its expert-parallel group, as ``deepspeed.initialize`` will lay the groups
    out (``data_before_expert``: the JSON's ``use_data_before_expert_parallelism``). Known before
    the engine exists, so full weights can be sliced before DeepSpeed copies them into the optimizer."""
    groups = expert_parallel_rank_groups(world_size, ep_size, data_before_expert)
    return next(group.index(rank) for group in groups if rank in group)
