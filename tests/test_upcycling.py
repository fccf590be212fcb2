"""Sparse upcycling of a Hugging Face ALBERT: with identical experts, normalised top-2 gates and no
dropped token, the WideNet computes ALBERT's function (parity of the logits)."""

from __future__ import annotations

import pytest
import torch
from transformers import AlbertConfig, AlbertForSequenceClassification

from widenet_ds import WideNetForSequenceClassification
from widenet_ds.config import ConfigError, MoESettings
from widenet_ds.jobs.model_sources import load_start, load_weights

VOCAB = 99


def _albert(tmp_path, num_labels=3, **changes):
    config = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                          hidden_act="gelu_new", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          classifier_dropout_prob=0.0, num_labels=num_labels, **changes)
    torch.manual_seed(3)
    model = AlbertForSequenceClassification(config).eval()
    with torch.no_grad():  # LayerNorms away from the identity, so copying the wrong one would show
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "albert")
    return model


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding
    mask[2, 4:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return dict(input_ids=ids * mask, attention_mask=mask, token_type_ids=types)


def _real_tokens(encoder, batch):
    """Final hidden states of the unpadded tokens (padding is never routed through the MoE)."""
    with torch.no_grad():
        return encoder(**batch).last_hidden_state[batch["attention_mask"].bool()]


def _upcycled(tmp_path, **overrides):
    start = load_start(str(tmp_path / "albert"), 3, overrides, VOCAB)
    start.config.with_moe_settings(MoESettings(drop_tokens=False))  # ample capacity: no token dropped
    model = WideNetForSequenceClassification(start.config)
    load_weights(model, start)
    return model.eval(), start


def test_upcycled_albert_gives_albert_logits_with_padding(tmp_path):
    albert = _albert(tmp_path)
    widenet, start = _upcycled(tmp_path)
    config = start.config
    assert (config.num_experts, config.top_k, config.router_normalize_top_k) == (4, 2, True)
    assert (config.pre_layer_norm, config.share_layer_norm, config.hidden_act) == (False, False, "gelu_new")
    experts = widenet.widenet.encoder.ffn[0].moe.deepspeed_moe.experts.deepspeed_experts
    assert all(torch.equal(e.ffn.weight, experts[0].ffn.weight) for e in experts)
    batch = _batch()
    with torch.no_grad():
        expected = albert(**batch).logits
        got = widenet(**batch)
    torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_real_tokens(widenet.widenet, batch), _real_tokens(albert.albert, batch),
                               atol=1e-5, rtol=1e-5)
    assert got.dropped_fraction.max() == 0
    assert (got.expert_counts > 0).sum() > 2, "the fresh router spreads tokens over several experts"


def test_without_gate_normalisation_the_output_would_be_scaled(tmp_path):
    albert = _albert(tmp_path)
    widenet, _ = _upcycled(tmp_path)
    for layer in widenet.moe_layers():
        layer.gate.normalize = False  # the kept top-2 gates now sum to p1 + p2 < 1
    batch = _batch()
    assert not torch.allclose(_real_tokens(widenet.widenet, batch), _real_tokens(albert.albert, batch), atol=1e-2)


def test_upcycling_takes_the_expert_count_and_refuses_architecture_changes(tmp_path):
    _albert(tmp_path, num_labels=2)  # its classifier does not fit 3 labels: starts fresh
    widenet, start = _upcycled(tmp_path, num_experts=8, hidden_dropout_prob=0.1)
    assert (start.config.num_experts, start.config.hidden_dropout_prob) == (8, 0.1)
    assert "classifier.weight" not in start.weights
    with pytest.raises(ConfigError) as err:
        load_start(str(tmp_path / "albert"), 3, {"hidden_size": 64, "router_normalize_top_k": False}, VOCAB)
    assert "hidden_size=64: the checkpoint has hidden_size=32" in str(err.value)
    assert "router_normalize_top_k=False" in str(err.value)
    with pytest.raises(ConfigError, match="the tokenizer has 120 tokens but the model's embeddings have 99"):
        load_start(str(tmp_path / "albert"), 3, {}, 120)
