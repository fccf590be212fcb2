"""WideNet as nn.Modules: no engine, optimizer, checkpoint I/O or launch code here."""

from .fast_moe import BatchedExperts, GatherMOELayer
from .gate import (
                     WideNetGate,
                     expert_capacity,
                     load_balance_loss,
                     top_k_route,
                     top_k_route_fast,
)
from .layers import (
                     Attention,
                     Block,
                     Embeddings,
                     Encoder,
                     FeedForward,
                     MoEFeedForward,
                     RoutingStats,
)
from .models import (
                     COMPILE_SCOPES,
                     WideNetForMaskedLM,
                     WideNetForPreTraining,
                     WideNetForQuestionAnswering,
                     WideNetForSequenceClassification,
                     WideNetModel,
                     WideNetPreTrainedModel,
                     at_positions,
                     combine_aux_loss,
                     compile_model,
                     compile_settings,
                     mlm_labels_at,
                     uses_cuda_graphs,
)

__all__ = [
    "COMPILE_SCOPES", "Attention", "BatchedExperts", "Block", "Embeddings", "Encoder", "FeedForward", "GatherMOELayer",
    "MoEFeedForward", "RoutingStats", "WideNetGate", "WideNetForMaskedLM", "WideNetForPreTraining", "WideNetForQuestionAnswering",
    "WideNetForSequenceClassification", "WideNetModel", "WideNetPreTrainedModel", "at_positions", "combine_aux_loss",
    "compile_model", "compile_settings", "expert_capacity", "load_balance_loss", "mlm_labels_at", "top_k_route",
    "top_k_route_fast", "uses_cuda_graphs",
]
