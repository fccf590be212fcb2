"""The router written plainly, as the check of the package's ``top_k_route``.

``reference_top_k_route`` routes with ``torch.topk``, boolean indexing and an int64 one-hot scan
down the routes: easy to read against the GShard / DeepSpeed top-k rules, but it reads device
values on the host (it cannot run on the meta device or inside one compiled graph). The package
router (widenet_ds/modeling/gate.py) must give the same indices, locations, capacities and counts
exactly, and the same gates and load-balance loss up to float rounding (tests/test_reference_router.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from widenet_ds.modeling.deepspeed_moe import all_reduce_max, is_parallel
from widenet_ds.modeling.gate import Routing, load_balance_loss


def reference_top_k_route(logits_SE: Tensor, k: int, capacity: int | None, token_mask_S: Tensor | None = None,
                           normalize: bool = False, select_SE: Tensor | None = None, ep_group=None) -> Routing:
    """Route S tokens to their top-k experts under a per-expert capacity.

    Args:
        logits_SE: router logits (noise already added), fp32.
        k: routes per token.
        capacity: tokens an expert keeps; None keeps every route (no dropping).
        token_mask_S: 1 for real tokens, 0 for padding (never routed, not in the loss).
        normalize: rescale each token's kept gates to sum 1.
        select_SE: scores that pick the experts, if not the probabilities (Gumbel sampling).
        ep_group: expert-parallel group; capacities are made equal across it.

    Capacity is filled in priority order: every token's first choice before any second
    choice, and in token order within a choice (GShard / DeepSpeed top-2).

    Returns a ``Routing``; dropped routes have index -1 and gate 0.
    """
    probs_SE = F.softmax(logits_SE, dim=-1)
    num_tokens, num_experts = probs_SE.shape
    choice_SK = torch.topk(probs_SE if select_SE is None else select_SE, k, dim=-1).indices
    gates_SK = probs_SE.gather(1, choice_SK)
    used_S = torch.ones(num_tokens, dtype=torch.bool, device=logits_SE.device)
    if token_mask_S is not None:
        used_S = token_mask_S.reshape(-1).bool()
    onehot_KSE = F.one_hot(choice_SK.t(), num_experts) * used_S[None, :, None]
    routed_E = onehot_KSE.sum((0, 1))

    used_probs_SE = probs_SE[used_S] if token_mask_S is not None else probs_SE
    l_aux = load_balance_loss(used_probs_SE, onehot_KSE.sum(0)[used_S], k) if used_S.any() else probs_SE.sum() * 0

    capacity_t = routed_E.max() if capacity is None else torch.tensor(capacity, device=logits_SE.device)
    if is_parallel(ep_group):
        all_reduce_max(capacity_t, ep_group)

    position_KSE = onehot_KSE.reshape(-1, num_experts).cumsum(0).reshape_as(onehot_KSE) - 1
    location_KS = (position_KSE * onehot_KSE).sum(-1)
    kept_KS = used_S[None, :] & (location_KS < capacity_t)
    gates_KS = gates_SK.t() * kept_KS
    if normalize:
        gates_KS = gates_KS / gates_KS.sum(0, keepdim=True).clamp(min=torch.finfo(gates_KS.dtype).eps)
    indices_KS = torch.where(kept_KS, choice_SK.t(), -1).to(torch.int32)
    locations_KS = (location_KS * kept_KS).to(torch.int32)
    kept_E = (onehot_KSE * kept_KS[..., None]).sum((0, 1))
    counts_2E = torch.stack([routed_E, kept_E]).detach()
    return Routing(l_aux, capacity_t, num_experts, indices_KS, locations_KS, gates_KS, counts_2E)
