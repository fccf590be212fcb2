"""Sparse upcycling: a Hugging Face ALBERT checkpoint becomes a post-LN WideNet whose every
expert starts as ALBERT's FFN.

What is copied: the embeddings and ALBERT's embedding -> hidden projection
(``embedding_hidden_mapping_in``), the shared attention (query, key, value, dense), the
attention LayerNorm and the FFN-output LayerNorm into *every* block's ``attention_norm`` /
``ffn_norm`` (WideNet has one pair per block), the FFN (``ffn``, ``ffn_output``) into every
expert, and the pooler and classifier when present (the classifier only if its shape fits).
The router is new.

Gate normalisation: the upcycled config sets ``router_normalize_top_k=True``. Without it the
top-2 gates kept for a token sum to p1 + p2 < 1 and, the experts being identical, the MoE
output would be ALBERT's FFN output scaled by p1 + p2. With it the gates sum to 1 and, as
long as no token is dropped (enough capacity), the upcycled model computes exactly ALBERT's
function; fine-tuning then lets the experts drift apart. (top_k 1 with normalisation is
exact as well.) This is why the normalisation cannot be overridden here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..config import ACTIVATIONS, ConfigError, WideNetConfig
from ..modeling.deepspeed_moe import expert_module_prefix

# Fields an ALBERT checkpoint does not fix: the MoE's shape and router, and dropout.
UPCYCLE_FIELDS = frozenset({"num_experts", "top_k", "router_noise", "router_noise_std", "hidden_dropout_prob",
                            "attention_probs_dropout_prob", "classifier_dropout_prob"})
_LAYER = "encoder.albert_layer_groups.0.albert_layers.0."


def widenet_config_from_albert(albert: Any, num_experts: int = 4, top_k: int = 2) -> WideNetConfig:
    """The WideNet architecture of an ``AlbertConfig``: same sizes, post-LN, shared attention and
    FFN (now an MoE of ``num_experts``), one LayerNorm pair per block, normalised top-k gates."""
    problems = []
    if albert.num_hidden_groups != 1 or albert.inner_group_num != 1:
        problems.append(f"ALBERT with num_hidden_groups {albert.num_hidden_groups} and inner_group_num "
                        f"{albert.inner_group_num}: only 1 and 1 (one shared layer, as every released ALBERT)")
    if albert.hidden_act not in ACTIVATIONS:
        problems.append(f"ALBERT hidden_act {albert.hidden_act!r} is not one of WideNet's {ACTIVATIONS}")
    if getattr(albert, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"ALBERT position_embedding_type {albert.position_embedding_type!r}: only 'absolute'")
    if problems:
        raise ConfigError("ALBERT checkpoint for upcycling", problems)
    return WideNetConfig(
        vocab_size=albert.vocab_size, embedding_size=albert.embedding_size, hidden_size=albert.hidden_size,
        num_hidden_layers=albert.num_hidden_layers, num_attention_heads=albert.num_attention_heads,
        intermediate_size=albert.intermediate_size, hidden_act=albert.hidden_act,
        hidden_dropout_prob=albert.hidden_dropout_prob,
        attention_probs_dropout_prob=albert.attention_probs_dropout_prob,
        classifier_dropout_prob=albert.classifier_dropout_prob,
        max_position_embeddings=albert.max_position_embeddings, type_vocab_size=albert.type_vocab_size,
        initializer_range=albert.initializer_range, layer_norm_eps=albert.layer_norm_eps,
        pre_layer_norm=False, share_attention=True, share_ffn=True, share_layer_norm=False,
        num_experts=num_experts, top_k=min(top_k, num_experts), router_normalize_top_k=True,
        pad_token_id=albert.pad_token_id, bos_token_id=albert.bos_token_id, eos_token_id=albert.eos_token_id)


def _targets(config: WideNetConfig) -> dict[str, list[str]]:
    """ALBERT module (its prefix ``albert.`` removed) -> the WideNet modules it initialises."""
    blocks = range(config.num_hidden_layers)
    experts = ([expert_module_prefix("widenet.encoder.ffn.0", e) for e in range(config.num_experts)]
               if config.num_experts > 1 else ["widenet.encoder.ffn.0."])
    embeddings = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")
    return {
        **{f"embeddings.{name}": [f"widenet.embeddings.{name}"] for name in embeddings},
        "encoder.embedding_hidden_mapping_in": ["widenet.embeddings.projection"],
        **{f"{_LAYER}attention.{name}": [f"widenet.encoder.attention.0.{name}"]
           for name in ("query", "key", "value", "dense")},
        f"{_LAYER}attention.LayerNorm": [f"widenet.encoder.blocks.{i}.attention_norm" for i in blocks],
        f"{_LAYER}full_layer_layer_norm": [f"widenet.encoder.blocks.{i}.ffn_norm" for i in blocks],
        f"{_LAYER}ffn": [f"{expert}ffn" for expert in experts],
        f"{_LAYER}ffn_output": [f"{expert}ffn_output" for expert in experts],
    }


def upcycle_albert_weights(albert_state: dict[str, Tensor], config: WideNetConfig) -> dict[str, Tensor]:
    """WideNet weights (``WideNetForSequenceClassification`` names, every expert under its global
    index) from the state dict of an ``AlbertModel`` / ``AlbertForPreTraining`` /
    ``AlbertForSequenceClassification``. The router, and the pooler and classifier when ALBERT
    has none (or a classifier of another shape), are left out: they start fresh."""
    state = {key.removeprefix("albert."): value for key, value in albert_state.items()}
    out, missing = {}, []
    for source, targets in _targets(config).items():
        params = {name: state.get(f"{source}.{name}") for name in ("weight", "bias")}
        if params["weight"] is None:
            missing.append(f"{source}.weight")
        for target in targets:
            out.update({f"{target}.{name}": value.clone() for name, value in params.items() if value is not None})
    if missing:
        raise ConfigError("ALBERT checkpoint for upcycling", [f"no weight {key}" for key in missing])
    heads = {"pooler": "widenet.pooler"}
    if "classifier.weight" in state and state["classifier.weight"].shape[0] == config.num_labels:
        heads["classifier"] = "classifier"
    for source, target in heads.items():
        out.update({f"{target}.{name}": state[f"{source}.{name}"].clone()
                    for name in ("weight", "bias") if f"{source}.{name}" in state})
    return out
