"""Hugging Face model classes: encoder, pretraining (MLM + SOP), MLM, sequence classification and
extractive question answering (start/end logits).

Every output carries the main loss, the MoE aux loss (lambda times the mean of ``l_aux`` over
the forward's routing calls), and per-call expert counts and dropped-token fractions.
``loss`` is main + aux, the value to backpropagate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..config import MoESettings, WideNetConfig
from .layers import ACTIVATION_FNS, Embeddings, Encoder
from .moe import MoEFeedForward, RoutingStats


def combine_aux_loss(routing: list[RoutingStats], coef: float) -> Tensor | None:
    """The one place the MoE load-balance losses become a loss: ``coef`` times their mean over the calls."""
    if not routing:
        return None
    return coef * torch.stack([r.l_aux for r in routing]).mean()


@dataclass
class WideNetModelOutput(ModelOutput):
    last_hidden_state: Tensor | None = None  # (B, T, H)
    pooler_output: Tensor | None = None  # (B, H) tanh(dense([CLS]))
    aux_loss: Tensor | None = None  # lambda / T * sum of per-call l_aux (None without MoE)
    expert_counts: Tensor | None = None  # (J, E) routes per expert, per routing call
    dropped_fraction: Tensor | None = None  # (J,) share of routes dropped, per routing call


@dataclass
class WideNetForPreTrainingOutput(ModelOutput):
    loss: Tensor | None = None  # mlm_loss + sop_loss + aux_loss
    mlm_loss: Tensor | None = None
    sop_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    prediction_logits: Tensor | None = None  # (B, T, V); (B, P, V) at mlm_positions when given
    sop_logits: Tensor | None = None  # (B, 2)
    expert_counts: Tensor | None = None
    dropped_fraction: Tensor | None = None


@dataclass
class WideNetMaskedLMOutput(ModelOutput):
    loss: Tensor | None = None  # mlm_loss + aux_loss
    mlm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    logits: Tensor | None = None  # (B, T, V); (B, P, V) at mlm_positions when given
    expert_counts: Tensor | None = None
    dropped_fraction: Tensor | None = None


@dataclass
class WideNetSequenceClassifierOutput(ModelOutput):
    loss: Tensor | None = None  # task loss + aux_loss
    task_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    logits: Tensor | None = None  # (B, num_labels)
    expert_counts: Tensor | None = None
    dropped_fraction: Tensor | None = None


def _sum_losses(*losses: Tensor | None) -> Tensor | None:
    present = [x for x in losses if x is not None]
    return sum(present) if present else None


class WideNetPreTrainedModel(PreTrainedModel):
    config_class = WideNetConfig
    base_model_prefix = "widenet"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Encoder"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MLMHead):
            nn.init.zeros_(module.bias)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        """Hugging Face's hook (``gradient_checkpointing_enable`` and its successors) for ours."""
        self.set_activation_checkpointing(enable)

    def set_activation_checkpointing(self, enable: bool = True) -> None:
        """Non-reentrant checkpointing of every block (reentrant + ZeRO-2 + shared weights fails)."""
        for module in self.modules():
            if isinstance(module, Encoder):
                module.gradient_checkpointing = enable

    def moe_layers(self) -> list[MoEFeedForward]:
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def apply_moe_settings(self, settings: MoESettings) -> None:
        """Use new run-time MoE settings (e.g. a fine-tuning JSON's) and record them in the config."""
        for layer in self.moe_layers():
            layer.apply_settings(settings)
        self.config.with_moe_settings(settings)


class WideNetModel(WideNetPreTrainedModel):
    """The encoder: embeddings, N blocks, pooler."""

    def __init__(self, config: WideNetConfig):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, **kwargs) -> WideNetModelOutput:
        x = self.embeddings(input_ids, token_type_ids)
        x, routing = self.encoder(x, attention_mask)
        return WideNetModelOutput(
            last_hidden_state=x,
            pooler_output=torch.tanh(self.pooler(x[:, 0])),
            aux_loss=combine_aux_loss(routing, self.config.moe_settings.aux_loss_coef),
            expert_counts=torch.stack([r.expert_counts for r in routing]) if routing else None,
            dropped_fraction=torch.stack([r.dropped_fraction for r in routing]) if routing else None,
        )


class MLMHead(nn.Module):
    """hidden -> embedding_size -> vocab, the decoder tied to the word embeddings."""

    def __init__(self, config: WideNetConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.act = ACTIVATION_FNS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x_BTH: Tensor) -> Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(x_BTH)))) + self.bias  # (B, T, V)


def at_positions(x_BT: Tensor, positions_BP: Tensor) -> Tensor:
    """``x_BT[b, positions_BP[b, p]]`` (B, P, ...) for a (B, T, ...) tensor; position -1 reads position 0."""
    index_BP = positions_BP.clamp(min=0)
    if x_BT.dim() == 3:
        index_BP = index_BP.unsqueeze(-1).expand(-1, -1, x_BT.shape[-1])
    return x_BT.gather(1, index_BP)


def mlm_labels_at(labels_BT: Tensor, positions_BP: Tensor | None) -> Tensor:
    """The labels the MLM logits are scored against: ``labels_BT``, or its values at ``positions_BP``
    (-100 at the -1 padding) when the head ran at those positions only."""
    if positions_BP is None:
        return labels_BT
    return torch.where(positions_BP >= 0, at_positions(labels_BT, positions_BP), -100)


def _mlm(head: MLMHead, hidden_BTH: Tensor, labels_BT: Tensor | None,
         positions_BP: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """MLM logits and loss. With ``positions_BP`` (the collator's ``mlm_positions``: each row's
    predicted positions, -1 padding) the head runs at those B x P positions only (P ~ 15% of T):
    the same loss and gradients, ~85% less of the head's work and of its logits' memory."""
    if positions_BP is not None:
        hidden_BTH = at_positions(hidden_BTH, positions_BP)
    logits = head(hidden_BTH)
    if labels_BT is None:
        return logits, None
    labels = mlm_labels_at(labels_BT, positions_BP)
    return logits, F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class _WithMLMHead(WideNetPreTrainedModel):
    """A model whose ``predictions`` MLM head decodes with the (tied) word embeddings."""

    _tied_weights_keys = {"predictions.decoder.weight": "widenet.embeddings.word_embeddings.weight"}

    def get_output_embeddings(self) -> nn.Linear:
        return self.predictions.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.predictions.decoder = value


class WideNetForPreTraining(_WithMLMHead):
    """Encoder + MLM head + sentence-order-prediction head (ALBERT's pretraining)."""

    def __init__(self, config: WideNetConfig):
        super().__init__(config)
        self.widenet = WideNetModel(config)
        self.predictions = MLMHead(config)
        self.sop_classifier = nn.Sequential(nn.Dropout(config.classifier_dropout_prob),
                                            nn.Linear(config.hidden_size, 2))
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None,
                sentence_order_label: Tensor | None = None, mlm_positions: Tensor | None = None,
                **kwargs) -> WideNetForPreTrainingOutput:
        out = self.widenet(input_ids, attention_mask, token_type_ids)
        logits, mlm_loss = _mlm(self.predictions, out.last_hidden_state, labels, mlm_positions)
        sop_logits = self.sop_classifier(out.pooler_output)
        sop_loss = None if sentence_order_label is None else F.cross_entropy(sop_logits.float(), sentence_order_label)
        main = _sum_losses(mlm_loss, sop_loss)
        return WideNetForPreTrainingOutput(
            loss=None if main is None else _sum_losses(main, out.aux_loss),
            mlm_loss=mlm_loss, sop_loss=sop_loss, aux_loss=out.aux_loss,
            prediction_logits=logits, sop_logits=sop_logits,
            expert_counts=out.expert_counts, dropped_fraction=out.dropped_fraction)


class WideNetForMaskedLM(_WithMLMHead):
    """Encoder + MLM head."""

    def __init__(self, config: WideNetConfig):
        super().__init__(config)
        self.widenet = WideNetModel(config)
        self.predictions = MLMHead(config)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None,
                mlm_positions: Tensor | None = None, **kwargs) -> WideNetMaskedLMOutput:
        out = self.widenet(input_ids, attention_mask, token_type_ids)
        logits, mlm_loss = _mlm(self.predictions, out.last_hidden_state, labels, mlm_positions)
        return WideNetMaskedLMOutput(
            loss=None if mlm_loss is None else _sum_losses(mlm_loss, out.aux_loss),
            mlm_loss=mlm_loss, aux_loss=out.aux_loss, logits=logits,
            expert_counts=out.expert_counts, dropped_fraction=out.dropped_fraction)


class WideNetForSequenceClassification(WideNetPreTrainedModel):
    """Encoder + classifier on the pooled [CLS]: cross-entropy when num_labels > 1,
    mean-squared error when num_labels == 1 (STS-B)."""

    def __init__(self, config: WideNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.widenet = WideNetModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None,
                **kwargs) -> WideNetSequenceClassifierOutput:
        out = self.widenet(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(out.pooler_output))
        task_loss = None
        if labels is not None and self.num_labels == 1:
            task_loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
        elif labels is not None:
            task_loss = F.cross_entropy(logits.float(), labels)
        return WideNetSequenceClassifierOutput(
            loss=None if task_loss is None else _sum_losses(task_loss, out.aux_loss),
            task_loss=task_loss, aux_loss=out.aux_loss, logits=logits,
            expert_counts=out.expert_counts, dropped_fraction=out.dropped_fraction)



@dataclass
class WideNetQuestionAnsweringOutput(ModelOutput):
    loss: Tensor | None = None  # task loss + aux_loss
    task_loss: Tensor | None = None  # mean of the start and end cross-entropies
    aux_loss: Tensor | None = None
    start_logits: Tensor | None = None  # (B, T)
    end_logits: Tensor | None = None  # (B, T)
    expert_counts: Tensor | None = None
    dropped_fraction: Tensor | None = None


class WideNetForQuestionAnswering(WideNetPreTrainedModel):
    """Encoder + a linear span head (``qa_outputs``): a start and an end logit per token. The loss is
    the mean of the start and end cross-entropies; a position outside the sequence is ignored."""

    def __init__(self, config: WideNetConfig):
        super().__init__(config)
        self.widenet = WideNetModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, start_positions: Tensor | None = None,
                end_positions: Tensor | None = None, **kwargs) -> WideNetQuestionAnsweringOutput:
        out = self.widenet(input_ids, attention_mask, token_type_ids)
        start_logits, end_logits = (x.squeeze(-1).contiguous() for x in self.qa_outputs(out.last_hidden_state)
                                    .split(1, dim=-1))
        task_loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            task_loss = (F.cross_entropy(start_logits.float(), start_positions.clamp(0, ignored), ignore_index=ignored)
                         + F.cross_entropy(end_logits.float(), end_positions.clamp(0, ignored), ignore_index=ignored)
                         ) / 2
        return WideNetQuestionAnsweringOutput(
            loss=None if task_loss is None else _sum_losses(task_loss, out.aux_loss),
            task_loss=task_loss, aux_loss=out.aux_loss, start_logits=start_logits, end_logits=end_logits,
            expert_counts=out.expert_counts, dropped_fraction=out.dropped_fraction)
