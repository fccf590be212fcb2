"""Bias + activation of the grouped experts' first layer as one Triton kernel each way.

The packed rows (X, I) that leave the first grouped matmul get their expert's bias and the
activation; rows past the last group (expert E) give zero. Compiled without it, Inductor runs
this as two elementwise kernels (the row's expert gathered per element) plus, for the bias
gradient, a matmul with a one-hot that reads the gradient once more. Here the forward is one
pass (read the matmul's output, write the activation) and the backward one pass that also sums
the bias gradient per expert (fp32 atomics, one flush per expert per strip of rows: the order of
the additions, and so the last bits of the bias gradient, vary from run to run). A tile of rows is
one expert's: the packing starts each expert's group at a multiple of 16 rows (packing.py).

``bias_act`` is a custom op (``torch.library.custom_op``, with its shapes for tracing and its
backward): torch.compile keeps it as one call, CUDA graphs capture it. It runs where Triton runs
(CUDA; the CPU under ``TRITON_INTERPRET=1``, as the tests do); ``fused_bias_act_runs`` says where,
and the ``moe.fused_act`` setting switches it off. Measurements:
benchmarks/reports/moe_experts_h200_202611.md. Shapes: the legend in ``widenet_ds.modeling``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the unfused path in experts.py
    triton = bias_act = None

ACTS = ("gelu_new", "gelu", "relu")  # layers.ACTIVATION_FNS, by their config names
BLOCK_M, BLOCK_N, STRIP_M = 16, 256, 256  # rows x columns per tile; rows per backward program


def fused_bias_act_runs(x: Tensor, act: str) -> bool:
    """Whether ``bias_act`` can run for these rows: Triton installed, a CUDA tensor (or the Triton
    interpreter on the CPU), an activation it knows and no deterministic algorithms asked for
    (``torch.use_deterministic_algorithms``). The ``moe.fused_act`` setting is checked by the caller."""
    if triton is None or act not in ACTS:
        return False
    if torch.are_deterministic_algorithms_enabled():  # the bias gradient's atomics are not
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _act_and_slope(x, ACT: tl.constexpr):
        """(act(x), act'(x)) in fp32. gelu_new: x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        (= 0.5 x (1 + tanh u)); gelu: x Phi(x); relu."""
        if ACT == 0:
            u2 = 1.5957691216057308 * (x + 0.044715 * x * x * x)
            s = 1.0 / (1.0 + tl.exp(-u2))
            y = x * s
            dy = s + x * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * x * x)
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            y = x * cdf
            dy = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
        else:
            y = tl.maximum(x, 0.0)
            dy = tl.where(x > 0.0, 1.0, 0.0)
        return y, dy

    @triton.jit
    def _bias_act_fwd(h_ptr, b_ptr, expert_ptr, out_ptr, X, I, E, ACT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One tile of BLOCK_M rows (one expert's: groups start at multiples of BLOCK_M) x BLOCK_N columns."""
        m = tl.program_id(0) * BLOCK_M
        rows = m + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < I
        mask = (rows < X)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * I + cols[None, :]  # X * I may pass 2^31
        e = tl.load(expert_ptr + m)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + e * I + cols, mask=cmask & (cols * 0 + e < E), other=0.0).to(tl.float32)
        y, _ = _act_and_slope(h + b[None, :], ACT)
        y = tl.where(e < E, y, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_act_bwd(grad_ptr, h_ptr, b_ptr, expert_ptr, grad_h_ptr, grad_b_ptr, X, I, E, ACT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STRIP_M: tl.constexpr):
        """One strip of STRIP_M rows x BLOCK_N columns, tile by tile (a tile is one expert's): the input
        gradient, and the bias gradient summed in registers, flushed with atomics when the expert changes."""
        start = tl.program_id(0) * STRIP_M
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < I
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        current = tl.load(expert_ptr + start)
        for m in range(start, tl.minimum(start + STRIP_M, X), BLOCK_M):
            e = tl.load(expert_ptr + m)
            if e != current:
                tl.atomic_add(grad_b_ptr + current * I + cols, tl.sum(acc, 0), mask=cmask & (cols * 0 + current < E))
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                current = e
            rows = m + tl.arange(0, BLOCK_M)
            mask = (rows < X)[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * I + cols[None, :]  # X * I may pass 2^31
            h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + e * I + cols, mask=cmask & (cols * 0 + e < E), other=0.0).to(tl.float32)
            _, slope = _act_and_slope(h + b[None, :], ACT)
            grad_h = tl.where(e < E, grad * slope, 0.0)
            tl.store(grad_h_ptr + offs, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)
            acc += grad_h
        tl.atomic_add(grad_b_ptr + current * I + cols, tl.sum(acc, 0), mask=cmask & (cols * 0 + current < E))

    @torch.library.custom_op("widenet_ds::bias_act", mutates_args=())
    def bias_act(h_XI: Tensor, b_EI: Tensor, expert_X: Tensor, act: str) -> Tensor:
        """``act(h_XI + b_EI[expert_X])`` for rows of an expert, 0 for rows of expert E. ``expert_X`` is
        ascending and each expert's rows start at a multiple of ``BLOCK_M`` (packing.py)."""
        h_XI, b_EI, expert_X = h_XI.contiguous(), b_EI.contiguous(), expert_X.contiguous()
        X, I = h_XI.shape
        out = torch.empty_like(h_XI)
        grid = (triton.cdiv(X, BLOCK_M), triton.cdiv(I, BLOCK_N))
        _bias_act_fwd[grid](h_XI, b_EI, expert_X, out, X, I, b_EI.shape[0], ACT=ACTS.index(act),
                                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        return out

    @torch.library.custom_op("widenet_ds::bias_act_backward", mutates_args=())
    def bias_act_backward(grad_XI: Tensor, h_XI: Tensor, b_EI: Tensor, expert_X: Tensor,
                          act: str) -> tuple[Tensor, Tensor]:
        """The gradients of ``bias_act`` for ``h_XI`` and ``b_EI`` (the latter summed in fp32)."""
        h_XI, b_EI, expert_X = h_XI.contiguous(), b_EI.contiguous(), expert_X.contiguous()
        X, I = h_XI.shape
        grad_h = torch.empty_like(h_XI)
        grad_b = torch.zeros(b_EI.shape, dtype=torch.float32, device=b_EI.device)
        grid = (triton.cdiv(X, STRIP_M), triton.cdiv(I, BLOCK_N))
        _bias_act_bwd[grid](grad_XI.contiguous(), h_XI, b_EI, expert_X, grad_h, grad_b, X, I,
                                         b_EI.shape[0], ACT=ACTS.index(act), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                         STRIP_M=STRIP_M)
        return grad_h, grad_b.to(b_EI.dtype)

    @bias_act.register_fake
    def _(h_XI: Tensor, b_EI: Tensor, expert_X: Tensor, act: str) -> Tensor:
        return torch.empty_like(h_XI)

    @bias_act_backward.register_fake
    def _(grad_XI: Tensor, h_XI: Tensor, b_EI: Tensor, expert_X: Tensor, act: str) -> tuple[Tensor, Tensor]:
        return torch.empty_like(h_XI), torch.empty_like(b_EI)

    def _setup_context(ctx, inputs, output):
        h_XI, b_EI, expert_X, act = inputs
        ctx.save_for_backward(h_XI, b_EI, expert_X)
        ctx.act = act

    def _backward(ctx, grad_XI):
        h_XI, b_EI, expert_X = ctx.saved_tensors
        grad_h, grad_b = bias_act_backward(grad_XI, h_XI, b_EI, expert_X, ctx.act)
        return grad_h, grad_b, None, None

    bias_act.register_autograd(_backward, setup_context=_setup_context)
