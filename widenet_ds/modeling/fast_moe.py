"""The fast MoE path: DeepSpeed's ``Experts`` and ``MOELayer`` with faster compute, same state.

Both classes subclass DeepSpeed's and take over an existing instance's submodules, so parameter
names (``deepspeed_moe.experts.deepspeed_experts.<i>.ffn.weight``), expert-parallel tags and
groups, the all-to-all and DeepSpeed's expert checkpoint files stay DeepSpeed's. Each has a
switch back to DeepSpeed's own forward (the reference path); ``MoEFeedForward.use_impl`` sets it.

What is faster, and why (measured on an H200, bf16, 12 shared blocks, seq 512, batch 32):

- ``BatchedExperts``: one batched matmul per FFN layer over the local experts instead of a
  Python loop, with weight gradients produced in the weights' own layout (bmm's autograd would
  hand back transposed gradients, which cost a strided copy per expert per call).
- ``GatherMOELayer``: dispatch and combine are gathers in both directions. DeepSpeed's
  ``index_select`` dispatch has an atomic scatter-add backward in which every empty slot and
  every dropped route adds into one shared padding row (~0.3 ms per call).
- ``grouped``: the kept routes are packed expert after expert, each expert's group
  padded to a multiple of 16 rows, and the experts run as grouped matmuls
  (``torch._grouped_mm``) over the packed rows only, instead of over all E*C capacity slots
  (with C = 1.2 and an untrained router, ~1/3 of those slots are empty). At ep_size 1 the
  tokens are packed directly; with expert parallelism the all-to-all keeps DeepSpeed's fixed
  slot layout, and each rank packs the filled slots it received (the ranks exchange their kept
  counts per expert: one small all-to-all) and unpacks the results before the all-to-all back.
  Every grouped matmul gets row-major operands (``_GroupedLinear``); on a GPU the first bias and
  the activation are one Triton kernel each way (fused_act.py).

Shape suffixes: S tokens, M model width, E experts (global), L local experts, G expert-parallel
ranks, C capacity, K routes per token, X = E*C expert slots (or the packed rows), N = G*C tokens per
local expert, I expert inner width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import MOELayer, _AllToAll
from deepspeed.utils import groups
from torch import Tensor, nn

from .fused_act import BLOCK_M, bias_act, fused_bias_act_runs


class _ExpertLinear(torch.autograd.Function):
    """``x_LNi @ w_Loi^T + b_Lo`` for every local expert at once; the weight gradient comes back
    contiguous in the (o, i) layout of ``nn.Linear.weight``."""

    @staticmethod
    def forward(ctx, x_LNi: Tensor, w_Loi: Tensor, b_Lo: Tensor) -> Tensor:
        ctx.save_for_backward(x_LNi, w_Loi)
        return torch.baddbmm(b_Lo.unsqueeze(1), x_LNi, w_Loi.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_LNo: Tensor):
        x_LNi, w_Loi = ctx.saved_tensors
        grad_x = torch.bmm(grad_LNo, w_Loi) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad_LNo.transpose(1, 2), x_LNi) if ctx.needs_input_grad[1] else None
        grad_b = grad_LNo.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class BatchedExperts(Experts):
    """DeepSpeed's ``Experts``, computed as one batched matmul per FFN layer over the local experts.

    Takes over the expert modules of an ``Experts`` as they are (FFNs with ``ffn``, ``act`` and
    ``ffn_output``). The per-call ``torch.stack`` of the weights copies E weight matrices, small
    next to the matmuls; autograd hands each expert's gradient back to its own Parameter.
    ``batched = False`` runs DeepSpeed's loop over the experts (the reference).
    """

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)  # Experts.__init__ would deep-copy an expert again
        for expert in experts.deepspeed_experts:
            assert all(hasattr(expert, a) for a in ("ffn", "act", "ffn_output")), \
                f"BatchedExperts needs FFN experts (ffn, act, ffn_output), got {type(expert).__name__}"
        self.deepspeed_experts = experts.deepspeed_experts
        self.num_local_experts = experts.num_local_experts
        self.batched = True

    def forward(self, inputs: Tensor) -> Tensor:
        """(G, L, C, M) -> (G, L, C, M): every expert-parallel rank's slots for the L local experts."""
        if not self.batched:
            return super().forward(inputs)
        G, L, C, M = inputs.shape
        x_LNM = inputs.transpose(0, 1).reshape(L, G * C, M)
        stacked = self._stacked
        h_LNI = self.deepspeed_experts[0].act(_ExpertLinear.apply(x_LNM, stacked("ffn", "weight"),
                                                                  stacked("ffn", "bias")))
        y_LNM = _ExpertLinear.apply(h_LNI, stacked("ffn_output", "weight"), stacked("ffn_output", "bias"))
        return y_LNM.view(L, G, C, M).transpose(0, 1)

    def _stacked(self, layer: str, name: str) -> Tensor:
        """One parameter of every local expert, stacked: (L, ...) (a copy per call; autograd hands each
        expert's gradient back to its own Parameter)."""
        return torch.stack([getattr(getattr(e, layer), name) for e in self.deepspeed_experts])

    def forward_grouped(self, x_XM: Tensor, end_E: Tensor, expert_X: Tensor) -> Tensor:
        """Packed rows (X, M) -> (X, M): rows ``[end_E[e-1], end_E[e])`` go through expert e (all experts
        local). ``expert_X`` is each row's expert, E past the last group. Rows past the last group
        come back undefined (``_grouped_mm`` leaves them); their gradients must be zero, and none of
        their values reaches a parameter gradient (masked before the first bias)."""
        experts, stacked = self.deepspeed_experts, self._stacked
        h_XI = _grouped_matmul(x_XM, stacked("ffn", "weight"), end_E, expert_X)
        act = getattr(experts[0], "act_name", None)  # FeedForward's config name of its activation
        if fused_bias_act_runs(h_XI, act):
            h_XI = bias_act(h_XI, stacked("ffn", "bias"), expert_X, act)
        else:
            h_XI = bias_act_ops(h_XI, stacked("ffn", "bias"), expert_X, experts[0].act)
        y_XM = _grouped_matmul(h_XI, stacked("ffn_output", "weight"), end_E, expert_X)
        return _RowBias.apply(y_XM, stacked("ffn_output", "bias"), expert_X)


class _RowBias(torch.autograd.Function):
    """``y_XO + b_EO[expert_X]`` (rows of expert E, past the last group, get no bias). Forward is a
    gather that a compiled graph fuses into the next elementwise kernel (an ``addmm`` with a one-hot
    would write a whole new (X, O) tensor); the bias gradient is one matmul with the one-hot, not
    X x O atomic adds onto E rows."""

    @staticmethod
    def forward(ctx, y_XO: Tensor, b_EO: Tensor, expert_X: Tensor) -> Tensor:
        ctx.save_for_backward(expert_X)
        ctx.num_experts = b_EO.shape[0]
        return y_XO + torch.cat([b_EO, b_EO.new_zeros(1, b_EO.shape[1])]).to(y_XO.dtype)[expert_X]

    @staticmethod
    def backward(ctx, grad_XO: Tensor):
        (expert_X,) = ctx.saved_tensors
        grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = _one_hot(expert_X, ctx.num_experts, grad_XO.dtype).t() @ grad_XO
        return grad_XO, grad_b, None


def bias_act_ops(h_XI: Tensor, b_EI: Tensor, expert_X: Tensor, act) -> Tensor:
    """``act(h_XI + b_EI[expert_X])``, 0 for rows past the last group, as plain ops: what
    ``fused_act.bias_act`` computes in one kernel (and its tests' reference)."""
    in_group_X1 = (expert_X < b_EI.shape[0])[:, None]
    return act(torch.where(in_group_X1, _RowBias.apply(h_XI, b_EI, expert_X), 0.0))


def _one_hot(expert_X: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    """(X, E) one-hot of each row's expert; rows of expert E (past the last group) are all zero."""
    return F.one_hot(expert_X, num_experts + 1)[:, :num_experts].to(dtype)


def _grouped_matmul(x_XI: Tensor, w_EOI: Tensor, end_E: Tensor, expert_X: Tensor) -> Tensor:
    """Row group e of ``x_XI`` times ``w_EOI[e]`` transposed (weights in ``nn.Linear``'s (o, i) layout).
    ``torch._grouped_mm`` takes bf16 (compiled, and on CUDA); other dtypes (fp32 checks) compute every
    expert on every row and keep each row's own (E times the work; rows past the last group come back 0)."""
    if x_XI.dtype == torch.bfloat16:
        return _GroupedLinear.apply(x_XI, w_EOI, end_E)
    onehot_XE = _one_hot(expert_X, w_EOI.shape[0], x_XI.dtype)
    return torch.einsum("xe,exo->xo", onehot_XE, torch.matmul(x_XI, w_EOI.transpose(1, 2)))


class _GroupedLinear(torch.autograd.Function):
    """``torch._grouped_mm`` over packed rows with every operand it gets row-major, the one layout
    the Triton grouped-GEMM template of Inductor's max-autotune takes (torch 2.11: a column-major
    operand fails to compile). Forward: the weights as an (E, i, o) copy (fused with their stacking:
    ~14 us per call at widenet-base's size on an H200). Input gradient: the weights as stored, (E, o, i). Weight
    gradient: ``grouped_weight_grad``, an op Inductor leaves to ATen (its operands are transposed),
    coming back in the (o, i) layout of the weights."""

    @staticmethod
    def forward(ctx, x_XI: Tensor, w_EOI: Tensor, end_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_XI, w_EOI, end_E)
        return torch._grouped_mm(x_XI, w_EOI.transpose(1, 2).contiguous(), offs=end_E)

    @staticmethod
    def backward(ctx, grad_XO: Tensor):
        x_XI, w_EOI, end_E = ctx.saved_tensors
        grad_x = torch._grouped_mm(grad_XO, w_EOI.contiguous(), offs=end_E) if ctx.needs_input_grad[0] else None
        grad_w = grouped_weight_grad(grad_XO, x_XI, end_E) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


@torch.library.custom_op("widenet_ds::grouped_weight_grad", mutates_args=())
def grouped_weight_grad(grad_XO: Tensor, x_XI: Tensor, end_E: Tensor) -> Tensor:
    """(E, o, i): for each row group e, ``grad_XO[group]^T @ x_XI[group]`` (rows past the last group
    ignored). A custom op, so that Inductor calls ATen's kernel instead of its own template."""
    return torch._grouped_mm(grad_XO.t(), x_XI, offs=end_E)


@grouped_weight_grad.register_fake
def _(grad_XO: Tensor, x_XI: Tensor, end_E: Tensor) -> Tensor:
    return grad_XO.new_empty(end_E.shape[0], grad_XO.shape[1], x_XI.shape[1])


def _rows(t_RM: Tensor, index: Tensor) -> Tensor:
    """Rows of ``t_RM`` by ``index``; index R (one past the end) reads a row of zeros."""
    return torch.cat([t_RM, t_RM.new_zeros(1, t_RM.shape[1])]).index_select(0, index)


class _Dispatch(torch.autograd.Function):
    """Tokens (S, M) -> expert slots (X, M): each slot holds the token routed to it, or zeros.
    Backward is a gather as well: each token sums the gradients of its K slots."""

    @staticmethod
    def forward(ctx, x_SM: Tensor, slot_KS: Tensor, source_X: Tensor) -> Tensor:
        ctx.save_for_backward(slot_KS)
        return _rows(x_SM, source_X)

    @staticmethod
    def backward(ctx, grad_XM: Tensor):
        (slot_KS,) = ctx.saved_tensors
        grad_KSM = _rows(grad_XM, slot_KS.reshape(-1)).view(*slot_KS.shape, -1)
        return grad_KSM.sum(0), None, None


class _Combine(torch.autograd.Function):
    """Expert slots (X, M) -> tokens (S, M): ``y_s = sum_k gate_ks * out[slot_ks]``, the products and
    the sum in fp32 (the gates' dtype) as DeepSpeed's ``_sparse_decode``. Backward: a kept slot's
    gradient is its one route's gate times that token's gradient (a gather); a gate's gradient is
    the dot product of the token's gradient with its slot's output."""

    @staticmethod
    def forward(ctx, out_XM: Tensor, gates_KS: Tensor, slot_KS: Tensor, source_X: Tensor,
                gate_X: Tensor) -> Tensor:
        routed_KSM = _rows(out_XM, slot_KS.reshape(-1)).view(*slot_KS.shape, -1)
        ctx.save_for_backward(routed_KSM, source_X, gate_X)
        return (routed_KSM * gates_KS.unsqueeze(-1)).sum(0).to(out_XM.dtype)

    @staticmethod
    def backward(ctx, grad_SM: Tensor):
        routed_KSM, source_X, gate_X = ctx.saved_tensors
        grad_out = (_rows(grad_SM, source_X) * gate_X.unsqueeze(-1)).to(routed_KSM.dtype)
        grad_gates = (routed_KSM * grad_SM.to(gate_X.dtype)).sum(-1)
        return grad_out, grad_gates, None, None, None


def route_maps(indices_KS: Tensor, locations_KS: Tensor, gates_KS: Tensor, num_experts: int,
               capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """The routing as index maps, both ways, without host synchronisation.

    Returns ``slot_KS`` (each route's slot ``e * C + location``, X for a dropped route),
    ``source_X`` (each slot's token, S for an empty slot) and ``gate_X`` (each slot's gate, 0 if empty).
    """
    X = num_experts * capacity
    slot_KS = torch.where(indices_KS >= 0, indices_KS.long() * capacity + locations_KS.long(), X)
    return (slot_KS, *slot_maps(slot_KS, gates_KS, X))


GROUP_ALIGN = 16  # rows; the grouped matmul's weight-gradient (ragged K) wants aligned group starts
assert GROUP_ALIGN % BLOCK_M == 0, "a tile of the fused bias + activation is one expert's rows"


def packed_slots(indices_KS: Tensor, locations_KS: Tensor, kept_E: Tensor,
                 capacity: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Packed rows for the kept routes, expert after expert, each expert's group padded to
    ``GROUP_ALIGN`` rows; no host synchronisation (the row count is a bound known on the host).

    A kept route's location is its rank among its expert's kept routes (0 .. kept_e - 1), so its row
    is the start of its expert's group plus its location. Returns ``slot_KS`` (X for a dropped
    route), ``end_E`` (int32 group ends, ``_grouped_mm``'s offsets), ``expert_X`` (each row's expert,
    E past the last group) and X, the number of rows.
    """
    K, S = indices_KS.shape
    E = kept_E.shape[0]
    X = -(-(min(E * capacity, K * S) + (GROUP_ALIGN - 1) * E) // GROUP_ALIGN) * GROUP_ALIGN
    rows_E = (kept_E + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    end_E = rows_E.cumsum(0)
    start_E = end_E - rows_E
    expert = indices_KS.long().clamp(min=0)
    slot_KS = torch.where(indices_KS >= 0, start_E[expert] + locations_KS.long(), X)
    expert_X = torch.searchsorted(end_E, torch.arange(X, device=end_E.device), right=True)
    return slot_KS, end_E.to(torch.int32), expert_X, X


def received_packing(counts_GL: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Packed rows for the slots an expert-parallel rank received, without host synchronisation.

    After the all-to-all a rank holds (G, L, C) slots: from each of the G ranks, C slots for each of
    its L local experts, of which the first ``counts_GL[g, l]`` are filled (a route's location is
    its rank among its expert's kept routes). The filled slots are packed expert after expert (ranks
    in order within an expert), each expert's group padded to ``GROUP_ALIGN`` rows. Returns
    ``source_P`` (each packed row's received slot, G*L*C for a padding row), ``packed_X`` (each
    received slot's packed row, P for an empty slot), ``end_L`` (int32 group ends), ``expert_P``
    (each row's local expert, L past the last group) and P, the number of packed rows (a bound known
    on the host).
    """
    G, L = counts_GL.shape
    X = G * L * capacity
    P = -(-(X + (GROUP_ALIGN - 1) * L) // GROUP_ALIGN) * GROUP_ALIGN
    rows_L = (counts_GL.sum(0) + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    end_L = rows_L.cumsum(0)
    start_GL = (end_L - rows_L)[None, :] + counts_GL.cumsum(0) - counts_GL  # each rank's block in its expert's group
    location_C = torch.arange(capacity, device=counts_GL.device)
    packed_GLC = torch.where(location_C < counts_GL[..., None], start_GL[..., None] + location_C, P)
    packed_X = packed_GLC.reshape(-1)
    # Empty slots all write the extra row P, which is cut off: no other row is written twice.
    source_P = torch.full((P + 1,), X, dtype=torch.long, device=counts_GL.device)
    source_P.scatter_(0, packed_X, torch.arange(X, device=counts_GL.device))
    expert_P = torch.searchsorted(end_L, torch.arange(P, device=counts_GL.device), right=True)
    return source_P[:P], packed_X, end_L.to(torch.int32), expert_P, P


def slot_maps(slot_KS: Tensor, gates_KS: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """``source_X`` (each slot's token, S for an empty slot) and ``gate_X`` (each slot's gate, 0 if
    empty) of ``num_slots`` slots, from each route's slot (``num_slots`` for a dropped route)."""
    K, S = slot_KS.shape
    X = num_slots
    tokens_KS = torch.arange(S, device=slot_KS.device).expand(K, S)
    # Dropped routes all write the extra slot X, which is cut off: no other slot is written twice.
    source_X = torch.full((X + 1,), S, dtype=torch.long, device=slot_KS.device)
    source_X.scatter_(0, slot_KS.reshape(-1), tokens_KS.reshape(-1))
    gate_X = gates_KS.detach().new_zeros(X + 1).scatter_(0, slot_KS.reshape(-1), gates_KS.detach().reshape(-1))
    return source_X[:X], gate_X[:X]


def grouped_mm_is_fast(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> bool:
    """Whether the grouped experts are fast here: ``torch._grouped_mm`` runs its fused kernel in bf16
    on Hopper or Blackwell (compute capability 9.x or 10.x); on other GPUs it loops over the groups
    after a host sync (Ampere), and other dtypes take this module's dense fallback (E times the
    expert work). On the CPU every dtype has a correct path (the tests' reference): it counts as fast."""
    if device_type != "cuda":
        return True
    return dtype == torch.bfloat16 and capability is not None and capability[0] in (9, 10)


@torch.compiler.disable
def _warn_grouped_fallback(x: Tensor) -> None:
    import logging

    logging.getLogger(__name__).warning(
        "moe.impl 'grouped' needs bf16 on a compute capability 9.x/10.x GPU to be fast (got %s on %s); "
        "running the 'batched' experts instead", x.dtype,
        torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else x.device)


class GatherMOELayer(MOELayer):
    """DeepSpeed's ``MOELayer`` with gather-only dispatch and combine (same gate, experts, groups and
    all-to-all). Falls back to DeepSpeed's forward when ``fast`` is off and for what the fast
    forward does not cover: Tutel, tensor-parallel experts (``groups.mpu``), wall-clock timers.
    ``grouped`` packs the kept routes and runs grouped matmuls (at ep_size 1 from the tokens; with
    expert parallelism from the slots each rank received, ``received_packing``; on GPUs or dtypes
    where ``torch._grouped_mm`` is slow, see ``grouped_mm_is_fast``, the layer uses the batched experts)."""

    def __init__(self, layer: MOELayer):
        super().__init__(layer.gate, layer.experts, layer.ep_group_name, layer.ep_size, layer.num_local_experts,
                         use_tutel=layer.use_tutel)
        self.ep_group = layer.ep_group
        self.fast = True
        self.grouped = False
        self.grouped_fallback_warned = False

    def _grouped_fits(self, x: Tensor) -> bool:
        """``grouped_mm_is_fast`` for these tokens; warns once when the layer falls back to batched."""
        capability = None
        if x.device.type == "cuda":  # get_device_properties: a constant to torch.compile, no graph break
            properties = torch.cuda.get_device_properties(x.device)
            capability = (properties.major, properties.minor)
        if grouped_mm_is_fast(x.device.type, x.dtype, capability):
            return True
        if not self.grouped_fallback_warned:
            self.grouped_fallback_warned = True
            _warn_grouped_fallback(x)
        return False

    def forward(self, *input: Tensor, **kwargs) -> Tensor:
        if not self.fast or self.use_tutel or groups.mpu is not None or self.wall_clock_breakdown:
            return super().forward(*input, **kwargs)
        x = input[0]
        x_SM = x.reshape(-1, x.shape[-1])
        S, M = x_SM.shape
        self.l_aux, C, E, indices_KS, locations_KS, gates_KS, self.exp_counts = self.gate(x_SM, input[1], True, False)
        C = int(C)  # a host tensor from WideNetGate when the capacity is known: no wait on the GPU
        if self.grouped and self.ep_size == 1 and self._grouped_fits(x_SM):
            slot_KS, end_E, expert_X, X = packed_slots(indices_KS, locations_KS, self.exp_counts[1], C)
            source_X, gate_X = slot_maps(slot_KS, gates_KS, X)
            out_XM = self.experts.forward_grouped(_Dispatch.apply(x_SM, slot_KS, source_X), end_E, expert_X)
            return _Combine.apply(out_XM, gates_KS, slot_KS, source_X, gate_X).reshape(x.shape)
        slot_KS, source_X, gate_X = route_maps(indices_KS, locations_KS, gates_KS, E, C)
        slots_XM = _Dispatch.apply(x_SM, slot_KS, source_X)
        slots_XM = _AllToAll.apply(self.ep_group, slots_XM) if self.ep_size > 1 else slots_XM
        if self.grouped and self.ep_size > 1 and self._grouped_fits(x_SM):
            out_XM = self._grouped_received(slots_XM, C)
        else:
            out = self.experts(slots_XM.view(self.ep_size, self.num_local_experts, -1, M))
            out_XM = out.reshape(E * C, M)
        out_XM = _AllToAll.apply(self.ep_group, out_XM) if self.ep_size > 1 else out_XM
        return _Combine.apply(out_XM, gates_KS, slot_KS, source_X, gate_X).reshape(x.shape)

    def _grouped_received(self, slots_XM: Tensor, capacity: int) -> Tensor:
        """The local experts over the filled slots received from every rank ((G*L*C, M) in, same out;
        empty slots come back zero): the ranks swap their kept counts per expert (an all-to-all of E
        integers), then the filled slots are packed, run as grouped matmuls and unpacked."""
        kept_E = self.exp_counts[1].contiguous()
        counts = torch.empty_like(kept_E)
        dist.all_to_all_single(counts, kept_E, group=self.ep_group)
        counts_GL = counts.view(self.ep_size, self.num_local_experts)
        source_P, packed_X, end_L, expert_P, _ = received_packing(counts_GL, capacity)
        # Packing and unpacking are one-to-one moves of rows: dispatches with one route per row (K = 1).
        out_PM = self.experts.forward_grouped(_Dispatch.apply(slots_XM, packed_X[None], source_P), end_L, expert_P)
        return _Dispatch.apply(out_PM, source_P[None], packed_X)
