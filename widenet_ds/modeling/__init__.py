"""WideNet as nn.Modules: no engine, optimizer, checkpoint I/O, compile or launch code here.

Files, in reading order:

- layers.py: embeddings, attention, the dense FFN, blocks, the encoder.
- moe.py: the MoE feed-forward layer (``MoEFeedForward``) and its forward, top to bottom:
  route (gate.py), pack (packing.py), dispatch (dispatch.py), experts (experts.py), combine.
- gate.py: the router (``WideNetGate``, ``top_k_route``, its result ``Routing``).
- packing.py: index maps from routes to expert slots or packed rows.
- dispatch.py: gathers between tokens and slots, the expert-parallel all-to-all.
- experts.py: the experts' batched and grouped matmuls; fused_act.py: their Triton kernel.
- deepspeed_moe.py: every DeepSpeed MoE internal used (the module tree, checkpoint key names,
  the all-to-all), in one place.
- models.py: the Hugging Face model classes; vision.py: the image classifier; flops.py: FLOP counts.

Shape legend. A tensor's name ends with its dimensions (``x_BTH`` is (B, T, H)):

    B  batch (sequences)                  T  positions per sequence
    H  hidden size (model width)          I  inner width of an FFN / expert
    S  tokens routed in one call (B*T)    E  experts (global)
    K  routes per token (top-k)           R  routes, K*S, every first choice before any second
    C  capacity: slots per expert         X  expert slots E*C, or packed rows of the grouped experts
    G  expert-parallel ranks (ep_size)    L  local experts of a rank (E / G)
    N  slots per local expert over the group (G*C)
    Q  packed rows of the slots an expert-parallel rank received
    J  routing calls of one forward (one per block that runs the MoE)
    P  MLM positions per sequence (``mlm_positions``)    V  vocabulary
    2  two rows (``counts_2E``: received, kept); 1 a broadcast dimension (``mask_B11T``)

Lower-case ``i``/``o`` are a linear layer's in and out features where they may be H or I.
"""

from .experts import BatchedExperts
from .gate import Routing, WideNetGate, expert_capacity, load_balance_loss, top_k_route
from .layers import Attention, Block, Embeddings, Encoder, FeedForward
from .moe import GatherMOELayer, MoEFeedForward, RoutingStats
from .models import (
                     WideNetForMaskedLM,
                     WideNetForPreTraining,
                     WideNetForQuestionAnswering,
                     WideNetForSequenceClassification,
                     WideNetModel,
                     WideNetPreTrainedModel,
                     at_positions,
                     combine_aux_loss,
                     mlm_labels_at,
)
from .vision import (
    PatchEmbeddings,
    WideNetForImageClassification,
    WideNetVisionModel,
    WideNetVisionPreTrainedModel,
    image_processor_for,
)

__all__ = [
    "Attention", "BatchedExperts", "Block", "Embeddings", "Encoder", "FeedForward", "GatherMOELayer",
    "MoEFeedForward", "PatchEmbeddings", "Routing", "RoutingStats", "WideNetForImageClassification",
    "WideNetForMaskedLM", "WideNetForPreTraining", "WideNetForQuestionAnswering", "WideNetForSequenceClassification",
    "WideNetGate", "WideNetModel", "WideNetPreTrainedModel", "WideNetVisionModel", "WideNetVisionPreTrainedModel",
    "at_positions", "combine_aux_loss", "expert_capacity", "image_processor_for", "load_balance_loss", "mlm_labels_at",
    "top_k_route",
]
