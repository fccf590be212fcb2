"""The statistics of a model's blocks against values worked out by hand on crafted models, the safe
loading of models for them, and what the metrics records and TensorBoard get from them."""

import json
import time

import pytest
import torch

from widenet_ds import WideNetConfig, WideNetForPreTraining
from widenet_ds.analysis import ReportError, block_output_cosine, layer_norm_divergence, layer_norm_stats
from widenet_ds.analysis.evaluation import evaluation_statistics
from widenet_ds.analysis.weights import load_weights, resolve_model_folder
from widenet_ds.jobs.loop import MetricWindow
from widenet_ds.jobs.metrics import MetricsWriter, per_block_scalars


def _config(**overrides) -> WideNetConfig:
    return WideNetConfig.from_preset("debug", **overrides)


ALBERT_LIKE = dict(share_layer_norm=True, num_experts=1, top_k=1, pre_layer_norm=False)


def test_divergence_of_a_crafted_vector_set_equals_the_hand_computed_values():
    # blocks (rows) x elements; element (j, i) against the 4 elements of the two other blocks:
    # (0,0): |0-2|+|0-4|+|0-1|+|0-1| = 8 -> 2;  (0,1): 1+3+0+0 -> 1;  (1,0): 2+1+1+1 -> 1.25
    # (1,1): 4+3+3+3 -> 3.25;  (2,0) and (2,1): |1-0|+|1-1|+|1-2|+|1-4| -> 1.25
    vectors = torch.tensor([[0.0, 1.0], [2.0, 4.0], [1.0, 1.0]])
    expected = torch.tensor([[2.0, 1.0], [1.25, 3.25], [1.25, 1.25]])
    torch.testing.assert_close(layer_norm_divergence(vectors), expected)


def test_divergence_agrees_with_the_definition_summed_pair_by_pair():
    vectors = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))
    n, m = vectors.shape
    brute = torch.zeros(n, m)
    for j in range(n):
        for i in range(m):
            others = torch.cat([vectors[k] for k in range(n) if k != j])
            brute[j, i] = (vectors[j, i] - others).abs().mean()
    torch.testing.assert_close(layer_norm_divergence(vectors), brute, rtol=1e-5, atol=1e-6)
    assert layer_norm_divergence(vectors[:1]).eq(0).all()  # one vector: no other block


def test_layer_norm_stats_of_a_crafted_model():
    """Attention-norm gamma of block j set to j everywhere, every other vector constant: the attention
    gamma's divergence is mean_{m != j} |j - m| = 1.5, 1, 1.5 and the rest is 0."""
    model = WideNetForPreTraining(_config())
    with torch.no_grad():
        for j, block in enumerate(model.widenet.encoder.blocks):
            block.attention_norm.weight.fill_(float(j))
            block.ffn_norm.weight.fill_(1.0)
            block.attention_norm.bias.fill_(0.5)
            block.ffn_norm.bias.fill_(-0.25)
    stats = layer_norm_stats(model.state_dict(), model.config.num_hidden_layers)
    assert not stats.shared and set(stats.divergence) == {"attention_norm.gamma", "attention_norm.beta",
                                                          "ffn_norm.gamma", "ffn_norm.beta"}
    hidden = model.config.hidden_size
    torch.testing.assert_close(stats.divergence["attention_norm.gamma"],
                               torch.tensor([1.5, 1.0, 1.5])[:, None].expand(3, hidden))
    assert stats.divergence["ffn_norm.gamma"].eq(0).all() and stats.values("beta").eq(0).all()
    assert stats.per_block("gamma") == pytest.approx([0.75, 0.5, 0.75])  # both norms of the block
    summary = stats.summary()
    assert summary["ln_gamma_divergence"] == pytest.approx(2 / 3) and summary["ln_beta_divergence"] == 0


def test_a_shared_layer_norm_pair_is_zero_by_construction():
    model = WideNetForPreTraining(_config(**ALBERT_LIKE))
    with torch.no_grad():
        model.widenet.encoder.blocks[0].attention_norm.weight.uniform_(0.5, 1.5)  # any values: still 0
    stats = layer_norm_stats(model.state_dict(), model.config.num_hidden_layers)
    assert stats.shared and stats.num_layers == 3
    assert stats.values("gamma").eq(0).all() and stats.per_block("gamma") == [0.0, 0.0, 0.0]


def _batches(count: int, vocab: int = 512) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(count):
        ids = torch.randint(5, vocab, (3, 9), generator=g)
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, 6:] = 0  # padding the statistic must leave out
        mask[2, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def _reference_cosine(model, batches) -> list[float]:
    """Block outputs from running the encoder's blocks one by one, cosine as x.y / (|x| |y|) per real token."""
    base = model.widenet
    sums, tokens = torch.zeros(base.config.num_hidden_layers - 1, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            x = base.embeddings(batch["input_ids"], batch["token_type_ids"])
            mask = batch["attention_mask"]
            outputs = []
            for i in range(base.config.num_hidden_layers):
                block, attention, ffn = base.encoder.layer_modules(i)
                x, _ = block(x, attention, ffn, mask.bool()[:, None, None, :], mask)
                outputs.append(x.double())
            real = mask.bool()
            for j in range(len(outputs) - 1):
                a, b = outputs[j][real], outputs[j + 1][real]
                sums[j] += ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum()
            tokens += int(real.sum())
    return (sums / tokens).tolist()


@pytest.mark.parametrize("overrides", [{}, ALBERT_LIKE], ids=["widenet", "albert-like"])
def test_block_cosine_matches_the_block_by_block_computation(overrides):
    model = WideNetForPreTraining(_config(**overrides))
    model.train()
    batches = _batches(3)
    expected = _reference_cosine(model.eval(), batches[:2])
    model.train()
    got = block_output_cosine(model, batches, max_batches=2)  # the third batch is not read
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6) and len(got) == 2
    assert model.training  # the caller's mode comes back
    assert got != pytest.approx(_reference_cosine(model.eval(), batches), rel=1e-7)


def test_blocks_that_add_nothing_have_cosine_one():
    """Attention and FFN outputs zeroed in a pre-LN dense model: every block returns its input."""
    model = WideNetForPreTraining(_config(num_experts=1, top_k=1))
    with torch.no_grad():
        for module in (*model.widenet.encoder.attention, *model.widenet.encoder.ffn):
            out = module.dense if hasattr(module, "dense") else module.ffn_output
            out.weight.zero_()
            out.bias.zero_()
    assert block_output_cosine(model, _batches(1), max_batches=1) == pytest.approx([1.0, 1.0], abs=1e-6)


def test_evaluation_statistics_hold_the_layer_norm_and_cosine_values():
    model = WideNetForPreTraining(_config())
    record = evaluation_statistics(model, _batches(2), max_batches=2)
    stats = layer_norm_stats(model.state_dict(), 3)
    assert record["ln_gamma_divergence"] == pytest.approx(stats.values("gamma").mean().item())
    assert len(record["ln_beta_divergence_per_block"]) == 3 and len(record["block_cosine"]) == 2
    assert record["block_cosine_mean"] == pytest.approx(sum(record["block_cosine"]) / 2)
    assert json.loads(json.dumps(record)) == record  # plain numbers and lists for metrics.jsonl


def test_weights_load_from_an_export_and_its_run_and_refuse_other_folders(tmp_path):
    model = WideNetForPreTraining(_config())
    run = tmp_path / "run"
    model.save_pretrained(run / "final")
    config, state = load_weights(run)
    assert resolve_model_folder(run) == run / "final" and config.num_hidden_layers == 3
    key = "widenet.encoder.blocks.1.ffn_norm.weight"
    torch.testing.assert_close(state[key], model.state_dict()[key])

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(model.config.to_json_string())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # a pickle is never read
    with pytest.raises(ReportError, match="holds no model"):
        load_weights(pickled)
    with pytest.raises(ReportError, match="no such folder"):
        load_weights(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(model.config.to_json_string())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ReportError, match="not readable safetensors"):
        load_weights(broken)


def test_per_block_lists_become_one_tensorboard_scalar_per_block():
    load = [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]
    scalars = dict(per_block_scalars("expert_load", load))
    assert scalars["expert_load/block_00/expert_00"] == 0.5 and scalars["expert_load/block_01/expert_03"] == 0.25
    assert scalars["expert_imbalance/block_00"] == 2.0 and scalars["expert_imbalance/block_01"] == 1.0
    assert dict(per_block_scalars("dropped_fraction", [0.1, 0.0])) == {"dropped_fraction/block_00": 0.1,
                                                                        "dropped_fraction/block_01": 0.0}
    assert list(dict(per_block_scalars("block_cosine", [0.9, 0.8]))) == ["block_cosine/blocks_00_01",
                                                                          "block_cosine/blocks_01_02"]
    assert per_block_scalars("loss", 1.0) == []


def test_records_carry_time_continued_after_a_resume_and_tokens_seen(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["time"]
    resumed = MetricsWriter(tmp_path, enabled=True)
    assert resumed.start <= time.perf_counter() - first  # continues from the file's time
    resumed.write({"step": 2, "loss": 0.5})
    resumed.close()
    times = [json.loads(line)["time"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert times[1] >= times[0] >= 0

    class Out:
        loss = torch.tensor(1.0)

    window = MetricWindow(tokens_seen=100)
    window.add(Out(), tokens=7)
    assert window.record(step=1, lr=0.1, world=2)["tokens"] == 114
    window.reset()
    window.add(Out(), tokens=3)
    assert window.record(step=2, lr=0.1, world=2)["tokens"] == 120
