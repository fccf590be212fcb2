"""Hugging Face model classes: encoder, pretraining (MLM + SOP), MLM, sequence classification and
extractive question answering (start/end logits).

Every output carries the main loss, the MoE aux loss ``lambda / T * sum_t l_aux_t`` (T the
routing calls of the forward), and per-call expert counts and dropped-token fractions.
``loss`` is main + aux, the value to backpropagate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..config import MoESettings, WideNetConfig
from .fast_moe import BatchedExperts, GatherMOELayer
from .layers import (
    ACTIVATION_FNS,
    Attention,
    Block,
    Embeddings,
    Encoder,
    FeedForward,
    MoEFeedForward,
    RoutingStats,
)


def combine_aux_loss(routing: list[RoutingStats], coef: float) -> Tensor | None:
    """The one place the MoE load-balance losses become a loss: ``coef / T * sum_t l_aux_t``."""
    if not routing:
        return None
    return coef * torch.stack([r.l_aux for r in routing]).mean()


@dataclass
class WideNetModelOutput(ModelOutput):
    last_hidden_state: Tensor | None = None  # (B, T, H)
    pooler_output: Tensor | None = None  # (B, H) tanh(dense([CLS]))
    aux_loss: Tensor | None = None  # lambda / T * sum of per-call l_aux (None without MoE)
    expert_counts: Tensor | None = None  # (T, E) routes per expert, per routing call
    dropped_fraction: Tensor | None = None  # (T,) share of routes dropped, per routing call


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


COMPILE_SCOPES = ("model", "blocks", "parts")


def compile_settings(variant: str) -> tuple[str, dict[str, Any]]:
    """``'scope[:setting...]'`` -> ``(scope, torch.compile keywords)``; ``'none'`` -> ``('none', {})``.

    A setting is a ``torch.compile`` mode (``torch._inductor.list_mode_options()``, e.g.
    ``reduce-overhead``: CUDA graphs) or an Inductor option ``name[=value]`` (``torch._inductor.config``,
    e.g. ``combo_kernels``; a bare name means True). Examples: ``model``, ``model:reduce-overhead``,
    ``model:max-autotune-no-cudagraphs:combo_kernels``. Raises ``ValueError`` naming every unknown piece.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    scope, *settings = variant.split(":")
    if scope == "none" and not settings:
        return scope, {}
    problems = [] if scope in COMPILE_SCOPES else [f"scope {scope!r}: choose one of {', '.join(COMPILE_SCOPES)}"]
    modes, options = [], {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if setting in list_mode_options():
            modes.append(setting)
        elif _has_option(inductor_config, name):
            options[name] = _option_value(value)
        else:
            problems.append(f"{setting!r} is neither a torch.compile mode ({', '.join(list_mode_options())}) "
                            "nor an Inductor option (torch._inductor.config)")
    if len(modes) > 1:
        problems.append(f"one mode at most, got {', '.join(modes)}")
    if problems:
        raise ValueError(f"compile setting {variant!r}: " + "; ".join(problems))
    if not options:
        return scope, {"mode": modes[0]} if modes else {}
    # torch.compile takes a mode or options, not both: the mode's options, then the ones given
    return scope, {"options": {**(list_mode_options(modes[0]) if modes else {}), **options}}


def uses_cuda_graphs(variant: str) -> bool:
    """Whether a ``compile_settings`` variant records CUDA graphs (``reduce-overhead``, ``max-autotune``,
    ``triton.cudagraphs``)."""
    from torch._inductor import list_mode_options

    _, kwargs = compile_settings(variant)
    options = list_mode_options(kwargs["mode"]) if "mode" in kwargs else kwargs.get("options", {})
    return bool(options.get("triton.cudagraphs", False))


def _has_option(config, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    if not head or not hasattr(config, head):
        return False
    return not rest or _has_option(getattr(config, head), rest)


def _option_value(text: str) -> Any:
    """'' and 'True' -> True, 'False' -> False, integers and floats as numbers, else the text."""
    if text in ("", "True", "False"):
        return text != "False"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def compile_model(model: nn.Module, scope: str = "model", **options) -> nn.Module:
    """``torch.compile`` (with ``options``) a WideNet model or encoder in place; returns it.

    ``scope`` may carry settings (``'model:reduce-overhead'``, see ``compile_settings``); ``options``
    are further ``torch.compile`` keywords. Scopes, largest first (all keep parameter and state-dict names):

    - ``model``: ``model`` as one graph (forward and backward each one compiled region; the fewest
      host operations per step). With expert parallelism the graph breaks where the ranks agree
      on the capacity (a host value), once per MoE call; the all-to-alls compile.
    - ``blocks``: every ``Block`` call (LayerNorms, shared attention, MoE or FFN, residuals) as
      one graph; the embeddings and the MLM head on their own.
    - ``parts``: embeddings, attention, dense FFNs, the MLM head and the MoE layer separately;
      with expert parallelism the MoE layer stays eager and only its batched experts compile.

    Compiled router noise and dropout draw other random numbers than eager (same distributions).
    """
    if scope.split(":")[0] not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {scope!r}: choose one of {', '.join(COMPILE_SCOPES)}")
    scope, settings = compile_settings(scope)
    options = {**settings, **options}
    if scope == "model":
        model.compile(**options)
        return model
    kinds = (Block, Embeddings, MLMHead) if scope == "blocks" else (Embeddings, Attention, FeedForward,
                                                                     BatchedExperts, MLMHead)
    for module in model.modules():
        if isinstance(module, kinds) or scope == "parts" and isinstance(module, GatherMOELayer) \
                and module.ep_size == 1:
            module.compile(**options)
    return model
