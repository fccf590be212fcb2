"""Packing: where each route's token goes among the expert slots or packed rows, as index maps.

Pure index arithmetic on the routing (gate.py's ``Routing``), with no host synchronisation: every
size is a bound known on the host. Two layouts:

- capacity slots: expert e owns slots ``e * C ... e * C + C - 1``, X = E*C in all (``route_maps``);
  the layout the expert-parallel all-to-all exchanges and the batched experts compute on;
- packed rows: the kept routes only, expert after expert, each expert's group padded to
  ``GROUP_ALIGN`` rows (``packed_slots`` from the tokens, ``received_packing`` from the slots an
  expert-parallel rank received); the layout of the grouped matmuls.

Shapes: the legend in ``widenet_ds.modeling``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused_act import BLOCK_M


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
    ``source_Q`` (each packed row's received slot, G*L*C for a padding row), ``packed_X`` (each
    received slot's packed row, Q for an empty slot), ``end_L`` (int32 group ends), ``expert_Q``
    (each row's local expert, L past the last group) and Q, the number of packed rows (a bound known
    on the host).
    """
    G, L = counts_GL.shape
    X = G * L * capacity
    Q = -(-(X + (GROUP_ALIGN - 1) * L) // GROUP_ALIGN) * GROUP_ALIGN
    rows_L = (counts_GL.sum(0) + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    end_L = rows_L.cumsum(0)
    start_GL = (end_L - rows_L)[None, :] + counts_GL.cumsum(0) - counts_GL  # each rank's block in its expert's group
    location_C = torch.arange(capacity, device=counts_GL.device)
    packed_GLC = torch.where(location_C < counts_GL[..., None], start_GL[..., None] + location_C, Q)
    packed_X = packed_GLC.reshape(-1)
    # Empty slots all write the extra row Q, which is cut off: no other row is written twice.
    source_Q = torch.full((Q + 1,), X, dtype=torch.long, device=counts_GL.device)
    source_Q.scatter_(0, packed_X, torch.arange(X, device=counts_GL.device))
    expert_Q = torch.searchsorted(end_L, torch.arange(Q, device=counts_GL.device), right=True)
    return source_Q[:Q], packed_X, end_L.to(torch.int32), expert_Q, Q


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
