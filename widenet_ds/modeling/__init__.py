"""WideNet as nn.Modules: no engine, optimizer, checkpoint I/O or launch code here."""

from .gate import WideNetGate, expert_capacity, load_balance_loss, top_k_route
from .layers import Attention, Block, Embeddings, Encoder, FeedForward, MoEFeedForward, RoutingStats
from .models import (WideNetForMaskedLM, WideNetForPreTraining, WideNetForSequenceClassification, WideNetModel,
                     WideNetPreTrainedModel, combine_aux_loss)

__all__ = [
    "Attention", "Block", "Embeddings", "Encoder", "FeedForward", "MoEFeedForward", "RoutingStats", "WideNetGate",
    "WideNetForMaskedLM", "WideNetForPreTraining", "WideNetForSequenceClassification", "WideNetModel",
    "WideNetPreTrainedModel", "combine_aux_loss", "expert_capacity", "load_balance_loss", "top_k_route",
]
