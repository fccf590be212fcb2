"""Encoder building blocks: embeddings, attention, FFN / MoE, blocks and the encoder.

Read top to bottom. Shape suffixes: B batch, T tokens, H hidden, E experts.
Module names follow Hugging Face ALBERT where the roles match, so ALBERT weights map
onto them by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from ..config import MoESettings, WideNetConfig
from .fast_moe import BatchedExperts, GatherMOELayer
from .gate import WideNetGate

ACTIVATION_FNS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class Embeddings(nn.Module):
    """Word + position + segment embeddings of width embedding_size, projected to hidden_size."""

    def __init__(self, config: WideNetConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.projection = nn.Linear(config.embedding_size, config.hidden_size)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        positions_T = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions_T)
        if token_type_ids is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        else:
            x = x + self.token_type_embeddings.weight[0]
        x = self.dropout(self.LayerNorm(x))  # (B, T, embedding_size)
        return self.projection(x)  # (B, T, H)


class Attention(nn.Module):
    """Multi-head self-attention (PyTorch SDPA; flash / memory-efficient kernels where available)."""

    def __init__(self, config: WideNetConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x_BTH: Tensor, mask_B11T: Tensor | None) -> Tensor:
        B, T, H = x_BTH.shape
        q, k, v = (proj(x_BTH).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))  # (B, heads, T, H/heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11T,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return self.dense(y.transpose(1, 2).reshape(B, T, H))


class FeedForward(nn.Module):
    """Position-wise FFN; also the expert of the MoE."""

    def __init__(self, config: WideNetConfig):
        super().__init__()
        self.ffn = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATION_FNS[config.hidden_act]
        self.act_name = config.hidden_act

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_output(self.act(self.ffn(x)))


@dataclass
class RoutingStats:
    """What one routing call reports (one call per block that runs the MoE)."""

    l_aux: Tensor  # load-balance loss of this call (scalar, differentiable)
    expert_counts: Tensor  # (E,) routes each expert received, before capacity
    dropped_fraction: Tensor  # share of routes dropped by the capacity limit (scalar)


class MoEFeedForward(nn.Module):
    """DeepSpeed's MoE layer (experts, expert parallelism, checkpoint layout) with WideNet's gate,
    and the fast subclasses of its MOELayer and Experts (``moe.impl``)."""

    def __init__(self, config: WideNetConfig, settings: MoESettings):
        super().__init__()
        self.moe = MoE(config.hidden_size, FeedForward(config), num_experts=config.num_experts,
                       ep_size=settings.ep_size, k=config.top_k, min_capacity=settings.min_capacity,
                       capacity_factor=settings.capacity_factor,
                       eval_capacity_factor=settings.eval_capacity_factor,
                       drop_tokens=settings.drop_tokens, use_rts=False, use_tutel=False,
                       top2_2nd_expert_sampling=False)
        self.moe.deepspeed_moe.gate = WideNetGate(
            config.hidden_size, config.num_experts, config.top_k, settings.capacity_factor,
            settings.eval_capacity_factor, settings.min_capacity, settings.drop_tokens,
            noise=config.router_noise, noise_std=config.noise_std, normalize=config.router_normalize_top_k)
        self.moe.deepspeed_moe.experts = BatchedExperts(self.moe.deepspeed_moe.experts)
        self.moe.deepspeed_moe = GatherMOELayer(self.moe.deepspeed_moe)
        self.use_impl(settings.impl)

    @property
    def gate(self) -> WideNetGate:
        return self.moe.deepspeed_moe.gate

    @property
    def experts(self) -> BatchedExperts:
        return self.moe.deepspeed_moe.experts

    def use_impl(self, impl: str) -> None:
        """'batched' (sync-free router, gather dispatch/combine, batched experts; widenet_ds/modeling/
        fast_moe.py), 'grouped' (the same, with the kept routes packed into grouped matmuls; with expert
        parallelism the filled slots each rank received) or 'deepspeed' (the reference router in DeepSpeed's MOELayer and expert loop).
        All compute the same function of the same parameters."""
        fast = impl in ("batched", "grouped")
        self.gate.fast_routing = self.moe.deepspeed_moe.fast = self.experts.batched = fast
        self.moe.deepspeed_moe.grouped = impl == "grouped"

    def apply_settings(self, settings: MoESettings) -> None:
        """Change capacity, dropping, impl and lambda at run time (ep_size is fixed at build time)."""
        assert settings.ep_size == self.moe.ep_size, "ep_size is fixed when the model is built"
        for name in ("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens"):
            setattr(self.gate, name, getattr(settings, name))
        self.use_impl(settings.impl)

    def forward(self, x_BTH: Tensor, token_mask_BT: Tensor | None) -> tuple[Tensor, RoutingStats]:
        used_S = None if token_mask_BT is None else token_mask_BT.reshape(-1)
        y_BTH, l_aux, counts_2E = self.moe(x_BTH, used_S)
        routed, kept = counts_2E[0], counts_2E[1]
        dropped = 1.0 - kept.sum().float() / routed.sum().clamp(min=1).float()
        return y_BTH, RoutingStats(l_aux, routed, dropped)


class Block(nn.Module):
    """One block: its own LayerNorm pair around the (possibly shared) attention and FFN/MoE."""

    def __init__(self, config: WideNetConfig):
        super().__init__()
        self.pre_layer_norm = config.pre_layer_norm
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, attention: Attention, ffn: nn.Module, mask_B11T: Tensor | None,
                token_mask_BT: Tensor | None) -> tuple[Tensor, RoutingStats | None]:
        if self.pre_layer_norm:
            x = x + self.dropout(attention(self.attention_norm(x), mask_B11T))
            y, stats = _run_ffn(ffn, self.ffn_norm(x), token_mask_BT)
            return x + self.dropout(y), stats
        x = self.attention_norm(x + self.dropout(attention(x, mask_B11T)))
        y, stats = _run_ffn(ffn, x, token_mask_BT)
        return self.ffn_norm(x + self.dropout(y)), stats


def _run_ffn(ffn: nn.Module, x: Tensor, token_mask_BT: Tensor | None) -> tuple[Tensor, RoutingStats | None]:
    if isinstance(ffn, MoEFeedForward):
        return ffn(x, token_mask_BT)
    return ffn(x), None


class Encoder(nn.Module):
    """N blocks. Shared attention / FFN / LayerNorms are one module each, registered once
    here and called from the loop by index (``attention[0]`` for every block when shared)."""

    def __init__(self, config: WideNetConfig):
        super().__init__()
        n = config.num_hidden_layers
        settings = config.moe_settings

        moe_every = getattr(config, "moe_every", 1)  # a vision config may put the MoE in every k-th block only

        def make_ffn(i: int) -> nn.Module:
            is_moe = config.num_experts > 1 and (i + 1) % moe_every == 0
            return MoEFeedForward(config, settings) if is_moe else FeedForward(config)

        self.attention = nn.ModuleList(Attention(config) for _ in range(1 if config.share_attention else n))
        self.ffn = nn.ModuleList(make_ffn(i) for i in range(1 if config.share_ffn else n))
        self.blocks = nn.ModuleList(Block(config) for _ in range(1 if config.share_layer_norm else n))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) \
            if config.pre_layer_norm else nn.Identity()
        self.num_layers = n
        self.gradient_checkpointing = False

    def layer_modules(self, i: int) -> tuple[Block, Attention, nn.Module]:
        """The block, attention and FFN that layer i runs."""
        pick = lambda modules: modules[i if len(modules) > 1 else 0]  # noqa: E731
        return pick(self.blocks), pick(self.attention), pick(self.ffn)

    @torch.compiler.disable
    def agree_token_counts(self, x_BTH: Tensor) -> None:
        """Once per forward: the expert-parallel ranks agree on the largest token count, which sets
        every routing call's capacity (WideNetGate.agree_token_count). A graph break when compiled."""
        for ffn in self.ffn:
            if isinstance(ffn, MoEFeedForward):
                ffn.gate.agree_token_count(x_BTH.shape[0] * x_BTH.shape[1], x_BTH.device)

    def forward(self, x_BTH: Tensor, attention_mask_BT: Tensor | None = None) -> tuple[Tensor, list[RoutingStats]]:
        mask_B11T = None if attention_mask_BT is None else attention_mask_BT.bool()[:, None, None, :]
        if any(isinstance(f, MoEFeedForward) and f.moe.ep_size > 1 and f.gate.drop_tokens for f in self.ffn):
            self.agree_token_counts(x_BTH)
        routing: list[RoutingStats] = []
        for i in range(self.num_layers):
            block, attention, ffn = self.layer_modules(i)
            if self.gradient_checkpointing and self.training:
                x_BTH, stats = torch.utils.checkpoint.checkpoint(
                    block, x_BTH, attention, ffn, mask_B11T, attention_mask_BT, use_reentrant=False)
            else:
                x_BTH, stats = block(x_BTH, attention, ffn, mask_B11T, attention_mask_BT)
            if stats is not None:
                routing.append(stats)
        return self.final_norm(x_BTH), routing
