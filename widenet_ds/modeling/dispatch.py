"""Dispatch and combine: moving rows between tokens, expert slots and expert-parallel ranks.

``_Dispatch`` and ``_Combine`` are gathers both ways along packing.py's index maps: dispatch
copies each token into its slots, combine sums each token's slot outputs weighted by its gates
(the products and the sum in fp32, as DeepSpeed's ``_sparse_decode``). Written as gathers in the
backward too: a scatter-add backward would have every empty slot and dropped route add into one
shared padding row with atomics. ``exchange`` is the expert-parallel all-to-all of the slots
(DeepSpeed's, through deepspeed_moe.py). Shapes: the legend in ``widenet_ds.modeling``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .deepspeed_moe import all_to_all, exchange_counts


def exchange(group, slots_XH: Tensor, ep_size: int) -> Tensor:
    """Expert-parallel all-to-all of the slots (differentiable): block g of the first dimension goes
    to rank g. A no-op at ep_size 1."""
    return all_to_all(group, slots_XH) if ep_size > 1 else slots_XH


def exchange_kept_counts(kept_E: Tensor, group) -> Tensor:
    """The kept routes per expert of every rank, for this rank's experts: (E,) in, (G*L,) out (rank g's
    counts for each local expert), so a rank knows how many of the slots it receives are filled."""
    return exchange_counts(kept_E, group)


def _rows(t_RH: Tensor, index: Tensor) -> Tensor:
    """Rows of ``t_RH`` by ``index``; index R (one past the end) reads a row of zeros."""
    return torch.cat([t_RH, t_RH.new_zeros(1, t_RH.shape[1])]).index_select(0, index)


class _Dispatch(torch.autograd.Function):
    """Tokens (S, H) -> expert slots (X, H): each slot holds the token routed to it, or zeros.
    Backward is a gather as well: each token sums the gradients of its K slots."""

    @staticmethod
    def forward(ctx, x_SH: Tensor, slot_KS: Tensor, source_X: Tensor) -> Tensor:
        ctx.save_for_backward(slot_KS)
        return _rows(x_SH, source_X)

    @staticmethod
    def backward(ctx, grad_XH: Tensor):
        (slot_KS,) = ctx.saved_tensors
        grad_KSH = _rows(grad_XH, slot_KS.reshape(-1)).view(*slot_KS.shape, -1)
        return grad_KSH.sum(0), None, None


class _Combine(torch.autograd.Function):
    """Expert slots (X, H) -> tokens (S, H): ``y_s = sum_k gate_ks * out[slot_ks]``, the products and
    the sum in fp32 (the gates' dtype) as DeepSpeed's ``_sparse_decode``. Backward: a kept slot's
    gradient is its one route's gate times that token's gradient (a gather); a gate's gradient is
    the dot product of the token's gradient with its slot's output."""

    @staticmethod
    def forward(ctx, out_XH: Tensor, gates_KS: Tensor, slot_KS: Tensor, source_X: Tensor,
                gate_X: Tensor) -> Tensor:
        routed_KSH = _rows(out_XH, slot_KS.reshape(-1)).view(*slot_KS.shape, -1)
        ctx.save_for_backward(routed_KSH, source_X, gate_X)
        return (routed_KSH * gates_KS.unsqueeze(-1)).sum(0).to(out_XH.dtype)

    @staticmethod
    def backward(ctx, grad_SH: Tensor):
        routed_KSH, source_X, gate_X = ctx.saved_tensors
        grad_out = (_rows(grad_SH, source_X) * gate_X.unsqueeze(-1)).to(routed_KSH.dtype)
        grad_gates = (routed_KSH * grad_SH.to(gate_X.dtype)).sum(-1)
        return grad_out, grad_gates, None, None, None
