"""The MoE feed-forward layer: route, dispatch, run the experts, combine.

``MoEFeedForward`` is what a block calls. Inside it, one routing call per forward (gate.py)
gives every token's experts, slots and gates; ``GatherMOELayer.forward`` then, top to bottom:

1. packs the routes into expert slots or packed rows (packing.py),
2. gathers the tokens into them (dispatch.py) and, with expert parallelism, exchanges the slots
   between the ranks (an all-to-all),
3. runs the experts (experts.py): batched over the capacity slots, or grouped over the packed rows,
4. exchanges the outputs back and combines each token's expert outputs weighted by its gates.

``moe.impl`` picks how (same parameters, same function): 'batched' (batched experts over all
E*C slots), 'grouped' (grouped matmuls over the kept routes; with expert parallelism over the
filled slots each rank received) or 'deepspeed' (DeepSpeed's own ``MOELayer.forward`` and loop
over the experts: the reference the tests compare with). The module tree, parameter names and
checkpoint files stay DeepSpeed's (deepspeed_moe.py). Shapes: the legend in ``widenet_ds.modeling``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import MoESettings, WideNetConfig
from .deepspeed_moe import MOELayer, build_moe, tensor_parallel_active
from .dispatch import _Combine, _Dispatch, exchange, exchange_kept_counts
from .experts import BatchedExperts, grouped_mm_is_fast
from .gate import WideNetGate
from .packing import packed_slots, received_packing, route_maps, slot_maps

log = logging.getLogger(__name__)


@dataclass
class RoutingStats:
    """What one routing call reports (one call per block that runs the MoE)."""

    l_aux: Tensor  # load-balance loss of this call (scalar, differentiable)
    expert_counts: Tensor  # (E,) routes each expert received, before capacity
    dropped_fraction: Tensor  # share of routes dropped by the capacity limit (scalar)


class GatherMOELayer(MOELayer):
    """DeepSpeed's ``MOELayer`` (gate, experts, expert-parallel group) with gather-only dispatch and
    combine, and the experts batched or grouped (``impl``). DeepSpeed's own forward runs for
    ``impl`` 'deepspeed' and for what this forward does not cover: Tutel, tensor-parallel experts
    (a registered ``mpu``) and DeepSpeed's wall-clock timers.

    ``grouped_anywhere``: the grouped experts run only where ``grouped_mm_is_fast`` (elsewhere the
    batched experts run, with one warning). Setting this class attribute to True runs them wherever
    'grouped' is asked, e.g. for a benchmark's fp32 parity check on a GPU."""

    grouped_anywhere = False

    def __init__(self, gate: WideNetGate, experts: BatchedExperts, ep_group_name: str, ep_size: int,
                 num_local_experts: int, impl: str = "batched", fused_act: bool = True):
        super().__init__(gate, experts, ep_group_name, ep_size, num_local_experts, use_tutel=False)
        self.fused_act = fused_act  # the grouped experts' first bias + activation as one kernel
        self.grouped_fallback_warned = False
        self.impl = impl

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        self._impl = impl
        self.experts.batched = impl != "deepspeed"  # DeepSpeed's loop over the experts in its forward

    def forward(self, *input: Tensor, **kwargs) -> Tensor:
        if self.impl == "deepspeed" or self.use_tutel or tensor_parallel_active() or self.wall_clock_breakdown:
            return super().forward(*input, **kwargs)
        x = input[0]
        x_SH = x.reshape(-1, x.shape[-1])
        routing = self.gate(x_SH, input[1], True, False)
        self.l_aux, self.exp_counts = routing.l_aux, routing.counts_2E
        capacity = int(routing.capacity)  # a host int when the gate knows it there: no wait on the GPU
        if self.impl == "grouped" and self.ep_size == 1 and self._grouped_fits(x_SH):
            return self._grouped_local(x_SH, routing, capacity).reshape(x.shape)
        slot_KS, source_X, gate_X = route_maps(routing.indices_KS, routing.locations_KS, routing.gates_KS,
                                               routing.num_experts, capacity)
        slots_XH = exchange(self.ep_group, _Dispatch.apply(x_SH, slot_KS, source_X), self.ep_size)
        if self.impl == "grouped" and self.ep_size > 1 and self._grouped_fits(x_SH):
            out_XH = self._grouped_received(slots_XH, capacity)
        else:
            out = self.experts(slots_XH.view(self.ep_size, self.num_local_experts, -1, x_SH.shape[1]))
            out_XH = out.reshape(routing.num_experts * capacity, x_SH.shape[1])
        out_XH = exchange(self.ep_group, out_XH, self.ep_size)
        return _Combine.apply(out_XH, routing.gates_KS, slot_KS, source_X, gate_X).reshape(x.shape)

    def _grouped_local(self, x_SH: Tensor, routing, capacity: int) -> Tensor:
        """ep_size 1: the tokens packed straight into the experts' row groups, through the grouped
        experts, and combined back."""
        slot_KS, end_E, expert_X, X = packed_slots(routing.indices_KS, routing.locations_KS, routing.counts_2E[1],
                                                   capacity)
        source_X, gate_X = slot_maps(slot_KS, routing.gates_KS, X)
        rows_XH = _Dispatch.apply(x_SH, slot_KS, source_X)
        out_XH = self.experts.forward_grouped(rows_XH, end_E, expert_X, self.fused_act)
        return _Combine.apply(out_XH, routing.gates_KS, slot_KS, source_X, gate_X)

    def _grouped_received(self, slots_XH: Tensor, capacity: int) -> Tensor:
        """The local experts over the filled slots received from every rank ((G*L*C, H) in, same out;
        empty slots come back zero): the ranks swap their kept counts per expert, then the filled
        slots are packed, run as grouped matmuls and unpacked."""
        counts_GL = exchange_kept_counts(self.exp_counts[1], self.ep_group).view(self.ep_size, self.num_local_experts)
        source_Q, packed_X, end_L, expert_Q, _ = received_packing(counts_GL, capacity)
        # Packing and unpacking are one-to-one moves of rows: dispatches with one route per row (K = 1).
        rows_QH = _Dispatch.apply(slots_XH, packed_X[None], source_Q)
        out_QH = self.experts.forward_grouped(rows_QH, end_L, expert_Q, self.fused_act)
        return _Dispatch.apply(out_QH, source_Q[None], packed_X)

    def _grouped_fits(self, x: Tensor) -> bool:
        """``grouped_mm_is_fast`` for these tokens (or ``grouped_anywhere``); warns once when the layer
        falls back to the batched experts."""
        capability = None
        if x.device.type == "cuda":  # get_device_properties: a constant to torch.compile, no graph break
            properties = torch.cuda.get_device_properties(x.device)
            capability = (properties.major, properties.minor)
        if self.grouped_anywhere or grouped_mm_is_fast(x.device.type, x.dtype, capability):
            return True
        if not self.grouped_fallback_warned:
            self.grouped_fallback_warned = True
            _warn_grouped_fallback(x)
        return False


@torch.compiler.disable
def _warn_grouped_fallback(x: Tensor) -> None:
    log.warning("moe.impl 'grouped' needs bf16 on a compute capability 9.x/10.x GPU to be fast (got %s on %s); "
                "running the 'batched' experts instead", x.dtype,
                torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else x.device)


class MoEFeedForward(nn.Module):
    """WideNet's MoE in place of a block's FFN: ``config.num_experts`` copies of ``expert`` (a dense
    FFN; every expert starts from its weights), routed by ``WideNetGate``.

    Run-time settings (``MoESettings``: capacity, token dropping, ``impl``, ``fused_act``) can change
    after the build (``apply_settings``); ``ep_size`` cannot."""

    def __init__(self, config: WideNetConfig, settings: MoESettings, expert: nn.Module):
        super().__init__()
        self.moe = build_moe(config.hidden_size, expert, config.num_experts, settings.ep_size, config.top_k,
                             settings.capacity_factor, settings.eval_capacity_factor, settings.min_capacity,
                             settings.drop_tokens)
        gate = WideNetGate(
            config.hidden_size, config.num_experts, config.top_k, settings.capacity_factor,
            settings.eval_capacity_factor, settings.min_capacity, settings.drop_tokens,
            noise=config.router_noise, noise_std=config.noise_std, normalize=config.router_normalize_top_k)
        experts = BatchedExperts(expert, self.moe.num_local_experts, self.moe.expert_group_name)
        self.moe.deepspeed_moe = GatherMOELayer(gate, experts, self.moe.expert_group_name, self.moe.ep_size,
                                                self.moe.num_local_experts, settings.impl, settings.fused_act)

    @property
    def layer(self) -> GatherMOELayer:
        return self.moe.deepspeed_moe

    @property
    def gate(self) -> WideNetGate:
        return self.layer.gate

    @property
    def experts(self) -> BatchedExperts:
        return self.layer.experts

    def apply_settings(self, settings: MoESettings) -> None:
        """Change capacity, dropping, impl and the fused kernel at run time (ep_size is fixed at build time)."""
        assert settings.ep_size == self.moe.ep_size, "ep_size is fixed when the model is built"
        for name in ("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens"):
            setattr(self.gate, name, getattr(settings, name))
        self.layer.impl = settings.impl
        self.layer.fused_act = settings.fused_act

    def forward(self, x_BTH: Tensor, token_mask_BT: Tensor | None) -> tuple[Tensor, RoutingStats]:
        used_S = None if token_mask_BT is None else token_mask_BT.reshape(-1)
        y_BTH, l_aux, counts_2E = self.moe(x_BTH, used_S)
        routed, kept = counts_2E[0], counts_2E[1]
        dropped = 1.0 - kept.sum().float() / routed.sum().clamp(min=1).float()
        return y_BTH, RoutingStats(l_aux, routed, dropped)
