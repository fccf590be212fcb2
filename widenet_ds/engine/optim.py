"""LAMB with its trust ratio per parameter tensor, also when DeepSpeed hands it flat buffers.

LAMB (You et al., 2020, Algorithm 2) scales each layer's Adam-style update by a trust ratio
``||w|| / ||u||`` of that layer. Under DeepSpeed's bf16 and ZeRO wrappers the optimizer no longer
sees layers: each parameter group becomes one flat fp32 master tensor (ZeRO 0), or one equal-sized
partition of it per data-parallel rank (ZeRO 1-2), with alignment padding between and after the
tensors. A LAMB that takes a norm of each tensor it is given then computes one trust ratio per
group or per partition - another optimizer. This one remembers the tensors of each group: where
DeepSpeed has made them views into its flat low-precision buffer, their addresses give each
tensor's place in it, which the fp32 master buffer shares; the tensor it is handed is cut into
those pieces (the squares of a layer that spans partitions are summed over the group's
data-parallel ranks). So ``||update of layer i|| = lr * ||w_i||`` holds for every layer in every
mode (tests/test_optim.py checks it under the engine).

Update, per layer (standard LAMB, as NVIDIA's FusedLAMB with bias correction; weight decay in u):
``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``u = m^ / (sqrt(v^) + eps) + wd w``,
``w -= lr * r * u`` with ``r = ||w|| / ||u||`` (1 when either is 0).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

TENSORS_KEY = "lamb_tensors"  # param-group key: which of the optimizer's recorded tensor lists is this group's

class Lamb(torch.optim.Optimizer):
    """LAMB with per-tensor trust ratios that survive DeepSpeed's flattening and partitioning.

    Args:
        params: tensors or parameter groups (DeepSpeed's MoE groups carry ``name`` and ``moe``).
        lr, betas, eps, weight_decay: as in the paper (weight decay inside the update).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lamb: bad lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        # The tensors each group was built with, under a key stored in the group (DeepSpeed drops
        # empty groups, which shifts indices, and names its two expert groups alike; the key is
        # saved with the group and comes back with load_state_dict).
        self._tensors: dict[int, list[Tensor]] = {}
        for i, group in enumerate(self.param_groups):
            group[TENSORS_KEY] = i
            self._tensors[i] = list(group["params"])
        self._layouts: dict[tuple, tuple[Tensor, Tensor, list[int], int, bool]] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuses the state of another optimizer (AdamW, another LAMB) instead of failing at step 1."""
        saved = state_dict.get("state", {})
        foreign = sorted({k for s in saved.values() for k in s} - {"step", "exp_avg", "exp_avg_sq"})
        incomplete = any(set(s) != {"step", "exp_avg", "exp_avg_sq"} for s in saved.values())
        if foreign or incomplete or any(TENSORS_KEY not in g for g in state_dict.get("param_groups", [])):
            raise ValueError("the optimizer state in this checkpoint was not written by widenet_ds.engine.optim.Lamb "
                             f"(state keys {foreign or 'missing'}; checkpoints of widenet-ds before 2026-11-29 "
                             "used pytorch_optimizer's Lamb): resume with the optimizer that wrote it (the "
                             "\"optimizer\" block of the run's ds_config.json)")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update, live = self._adam_update(p, group)
                layer_of_piece, layer_of_element, lengths, num_layers, partitioned = self._layout(p, group)
                w_sq, u_sq = _squares_per_layer(p, update, layer_of_piece, lengths, num_layers)
                if partitioned:  # a layer's pieces on other ranks
                    both = torch.stack([w_sq, u_sq])
                    dist.all_reduce(both, group=_data_parallel_group(group))
                    w_sq, u_sq = both
                w_norm, u_norm = w_sq.sqrt(), u_sq.sqrt()
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)) * live
                p.view(-1).addcmul_(update.view(-1), ratio.index_select(0, layer_of_element), value=-group["lr"])
        return loss

    def _adam_update(self, p: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``m^ / (sqrt(v^) + eps) + wd * w`` in fp32 (the state lives in fp32), and ``live``: 1, or 0 when
        the gradient is zero everywhere. Such a gradient is no gradient: the state stays as it is and the
        caller scales the update by ``live`` (DeepSpeed's wrappers take one such step to create the state;
        LAMB would turn it into a weight-decay-only step of size lr * ||w||). Decided on the device: no
        host synchronisation. Few passes over the tensor (it is the whole model's flat buffer)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        beta1, beta2 = group["betas"]
        grad = p.grad.float()
        live = torch.linalg.vector_norm(grad, float("inf")).gt(0).float()
        state["step"] += live
        state["exp_avg"].lerp_(grad, (1 - beta1) * live)
        state["exp_avg_sq"].mul_(1 - (1 - beta2) * live).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].clamp(min=1).double()  # 1 - 0.999**t loses digits in fp32
        correction1, correction2 = (1 - beta1 ** step).float(), (1 - beta2 ** step).float()
        # m / c1 / (sqrt(v / c2) + eps) = m / (sqrt(v) * c1 / sqrt(c2) + eps * c1)
        denom = state["exp_avg_sq"].sqrt().mul_(correction1 / correction2.sqrt()).add_(group["eps"] * correction1)
        update = torch.div(state["exp_avg"], denom, out=denom)
        if group["weight_decay"]:
            update.add_(p.float(), alpha=group["weight_decay"])
        return update, live

    def _layout(self, p: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor, list[int], int, bool]:
        """How ``p`` (flattened) cuts into layers: the layer of each consecutive piece (index
        ``num_layers`` for padding), the layer of each element (int32, on p's device: the trust ratios
        are gathered by it, 4 bytes per element kept for the run), the pieces' lengths, the number of
        layers, and whether ``p`` is one data-parallel rank's partition of a flat buffer. Computed once
        per tensor."""
        key = (group[TENSORS_KEY], p.data_ptr(), p.numel())
        if key in self._layouts:
            return self._layouts[key]
        tensors = self._tensors[group[TENSORS_KEY]]
        if any(t is p for t in tensors):  # a tensor of the model, as built
            layers, lengths, num_layers, partitioned = [0], [p.numel()], 1, False
        else:  # DeepSpeed's flat master buffer of the group, or this rank's partition of it
            base = min(t.data_ptr() for t in tensors)
            spans = sorted(((t.data_ptr() - base) // t.element_size(), t.numel(), i) for i, t in enumerate(tensors))
            total = spans[-1][0] + spans[-1][1]
            world = dist.get_world_size(_data_parallel_group(group)) if dist.is_initialized() else 1
            partitioned = world > 1 and p.numel() != total  # ZeRO 0 keeps a whole, unpadded copy per rank
            start = dist.get_rank(_data_parallel_group(group)) * p.numel() if partitioned else 0
            layers, lengths = _pieces(spans, len(tensors), start, start + p.numel())
            num_layers = len(tensors)
        layer_of_piece = torch.tensor(layers, device=p.device)
        layer_of_element = layer_of_piece.to(torch.int32).repeat_interleave(
            torch.tensor(lengths, device=p.device), output_size=p.numel())
        layout = (layer_of_piece, layer_of_element, lengths, num_layers, partitioned)
        self._layouts[key] = layout
        return layout


def _pieces(spans: list[tuple[int, int, int]], pad: int, start: int, end: int) -> tuple[list[int], list[int]]:
    """The consecutive pieces of ``[start, end)``: layer index (``pad`` for the gaps and the tail)
    and length, from the layers' (offset, length, index) sorted by offset."""
    layers, lengths, position = [], [], start
    for offset, length, index in spans + [(end, 0, pad)]:
        gap_end = min(offset, end)
        if gap_end > position:
            layers.append(pad)
            lengths.append(gap_end - position)
            position = gap_end
        overlap_end = min(offset + length, end)
        if overlap_end > position:
            layers.append(index)
            lengths.append(overlap_end - position)
            position = overlap_end
    return layers, lengths


def _squares_per_layer(p: Tensor, update: Tensor, layer_of_piece: Tensor, lengths: list[int],
                       num_layers: int) -> tuple[Tensor, Tensor]:
    """Sums of squares of ``p`` and ``update`` per layer (one more entry for the padding)."""
    w_sq = torch.stack(torch._foreach_norm(p.float().view(-1).split(lengths))) ** 2
    u_sq = torch.stack(torch._foreach_norm(update.view(-1).split(lengths))) ** 2
    zeros = w_sq.new_zeros(num_layers + 1)
    return zeros.index_add(0, layer_of_piece, w_sq), zeros.index_add(0, layer_of_piece, u_sq)


def _data_parallel_group(group: dict[str, Any]):
    """The process group over which DeepSpeed partitions this parameter group."""
    from ..modeling.deepspeed_moe import param_group_process_group

    return param_group_process_group(group)
