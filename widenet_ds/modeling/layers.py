"""Encoder building blocks: embeddings, attention, FFN (the MoE is in moe.py), blocks and the encoder.

Read top to bottom. Shapes: the legend in ``widenet_ds.modeling``. Module names follow Hugging
Face ALBERT where the roles match, so ALBERT weights map onto them by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WideNetConfig
from .moe import MoEFeedForward, RoutingStats

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
            if config.num_experts > 1 and (i + 1) % moe_every == 0:  # every expert starts from one FFN's weights
                return MoEFeedForward(config, settings, FeedForward(config))
            return FeedForward(config)

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
