"""WideNet's router: the gate of the MoE layer.

``g(x) = TopK(softmax(f(x) + eps))``, eps ~ N(0, std^2) in training (std 1/E by default),
per-expert capacity ``max(ceil(C * K * S / E), min_capacity)``, and the Switch
load-balance loss ``E * sum_e m_e * P_e``. Shapes: the legend in ``widenet_ds.modeling``.

``top_k_route`` routes S tokens: capacity is filled in priority order (every token's first
choice before any second choice, token order within a choice; GShard / DeepSpeed top-2), with
no host synchronisation, so a compiled model stays one graph. ``WideNetGate`` adds the router's
weight and noise and plugs into DeepSpeed's ``MOELayer`` (it subclasses DeepSpeed's ``TopKGate``).
Unlike DeepSpeed's gate it adds Gaussian logit noise, and it is deterministic in eval mode
(DeepSpeed's top-2 samples the second expert with Gumbel noise even there).
"""

from __future__ import annotations

import math

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .deepspeed_moe import TopKGate, all_reduce_max, gumbel_rsample, is_parallel, multiplicative_jitter


class Routing(NamedTuple):
    """One routing call's result. A tuple in this order, the one DeepSpeed's ``MOELayer`` unpacks from
    a sparse-route gate. Dropped routes have index -1, location 0 and gate 0."""

    l_aux: Tensor  # load-balance loss (scalar, differentiable)
    capacity: int | Tensor  # C, slots per expert: a host int when known there, else a device scalar
    num_experts: int  # E
    indices_KS: Tensor  # int32 expert of each route (-1: dropped or padding)
    locations_KS: Tensor  # int32 slot of each kept route within its expert (0 .. kept_e - 1)
    gates_KS: Tensor  # fp32 combine weight of each route (0 when dropped)
    counts_2E: Tensor  # int64: row 0 the routes each expert received, row 1 the routes it kept


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """Tokens one expert keeps: ``max(ceil(C * K * S / E), min_capacity)`` (DeepSpeed's rule)."""
    # Rounding before the ceiling keeps float noise (e.g. 5.999999) from costing a slot.
    capacity = math.ceil(round(num_tokens * k * capacity_factor / num_experts, 6))
    return max(capacity, min_capacity)


def load_balance_loss(probs_SE: Tensor, routed_SE: Tensor, k: int) -> Tensor:
    """Switch loss ``E * sum_e m_e * P_e``: m_e the share of routes sent to e, P_e its mean probability."""
    num_experts = probs_SE.shape[1]
    mean_prob_E = probs_SE.mean(0)
    route_share_E = routed_SE.float().mean(0) / k
    return num_experts * (mean_prob_E * route_share_E).sum()


def top_k_choices(scores_SE: Tensor, k: int) -> Tensor:
    """The k highest-scoring experts of each token, best first, as an (S, k) int64 tensor.

    ``torch.topk``'s indices, by k rounds of argmax (ties: the lower expert first): one fused
    kernel under torch.compile, where ``topk`` is a selection kernel plus a sort.
    """
    choices = []
    for _ in range(k):
        choice_S = scores_SE.argmax(-1)
        choices.append(choice_S)
        scores_SE = scores_SE.masked_fill(F.one_hot(choice_S, scores_SE.shape[-1]).bool(), -math.inf)
    return torch.stack(choices, dim=-1)


def router_logits(x_SH: Tensor, weight_EH: Tensor) -> Tensor:
    """fp32 router logits ``x @ w^T``.

    Compiled, as a multiply and a sum over H: Inductor fuses the products into reductions over
    the bf16 activations as they are (forward one kernel, backward a reduction and a pointwise
    kernel), where an fp32 matmul with E output columns is memory-bound cuBLAS calls on an fp32
    copy of the activations, kept for the backward (benchmarks/reports/router_h200_202611.md).
    Both compute fp32 products of the same values; sums may differ in order. (A compiler without
    Inductor's fusion would make the (S, E, H) products.)
    """
    if torch.compiler.is_compiling():
        return (x_SH.float()[:, None, :] * weight_EH.float()[None, :, :]).sum(-1)
    return F.linear(x_SH.float(), weight_EH.float())


def top_k_route(logits_SE: Tensor, k: int, capacity: int | None, token_mask_S: Tensor | None = None,
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

    Nothing here reads a device value on the host: the capacity comes back as a Python int when
    it is known there (``capacity`` given, no expert-parallel group), so ``int(C)`` in ``MOELayer``
    does not wait for the GPU, and padding is masked (no boolean indexing, no ``.any()``). The
    choices come from ``top_k_choices`` (ties go to the lower expert). A route's slot is the
    number of earlier routes to its expert, from one flat int32 scan over a bool (E, R) matrix,
    and an expert keeps ``min(routes, capacity)`` routes, so the kept counts need no second pass.
    tests/reference_router.py is the same routing written plainly; the tests hold the two equal.
    """
    probs_SE = F.softmax(logits_SE, dim=-1)
    num_tokens, num_experts = probs_SE.shape
    choice_SK = top_k_choices(probs_SE if select_SE is None else select_SE, k)
    gates_KS = probs_SE.gather(1, choice_SK).t()
    choice_KS = choice_SK.t().contiguous()
    choice_R = choice_KS.view(-1)  # routes R = K*S in priority order: every first choice, then every second
    used_S = None if token_mask_S is None else token_mask_S.reshape(-1).bool()
    onehot_ER = choice_R[None, :] == torch.arange(num_experts, device=logits_SE.device)[:, None]
    if used_S is not None:
        onehot_ER &= used_S.repeat(k)[None, :]
    routed_E = onehot_ER.sum(1)  # int64, as DeepSpeed's counts
    # A route's slot is the number of earlier routes to its expert: one scan of the flat expert-major
    # matrix (a single-pass device scan, where a scan down the route axis of an (R, E) matrix is a slow
    # outer-dimension scan) minus the routes of the lower experts.
    filled_ER = onehot_ER.view(-1).cumsum(0, dtype=torch.int32).view_as(onehot_ER)
    lower_E = (routed_E.cumsum(0) - routed_E).to(torch.int32)
    location_R = filled_ER.gather(0, choice_R[None, :]).squeeze(0) - lower_E[choice_R] - 1
    location_KS = location_R.view(k, num_tokens)
    l_aux = _masked_load_balance_loss(probs_SE, routed_E, k, used_S)

    limit = capacity  # None: every route is kept
    if is_parallel(ep_group):  # the group agrees on the largest capacity (a device value)
        limit = routed_E.max() if capacity is None else torch.tensor(capacity, device=logits_SE.device)
        all_reduce_max(limit, ep_group)
    capacity_out = routed_E.max() if limit is None else limit
    kept_KS = torch.ones_like(location_KS, dtype=torch.bool) if limit is None else location_KS < limit
    if used_S is not None:
        kept_KS &= used_S[None, :]
    gates_KS = gates_KS * kept_KS
    if normalize:
        gates_KS = gates_KS / gates_KS.sum(0, keepdim=True).clamp(min=torch.finfo(gates_KS.dtype).eps)
    indices_KS = torch.where(kept_KS, choice_KS, -1).to(torch.int32)
    locations_KS = torch.where(kept_KS, location_KS, 0)
    kept_E = routed_E if limit is None else routed_E.clamp(max=limit)
    counts_2E = torch.stack([routed_E, kept_E]).detach()
    return Routing(l_aux, capacity_out, num_experts, indices_KS, locations_KS, gates_KS, counts_2E)


def _masked_load_balance_loss(probs_SE: Tensor, routed_E: Tensor, k: int, used_S: Tensor | None) -> Tensor:
    """``load_balance_loss`` over the real tokens, by masking (0 when there are none)."""
    num_tokens, num_experts = probs_SE.shape
    if used_S is None:
        count = max(num_tokens, 1)
        mean_prob_E = probs_SE.sum(0) / count
    else:
        count = used_S.sum().clamp(min=1).float()
        mean_prob_E = (probs_SE * used_S[:, None]).sum(0) / count
    route_share_E = routed_E.float() / (count * k)
    return num_experts * (mean_prob_E * route_share_E).sum()


class WideNetGate(TopKGate):
    """Top-k router with the paper's Gaussian logit noise, as the gate of DeepSpeed's ``MOELayer``.

    Args:
        model_dim: hidden size H of the tokens routed.
        num_experts: experts E (global, across the expert-parallel group).
        k: routes per token.
        capacity_factor: C in training.
        eval_capacity_factor: C in eval mode.
        min_capacity: lower bound of the per-expert capacity.
        drop_tokens: False keeps every route (capacity = the busiest expert's load).
        noise: 'gaussian' (eps added to logits), 'jitter' (DeepSpeed's multiplicative input
            jitter), 'rsample' (Gumbel-sampled top-1 choice) or 'none'. Training only.
        noise_std: std of the Gaussian noise.
        normalize: rescale each token's kept gates to sum 1.
    """

    def __init__(self, model_dim: int, num_experts: int, k: int, capacity_factor: float,
                 eval_capacity_factor: float, min_capacity: int, drop_tokens: bool,
                 noise: str = "gaussian", noise_std: float = 0.0, normalize: bool = False) -> None:
        super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                         noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False)
        self.noise = noise
        self.noise_std = noise_std
        self.normalize = normalize
        # (this rank's token count, the largest in the expert-parallel group), agreed once per
        # forward by the encoder (agree_token_count); spares every routing call an all-reduce
        self.group_tokens: tuple[int, int] | None = None

    def agree_token_count(self, num_tokens: int, device: torch.device) -> None:
        """With expert parallelism and token dropping, the ranks must use one capacity: the one of
        the largest token count in the group. One all-reduce and one host read, for every routing
        call of the forward that follows with this many tokens (instead of one per call)."""
        if not (self.drop_tokens and is_parallel(self.ep_group)):
            self.group_tokens = None
            return
        count = torch.tensor(num_tokens, device=device)
        all_reduce_max(count, self.ep_group)
        self.group_tokens = (num_tokens, int(count.item()))

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for this many tokens in the current mode; None when not dropping."""
        if not self.drop_tokens:
            return None
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.wg.out_features, self.k, factor, self.min_capacity)

    def forward(self, input: Tensor, used_token: Tensor | None = None, sparse_routes: bool = True,
                use_tutel: bool = False) -> Routing:
        """Route the (S, H) tokens ``input``; ``used_token`` (S,) is 1 for real tokens. The last two
        arguments are those ``MOELayer`` passes; only its sparse-route path is served."""
        assert sparse_routes and not use_tutel, "WideNetGate serves MOELayer's sparse-route path only"
        x_SH = input
        noisy = self.training and self.noise != "none"
        if noisy and self.noise == "jitter":
            x_SH = multiplicative_jitter(x_SH.float(), device=x_SH.device)
        logits_SE = router_logits(x_SH, self.wg.weight)
        select_SE = None
        if noisy and self.noise == "gaussian" and self.noise_std > 0:
            logits_SE = logits_SE + torch.randn_like(logits_SE) * self.noise_std
        elif noisy and self.noise == "rsample":
            select_SE = logits_SE + gumbel_rsample(logits_SE.shape, device=logits_SE.device)
        num_tokens, ep_group = x_SH.shape[0], self.ep_group
        if self.drop_tokens and self.group_tokens and self.group_tokens[0] == num_tokens:
            num_tokens, ep_group = self.group_tokens[1], None  # the group's capacity, agreed already
        return top_k_route(logits_SE, self.k, self.capacity(num_tokens), used_token, self.normalize, select_SE,
                           ep_group)
