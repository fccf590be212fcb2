"""What a training job adds to each evaluation record: the LayerNorm divergence of its current weights
and the cosine similarity of consecutive blocks' outputs on held-out batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from .layernorm import layer_norm_stats
from .similarity import block_output_cosine


def evaluation_statistics(model: nn.Module, batches: Iterable[dict[str, Tensor]],
                          max_batches: int) -> dict[str, Any]:
    """``ln_{gamma,beta}_divergence`` (mean), ``..._per_block`` (list), ``block_cosine`` (one value per
    pair of consecutive blocks) and ``block_cosine_mean``. Every rank calls it (the MoE may communicate)."""
    base = getattr(model, "widenet", model)
    record: dict[str, Any] = {}
    try:
        stats = layer_norm_stats(dict(model.named_parameters()), base.config.num_hidden_layers)
        record.update(stats.summary())
    except ValueError:  # a model without per-block LayerNorms: nothing to record
        pass
    cosine = block_output_cosine(model, batches, max_batches)
    if cosine:
        record["block_cosine"] = cosine
        record["block_cosine_mean"] = sum(cosine) / len(cosine)
    return record
