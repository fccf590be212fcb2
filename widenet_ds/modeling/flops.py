"""Model FLOPs of WideNet / ALBERT / BERT pretraining steps: the formula of benchmarks/README.md ("The FLOP
formula"), shared by the benchmark and the pretraining job's ``model_tflop_per_s_per_gpu``.

FLOPs count matmuls only (2 per multiply-add; backward = 2 x forward), and for an MoE only the routes kept
within capacity (``kept_routes``), not the empty capacity slots the experts may also compute.
"""

from __future__ import annotations

import torch

from ..config import WideNetConfig


def forward_flops(config: WideNetConfig, batch: int, seq: int, kept_routes_per_call, encoder_only: bool = False,
                  mlm_positions: float | None = None, tokens: int | None = None):
    """Forward matmul FLOPs (2 per multiply-add) of one batch; see benchmarks/README.md.

    ``kept_routes_per_call``: routes kept within capacity in one MoE call (all tokens of the batch),
    averaged over the calls (a number or a device tensor); dense models ignore it. ``mlm_positions``:
    positions per sequence the MLM head runs at (default: every position). ``tokens``: count the
    token-wise work for this many tokens instead of batch x seq (the real tokens of a padded batch;
    each still attends over seq positions).
    """
    n = batch * seq if tokens is None else tokens
    h, i, e, v = config.hidden_size, config.intermediate_size, config.embedding_size, config.vocab_size
    attention = 8 * n * h * h + 4 * n * seq * h  # Q, K, V, O projections + scores and weighted sum
    if config.num_experts > 1:
        ffn = 2 * n * h * config.num_experts + 4 * h * i * kept_routes_per_call  # router + kept routes' experts
    else:
        ffn = 4 * n * h * i
    stack = config.num_hidden_layers * (attention + ffn)
    if encoder_only:
        return stack
    embeddings = 2 * n * e * h  # embedding_size -> hidden projection
    predicted = batch * (seq if mlm_positions is None else mlm_positions)
    heads = 2 * predicted * e * (h + v) + 2 * batch * h * (h + 2)  # MLM dense + decoder, pooler, SOP
    return stack + embeddings + heads


def kept_routes(expert_counts_TE: torch.Tensor, dropped_fraction_T: torch.Tensor) -> torch.Tensor:
    """Routes kept within capacity, summed over the routing calls (a device tensor: no sync)."""
    return (expert_counts_TE.sum(-1).float() * (1 - dropped_fraction_T.float())).sum().detach()


def pretraining_flops(config: WideNetConfig, batch: dict[str, torch.Tensor], out, tokens: int):
    """Model FLOPs (forward + backward) of one pretraining micro-batch: the token-wise work of its ``tokens``
    real tokens (padding left out), the MLM head at its labelled positions, and in an MoE the routes kept
    within capacity (then a device tensor: no host sync). ``batch`` as the collator makes it (on the host)."""
    rows, seq = batch["input_ids"].shape
    positions = batch.get("mlm_positions")
    predicted = None if positions is None else int((positions >= 0).sum()) / rows
    kept = None
    if config.num_experts > 1 and getattr(out, "expert_counts", None) is not None:
        kept = kept_routes(out.expert_counts, out.dropped_fraction) / len(out.expert_counts)
    return 3 * forward_flops(config, rows, seq, kept, mlm_positions=predicted, tokens=tokens)
