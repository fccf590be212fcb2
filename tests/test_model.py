"""WideNet built as the paper defines it: sharing, per-block LayerNorms, aux loss, outputs,
and the Hugging Face integration."""

import pytest
import torch
from deepspeed.moe.layer import MoE
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
)

from widenet_ds import (
    MoESettings,
    WideNetConfig,
    WideNetForMaskedLM,
    WideNetForPreTraining,
    WideNetForSequenceClassification,
    WideNetModel,
)


def _batch(config, batch=3, length=12, pad_last=4):
    ids = torch.randint(5, config.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - pad_last:] = 0
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def _layers(model, config):
    return [model.encoder.layer_modules(i) for i in range(config.num_hidden_layers)]


def test_widenet_blocks_share_one_attention_and_one_moe_but_own_their_layernorms():
    config = WideNetConfig.from_preset("debug")
    model = WideNetModel(config)
    layers = _layers(model, config)
    blocks, attentions, ffns = zip(*layers)
    assert all(a is attentions[0] for a in attentions) and all(f is ffns[0] for f in ffns)
    assert len({id(b) for b in blocks}) == config.num_hidden_layers
    norms = [p.data_ptr() for b in blocks for p in b.parameters()]
    assert len(set(norms)) == len(norms) == 4 * config.num_hidden_layers


def test_exactly_one_deepspeed_moe_is_registered_even_counting_aliases():
    model = WideNetForPreTraining(WideNetConfig.from_preset("debug"))
    moes = [name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, MoE)]
    assert moes == ["widenet.encoder.ffn.0.moe"]
    keys = [k for k in model.state_dict() if "deepspeed_experts" in k]
    assert len(keys) == 4 * 4 and all(k.startswith("widenet.encoder.ffn.0.moe.") for k in keys)


def test_albert_shares_layernorms_and_bert_shares_nothing():
    albert_cfg = WideNetConfig.from_preset("debug", num_experts=1, top_k=1, share_layer_norm=True,
                                           pre_layer_norm=False)
    albert = WideNetModel(albert_cfg)
    assert len({id(m) for layer in _layers(albert, albert_cfg) for m in layer}) == 3
    bert_cfg = WideNetConfig.from_preset("debug", num_experts=1, top_k=1, share_attention=False, share_ffn=False)
    bert = WideNetModel(bert_cfg)
    layers = _layers(bert, bert_cfg)
    assert len({id(m) for layer in layers for m in layer}) == 3 * bert_cfg.num_hidden_layers
    assert not any(isinstance(m, MoE) for m in bert.modules())


def test_experts_start_from_different_weights():
    model = WideNetModel(WideNetConfig.from_preset("debug"))
    experts = model.encoder.ffn[0].moe.deepspeed_moe.experts.deepspeed_experts
    weights = [e.ffn.weight for e in experts]
    assert all(not torch.equal(weights[0], w) for w in weights[1:])


def test_aux_loss_is_lambda_over_t_times_the_sum_of_per_call_l_aux():
    config = WideNetConfig.from_preset("debug", moe={"aux_loss_coef": 0.3})
    model = WideNetForPreTraining(config)
    calls = []
    moe = model.widenet.encoder.ffn[0].moe
    moe.register_forward_hook(lambda module, args, out: calls.append((out[1], out[2])))
    batch = _batch(config)
    out = model(**batch, labels=batch["input_ids"], sentence_order_label=torch.tensor([0, 1, 0]))
    T = config.num_hidden_layers
    assert len(calls) == T
    expected = 0.3 / T * sum(l for l, _ in calls)
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, out.mlm_loss + out.sop_loss + expected)
    assert len({l.item() for l, _ in calls}) == T, "each call's l_aux is its own (different inputs per depth)"
    assert out.expert_counts.shape == (T, config.num_experts)
    real_tokens = int(batch["attention_mask"].sum())
    assert (out.expert_counts.sum(1) == config.top_k * real_tokens).all()
    assert torch.equal(out.expert_counts, torch.stack([c[0] for _, c in calls]))


def test_aux_loss_reaches_the_router_through_backward():
    config = WideNetConfig.from_preset("debug")
    model = WideNetForMaskedLM(config)
    out = model(**_batch(config))
    out.aux_loss.backward()
    assert model.widenet.encoder.ffn[0].gate.wg.weight.grad.abs().sum() > 0


def test_dropped_fraction_follows_the_capacity():
    config = WideNetConfig.from_preset("debug", moe={"capacity_factor": 0.25, "eval_capacity_factor": 0.25,
                                                     "min_capacity": 0})
    model = WideNetModel(config).eval()
    out = model(**_batch(config, pad_last=0))
    tokens = 3 * 12
    capacity = -(-0.25 * 2 * tokens // 4)  # ceil(C*K*S/E) = 5 of 18 expected routes per expert
    assert (out.dropped_fraction >= 1 - 4 * capacity / (2 * tokens) - 1e-6).all()
    assert (out.dropped_fraction > 0).all()
    model.apply_moe_settings(MoESettings(drop_tokens=False))
    assert (model(**_batch(config)).dropped_fraction == 0).all()
    assert model.config.moe["drop_tokens"] is False


def test_padding_does_not_change_the_real_tokens_outputs_without_dropping():
    config = WideNetConfig.from_preset("debug", moe={"drop_tokens": False})
    model = WideNetModel(config).eval()
    batch = _batch(config, batch=1, length=8, pad_last=0)
    padded = {k: torch.cat([v, torch.zeros(1, 4, dtype=v.dtype)], 1) for k, v in batch.items()}
    torch.testing.assert_close(model(**padded).last_hidden_state[:, :8], model(**batch).last_hidden_state,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pre_ln", [True, False])
def test_block_order_pre_and_post_layernorm(pre_ln):
    config = WideNetConfig.from_preset("debug", num_experts=1, top_k=1, num_hidden_layers=1, pre_layer_norm=pre_ln)
    model = WideNetModel(config).eval()
    x = torch.randn(2, 5, config.hidden_size)
    block, attention, ffn = model.encoder.layer_modules(0)
    if pre_ln:
        h = x + attention(block.attention_norm(x), None)
        expected = model.encoder.final_norm(h + ffn(block.ffn_norm(h)))
    else:
        h = block.attention_norm(x + attention(x, None))
        expected = block.ffn_norm(h + ffn(h))
    torch.testing.assert_close(model.encoder(x)[0], expected)


def test_attention_matches_a_plain_softmax_reference():
    config = WideNetConfig.from_preset("debug")
    attention = WideNetModel(config).encoder.attention[0]
    x, mask = torch.randn(2, 6, 32), torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    heads = lambda t: t.view(2, 6, 4, 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attention.query(x)), heads(attention.key(x)), heads(attention.value(x))
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = attention.dense((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(attention(x, mask[:, None, None, :]), expected, atol=1e-5, rtol=1e-5)


def test_save_and_load_with_safetensors_and_auto_classes(tmp_path):
    config = WideNetConfig.from_preset("debug", moe={"capacity_factor": 1.5})
    model = WideNetForPreTraining(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "widenet"
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, WideNetForPreTraining)
    assert loaded.widenet.encoder.ffn[0].gate.capacity_factor == 1.5
    batch = _batch(config)
    torch.testing.assert_close(loaded(**batch).prediction_logits, model(**batch).prediction_logits)
    assert loaded.predictions.decoder.weight is loaded.widenet.embeddings.word_embeddings.weight
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(encoder(**batch).last_hidden_state, model.widenet(**batch).last_hidden_state)


def test_sequence_classification_and_regression_heads():
    config = WideNetConfig.from_preset("debug", num_labels=3)
    model = WideNetForSequenceClassification(config)
    batch = _batch(config)
    out = model(**batch, labels=torch.tensor([0, 2, 1]))
    torch.testing.assert_close(out.task_loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2, 1])))
    torch.testing.assert_close(out.loss, out.task_loss + out.aux_loss)
    reg = AutoModelForSequenceClassification.from_config(WideNetConfig.from_preset("debug", num_labels=1))
    scores = torch.tensor([0.5, 3.2, 4.9])
    out = reg(**batch, labels=scores)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.task_loss, ((out.logits.squeeze(-1) - scores) ** 2).mean())


def test_training_a_few_steps_lowers_the_loss_on_a_fixed_batch():
    config = WideNetConfig.from_preset("debug")
    model = WideNetForPreTraining(config)
    batch = _batch(config, pad_last=0)
    labels = torch.where(torch.rand(batch["input_ids"].shape) < 0.3, batch["input_ids"], -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(**batch, labels=labels, sentence_order_label=torch.tensor([0, 1, 1]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("model_class", [WideNetForPreTraining, WideNetForMaskedLM])
def test_mlm_head_at_the_masked_positions_only_gives_the_same_loss_and_gradients(model_class):
    config = WideNetConfig.from_preset("debug", num_hidden_layers=2)
    batch = _batch(config, batch=3, length=12, pad_last=4)
    labels = torch.full((3, 12), -100)
    positions = torch.tensor([[1, 2, 7], [3, 10, -1], [5, -1, -1]])  # -1: padding of rows with fewer
    for row, cols in enumerate(positions.tolist()):
        labels[row, [c for c in cols if c >= 0]] = batch["input_ids"][row, [c for c in cols if c >= 0]]
    extra = {"sentence_order_label": torch.tensor([0, 1, 1])} if model_class is WideNetForPreTraining else {}
    model = model_class(config).eval()  # no router noise: both passes route alike

    def run(**options):
        model.zero_grad()
        out = model(**batch, labels=labels, **extra, **options)
        out.loss.backward()
        logits = out.prediction_logits if model_class is WideNetForPreTraining else out.logits
        return out, logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_logits, full_grads = run()
    at, at_logits, at_grads = run(mlm_positions=positions)
    assert at_logits.shape == (3, 3, config.vocab_size)
    torch.testing.assert_close(at.mlm_loss, full.mlm_loss)
    torch.testing.assert_close(at.loss, full.loss)
    kept = positions >= 0
    torch.testing.assert_close(at_logits[kept], full_logits[torch.nonzero(kept)[:, 0], positions[kept]])
    assert at_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(at_grads[name], full_grads[name], msg=name)
    # the decoder's gradient really comes from the masked rows only (not from the padding's reads)
    assert full_grads["predictions.bias"].abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    config = WideNetConfig.from_preset("debug")
    batch = _batch(config)

    def grads(checkpointing):
        torch.manual_seed(1)
        model = WideNetForMaskedLM(config)
        if checkpointing:
            model.set_activation_checkpointing(True)
        torch.manual_seed(2)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)
