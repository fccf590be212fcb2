"""The per-block LayerNorm divergence the WideNet paper uses to argue for one LayerNorm pair per block.

For the vectors ``v_1 .. v_N`` (each of M elements) of one LayerNorm parameter (gamma or beta of
the attention or the FFN/MoE norm) across the N blocks, element i of block j gets

    y[j, i] = 1 / ((N - 1) M) * sum_{m != j} sum_{n} |v[j, i] - v[m, n]|

the mean absolute distance to every element of the other blocks' vectors. Larger values mean
the blocks' norms transform their inputs more differently. A model whose blocks share one
LayerNorm pair (ALBERT) has a single vector per parameter, no other block's vector to compare
with: its statistic is 0 by construction (``LayerNormStats.shared``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

# encoder.blocks.<i>.<attention_norm|ffn_norm>.<weight|bias>, under any model prefix (widenet., ...)
_BLOCK_NORM = re.compile(r"(?:^|\.)encoder\.blocks\.(\d+)\.(attention_norm|ffn_norm)\.(weight|bias)$")
PARAMETER_NAMES = {"weight": "gamma", "bias": "beta"}


def block_layer_norms(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The per-block LayerNorm vectors of a model's weights, stacked: ``{"attention_norm.gamma": (N, M),
    "attention_norm.beta": ..., "ffn_norm.gamma": ..., "ffn_norm.beta": ...}`` in block order, as float32.
    N is 1 for a model whose blocks share one LayerNorm pair."""
    found: dict[str, dict[int, Tensor]] = {}
    for name, value in state.items():
        match = _BLOCK_NORM.search(name)
        if match:
            block, norm, kind = int(match.group(1)), match.group(2), PARAMETER_NAMES[match.group(3)]
            found.setdefault(f"{norm}.{kind}", {})[block] = value.detach().float().cpu().reshape(-1)
    stacked = {}
    for key in sorted(found):
        blocks = found[key]
        if sorted(blocks) != list(range(len(blocks))):
            raise ValueError(f"{key}: blocks {sorted(blocks)} are not numbered 0..{len(blocks) - 1}")
        stacked[key] = torch.stack([blocks[i] for i in range(len(blocks))])
    return stacked


def _sum_abs_distances(values: Tensor, points: Tensor) -> Tensor:
    """``sum_s |v - s|`` over ``points`` for every v in ``values``, in O((V + S) log S) (sorted prefix sums)."""
    points = points.double().sort().values
    prefix = torch.cat([points.new_zeros(1), points.cumsum(0)])
    values = values.double()
    below = torch.searchsorted(points, values, right=True)  # how many points are <= v
    total, count = prefix[-1], points.numel()
    return below * values - prefix[below] + (total - prefix[below]) - (count - below) * values


def layer_norm_divergence(vectors: Tensor) -> Tensor:
    """``y[j, i]`` of the module docstring for one parameter's (N, M) vectors; zeros when N == 1."""
    n, m = vectors.shape
    if n < 2:
        return torch.zeros_like(vectors, dtype=torch.float32)
    flat = vectors.reshape(-1)
    to_all = _sum_abs_distances(flat, flat).reshape(n, m)
    to_own = torch.stack([_sum_abs_distances(vectors[j], vectors[j]) for j in range(n)])
    return ((to_all - to_own) / ((n - 1) * m)).float()


@dataclass
class LayerNormStats:
    """The divergence of every per-block LayerNorm parameter of one model."""

    divergence: dict[str, Tensor]  # "attention_norm.gamma" -> (N, M) values (N = 1 when shared)
    num_layers: int  # blocks the model runs
    shared: bool  # one LayerNorm pair for every block: the statistic is 0 by construction

    def values(self, kind: str) -> Tensor:
        """Every element's value for ``kind`` ("gamma" or "beta"), both norms together (the distribution)."""
        parts = [v.reshape(-1) for k, v in self.divergence.items() if k.endswith("." + kind)]
        return torch.cat(parts) if parts else torch.zeros(0)

    def per_block(self, kind: str) -> list[float]:
        """Mean over the elements (and both norms) of each block, for ``kind``."""
        parts = [v for k, v in self.divergence.items() if k.endswith("." + kind)]
        if not parts:
            return []
        means = torch.stack([p.mean(1) for p in parts]).mean(0)
        return (means.repeat(self.num_layers) if self.shared else means).tolist()

    def summary(self) -> dict[str, float | list[float]]:
        """The values ``metrics.jsonl`` records at every evaluation."""
        out: dict[str, float | list[float]] = {}
        for kind in ("gamma", "beta"):
            values = self.values(kind)
            if values.numel():
                out[f"ln_{kind}_divergence"] = values.mean().item()
                out[f"ln_{kind}_divergence_per_block"] = self.per_block(kind)
        return out


def layer_norm_stats(state: Mapping[str, Tensor], num_layers: int | None = None) -> LayerNormStats:
    """``LayerNormStats`` of a model's weights (a state dict or ``dict(model.named_parameters())``).
    ``num_layers`` (the config's ``num_hidden_layers``) tells a shared LayerNorm pair from a one-block model."""
    vectors = block_layer_norms(state)
    if not vectors:
        raise ValueError("no per-block LayerNorm weights (encoder.blocks.<i>.attention_norm / ffn_norm) found")
    blocks = next(iter(vectors.values())).shape[0]
    layers = num_layers or blocks
    return LayerNormStats({k: layer_norm_divergence(v) for k, v in vectors.items()}, layers,
                          shared=blocks == 1 and layers > 1)
