"""The experts: every local expert's FFN weights, computed together.

The expert modules stay DeepSpeed's (``Experts.deepspeed_experts``, one ``FeedForward`` each: the
parameter names, expert-parallel tags and per-expert checkpoint files are DeepSpeed's); what
changes is how they run:

- ``BatchedExperts.forward``: every expert-parallel rank's capacity slots, (G, L, C, H), through
  the L local experts as one batched matmul per FFN layer (``_ExpertLinear``) instead of a Python
  loop, with the weight gradients produced in the weights' own (o, i) layout.
- ``BatchedExperts.forward_grouped``: packed rows, expert after expert (packing.py), through
  grouped matmuls (``torch._grouped_mm``) over the kept routes only. Every operand is row-major
  (``_GroupedLinear``); the first bias and the activation are one Triton kernel each way when
  the ``moe.fused_act`` setting is on and Triton runs (fused_act.py).

``grouped_mm_is_fast`` says where the grouped matmuls pay off. Shapes: the legend in
``widenet_ds.modeling``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deepspeed_moe import Experts
from .fused_act import bias_act, fused_bias_act_runs

def _autocast_operands(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The operands of an expert matmul in the dtype autocast would give it (a custom autograd Function
    is not autocast itself): under ``torch.autocast`` (e.g. bf16 activations with fp32 weights) every
    operand in autocast's dtype, otherwise unchanged. The backward then computes in that dtype and
    autograd returns each gradient in its input's dtype."""
    device_type = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def _no_autocast(x: Tensor):
    """Autocast off for the matmul whose operands ``_autocast_operands`` already cast."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class _ExpertLinear(torch.autograd.Function):
    """``x_LNi @ w_Loi^T + b_Lo`` for every local expert at once; the weight gradient comes back
    contiguous in the (o, i) layout of ``nn.Linear.weight``."""

    @staticmethod
    def forward(ctx, x_LNi: Tensor, w_Loi: Tensor, b_Lo: Tensor) -> Tensor:
        x_LNi, w_Loi, b_Lo = _autocast_operands(x_LNi, w_Loi, b_Lo)
        ctx.save_for_backward(x_LNi, w_Loi)
        with _no_autocast(x_LNi):
            return torch.baddbmm(b_Lo.unsqueeze(1), x_LNi, w_Loi.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_LNo: Tensor):
        x_LNi, w_Loi = ctx.saved_tensors
        grad_LNo = grad_LNo.to(x_LNi.dtype)
        grad_x = torch.bmm(grad_LNo, w_Loi) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad_LNo.transpose(1, 2), x_LNi) if ctx.needs_input_grad[1] else None
        grad_b = grad_LNo.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class BatchedExperts(Experts):
    """DeepSpeed's ``Experts`` (``num_local_experts`` copies of ``expert``, tagged for the expert
    group ``group_name``), computed as one batched matmul per FFN layer over the local experts.

    The experts must be FFNs with ``ffn``, ``act`` and ``ffn_output`` (``FeedForward``). The
    per-call ``torch.stack`` of the weights copies L weight matrices, small next to the matmuls;
    autograd hands each expert's gradient back to its own Parameter. ``batched = False`` runs
    DeepSpeed's loop over the experts (the reference, ``moe.impl`` 'deepspeed').
    """

    def __init__(self, expert: nn.Module, num_local_experts: int, group_name: str):
        assert all(hasattr(expert, a) for a in ("ffn", "act", "ffn_output")), \
            f"BatchedExperts needs FFN experts (ffn, act, ffn_output), got {type(expert).__name__}"
        super().__init__(expert, num_local_experts, group_name)
        self.batched = True

    def forward(self, inputs: Tensor) -> Tensor:
        """(G, L, C, H) -> (G, L, C, H): every expert-parallel rank's slots for the L local experts."""
        if not self.batched:
            return super().forward(inputs)
        G, L, C, H = inputs.shape
        x_LNH = inputs.transpose(0, 1).reshape(L, G * C, H)
        stacked = self._stacked
        h_LNI = self.deepspeed_experts[0].act(_ExpertLinear.apply(x_LNH, stacked("ffn", "weight"),
                                                                  stacked("ffn", "bias")))
        y_LNH = _ExpertLinear.apply(h_LNI, stacked("ffn_output", "weight"), stacked("ffn_output", "bias"))
        return y_LNH.view(L, G, C, H).transpose(0, 1)

    def _stacked(self, layer: str, name: str) -> Tensor:
        """One parameter of every local expert, stacked: (L, ...) (a copy per call; autograd hands each
        expert's gradient back to its own Parameter)."""
        return torch.stack([getattr(getattr(e, layer), name) for e in self.deepspeed_experts])

    def forward_grouped(self, x_XH: Tensor, end_E: Tensor, expert_X: Tensor, fused_act: bool = True) -> Tensor:
        """Packed rows (X, H) -> (X, H): rows ``[end_E[e-1], end_E[e])`` go through expert e (all experts
        local). ``expert_X`` is each row's expert, E past the last group. Rows past the last group
        come back undefined (``_grouped_mm`` leaves them); their gradients must be zero, and none of
        their values reaches a parameter gradient (masked before the first bias). ``fused_act``: the
        first bias and the activation as fused_act.py's kernel, where it runs."""
        experts, stacked = self.deepspeed_experts, self._stacked
        h_XI = _grouped_matmul(x_XH, stacked("ffn", "weight"), end_E, expert_X)
        act = getattr(experts[0], "act_name", None)  # FeedForward's config name of its activation
        if fused_act and fused_bias_act_runs(h_XI, act):
            h_XI = bias_act(h_XI, stacked("ffn", "bias"), expert_X, act)
        else:
            h_XI = bias_act_ops(h_XI, stacked("ffn", "bias"), expert_X, experts[0].act)
        y_XH = _grouped_matmul(h_XI, stacked("ffn_output", "weight"), end_E, expert_X)
        return _RowBias.apply(y_XH, stacked("ffn_output", "bias"), expert_X)


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
    the Triton grouped-GEMM template of Inductor's max-autotune takes (a column-major operand fails
    to compile there). Forward: the weights as an (E, i, o) copy (fused with their stacking). Input
    gradient: the weights as stored, (E, o, i). Weight
    gradient: ``grouped_weight_grad``, an op Inductor leaves to ATen (its operands are transposed),
    coming back in the (o, i) layout of the weights."""

    @staticmethod
    def forward(ctx, x_XI: Tensor, w_EOI: Tensor, end_E: Tensor) -> Tensor:
        x_XI, w_EOI = _autocast_operands(x_XI, w_EOI)
        ctx.save_for_backward(x_XI, w_EOI, end_E)
        with _no_autocast(x_XI):
            return torch._grouped_mm(x_XI, w_EOI.transpose(1, 2).contiguous(), offs=end_E)

    @staticmethod
    def backward(ctx, grad_XO: Tensor):
        x_XI, w_EOI, end_E = ctx.saved_tensors
        grad_XO = grad_XO.to(x_XI.dtype)
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


def grouped_mm_is_fast(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> bool:
    """Whether the grouped experts are fast here: ``torch._grouped_mm`` runs its fused kernel in bf16
    on Hopper or Blackwell (compute capability 9.x or 10.x); on other GPUs it loops over the groups
    after a host sync (Ampere), and other dtypes take this module's dense fallback (E times the
    expert work). On the CPU every dtype has a correct path (the tests' reference): it counts as fast."""
    if device_type != "cuda":
        return True
    return dtype == torch.bfloat16 and capability is not None and capability[0] in (9, 10)
