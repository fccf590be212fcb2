"""Vision transformers on the WideNet encoder: a patch-embedding front and a classification head around
the same ``Encoder`` the text models use (shared attention, one shared MoE, a LayerNorm pair per block).

Shape suffixes: B batch, C channels, P pixels per side, T tokens (patches + the class token), H hidden,
L labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import ModelOutput

from ..config import WideNetVisionConfig
from .layers import Encoder
from .models import WideNetModelOutput, WideNetPreTrainedModel, _sum_losses, combine_aux_loss


class PatchEmbeddings(nn.Module):
    """Image -> tokens: each ``patch_size`` x ``patch_size`` patch projected to ``hidden_size`` (a convolution of
    that stride), a learned class token in front, learned absolute positions added."""

    def __init__(self, config: WideNetVisionConfig):
        super().__init__()
        self.image_size, self.num_channels = config.image_size, config.num_channels
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                    stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values_BCPP: Tensor) -> Tensor:
        B, C, height, width = pixel_values_BCPP.shape
        if (C, height, width) != (self.num_channels, self.image_size, self.image_size):
            raise ValueError(f"expected images of shape ({self.num_channels}, {self.image_size}, {self.image_size}) "
                             f"(num_channels, image_size, image_size), got ({C}, {height}, {width}): resize them "
                             "with the model's image processor")
        x_BTH = self.projection(pixel_values_BCPP).flatten(2).transpose(1, 2)  # (B, patches, H)
        x_BTH = torch.cat([self.cls_token.expand(B, -1, -1), x_BTH], dim=1)
        return self.dropout(x_BTH + self.position_embeddings)


@dataclass
class WideNetImageClassifierOutput(ModelOutput):
    loss: Tensor | None = None  # task loss + aux_loss
    task_loss: Tensor | None = None  # cross-entropy (against soft targets when the labels are a distribution)
    aux_loss: Tensor | None = None
    logits: Tensor | None = None  # (B, L)
    expert_counts: Tensor | None = None
    dropped_fraction: Tensor | None = None


class WideNetVisionPreTrainedModel(WideNetPreTrainedModel):
    config_class = WideNetVisionConfig
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PatchEmbeddings):  # ViT: truncated normal class token and positions
            for param in (module.cls_token, module.position_embeddings):
                nn.init.trunc_normal_(param, std=self.config.initializer_range)


class WideNetVisionModel(WideNetVisionPreTrainedModel):
    """Patch embeddings + the encoder; ``pooler_output`` is the class token after the final LayerNorm (or, with
    ``pooling='mean'``, the mean of the patch tokens)."""

    def __init__(self, config: WideNetVisionConfig):
        super().__init__(config)
        self.embeddings = PatchEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_init()

    def forward(self, pixel_values: Tensor, **kwargs) -> WideNetModelOutput:
        x, routing = self.encoder(self.embeddings(pixel_values))
        return WideNetModelOutput(
            last_hidden_state=x,
            pooler_output=x[:, 0] if self.config.pooling == "token" else x[:, 1:].mean(1),
            aux_loss=combine_aux_loss(routing, self.config.moe_settings.aux_loss_coef),
            expert_counts=torch.stack([r.expert_counts for r in routing]) if routing else None,
            dropped_fraction=torch.stack([r.dropped_fraction for r in routing]) if routing else None,
        )


class WideNetForImageClassification(WideNetVisionPreTrainedModel):
    """Vision encoder + a linear classifier on the class token.

    ``labels`` are class indices (B,) or target distributions (B, L) (mixup / cutmix / label smoothing);
    the loss is the cross-entropy against either."""

    def __init__(self, config: WideNetVisionConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.widenet = WideNetVisionModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None, **kwargs) -> WideNetImageClassifierOutput:
        out = self.widenet(pixel_values)
        logits = self.classifier(self.dropout(out.pooler_output))
        task_loss = None if labels is None else F.cross_entropy(logits.float(), labels.float() if
                                                                labels.is_floating_point() else labels)
        return WideNetImageClassifierOutput(
            loss=None if task_loss is None else _sum_losses(task_loss, out.aux_loss),
            task_loss=task_loss, aux_loss=out.aux_loss, logits=logits,
            expert_counts=out.expert_counts, dropped_fraction=out.dropped_fraction)


def image_processor_for(config: WideNetVisionConfig, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                        std: tuple[float, ...] = (0.5, 0.5, 0.5)):
    """The Hugging Face image processor saved beside the model: resize to ``image_size`` and normalise
    (ViT's mean and std of 0.5 by default) -- what evaluation-time inputs go through."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": config.image_size, "width": config.image_size},
                                image_mean=list(mean), image_std=list(std), do_resize=True, do_normalize=True)
