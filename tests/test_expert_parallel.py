"""Expert parallelism with DeepSpeed's MoE on 2 CPU processes (gloo): each rank holds half
the experts and the ep_size=2 model computes what the ep_size=1 model computes; at ep_size 2
the fast MoE paths (moe.impl "batched", "grouped") compute what DeepSpeed's reference path computes."""

import os
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from widenet_ds import WideNetConfig, WideNetForPreTraining
from widenet_ds.distributed import close_distributed, free_port, init_distributed
from widenet_ds.engine.expert_sharding import local_expert_range, to_local_experts
from widenet_ds.engine.compile import compile_model
from widenet_ds.modeling import GatherMOELayer
from widenet_ds.modeling import experts as experts_module
from widenet_ds.modeling import gate as gate_module

WORLD = 2


def _batch(rank, config):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(5, config.vocab_size, (2, 10 + 3 * rank), generator=g)  # ranks differ in length too
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                sentence_order_label=torch.tensor([0, 1]))


def _forward_backward(model, batch, seed):
    torch.manual_seed(seed)  # same router noise in both models
    out = model(**batch)
    out.loss.backward()
    return out


def _join(rank, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed()


def _worker(rank, port):
    _join(rank, port)
    try:
        _check_parity(rank)
        _check_fast_path_matches_reference_path(rank)
        _check_compiled_model_matches_eager(rank)
    finally:
        close_distributed()


def _check_parity(rank):
    base = WideNetConfig.from_preset("debug", num_experts=4, moe={"drop_tokens": False, "ep_size": 1})
    torch.manual_seed(0)
    reference = WideNetForPreTraining(base).train()  # identical on both ranks
    for impl in ("batched", "grouped"):
        _check_parity_of(rank, impl, base, reference)


def _check_parity_of(rank, impl, base, reference):
    reference.zero_grad(set_to_none=True)
    parallel = WideNetForPreTraining(WideNetConfig.from_preset(
        "debug", num_experts=4, moe={"drop_tokens": False, "ep_size": WORLD, "impl": impl})).train()
    for layer in parallel.moe_layers():
        layer.moe.set_deepspeed_parallelism()
    parallel.load_state_dict(to_local_experts(reference.state_dict(), 4, WORLD, rank))

    experts = parallel.widenet.encoder.ffn[0].moe.deepspeed_moe.experts.deepspeed_experts
    assert len(experts) == 2, "each rank holds half the experts"
    ref_experts = reference.widenet.encoder.ffn[0].moe.deepspeed_moe.experts.deepspeed_experts
    for local, global_index in enumerate(local_expert_range(4, WORLD, rank)):
        assert torch.equal(experts[local].ffn.weight, ref_experts[global_index].ffn.weight)

    batch = _batch(rank, base)
    ref_out = _forward_backward(reference, batch, seed=7 + rank)
    with _counting_grouped_calls() as grouped_calls:
        par_out = _forward_backward(parallel, batch, seed=7 + rank)
    assert len(grouped_calls) == (base.num_hidden_layers if impl == "grouped" else 0), impl
    torch.testing.assert_close(par_out.prediction_logits, ref_out.prediction_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(par_out.loss, ref_out.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(par_out.aux_loss, ref_out.aux_loss)
    assert torch.equal(par_out.expert_counts, ref_out.expert_counts)

    # Non-expert gradients come from this rank's tokens only (no engine, no data-parallel reduction).
    # Expert gradients on rank r hold every rank's tokens routed to its experts: the sum of the
    # reference gradients over ranks.
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, grad in ref_grads.items():
        if "deepspeed_experts" in name:
            dist.all_reduce(grad)
    local_ref_grads = to_local_experts(ref_grads, 4, WORLD, rank)
    for name, param in parallel.named_parameters():
        torch.testing.assert_close(param.grad, local_ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@contextmanager
def _counting_grouped_calls():
    """Records each call of the grouped experts (the received slots packed and run as grouped matmuls)."""
    calls, original = [], GatherMOELayer._grouped_received
    GatherMOELayer._grouped_received = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        yield calls
    finally:
        GatherMOELayer._grouped_received = original


@pytest.mark.distributed
def test_ep2_forward_backward_matches_ep1_on_the_same_weights_and_inputs():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)


def _fused_kernel_worker(rank, port):
    """As ``_worker``, with the grouped experts' fused bias + activation kernel (Triton's interpreter:
    the parent sets TRITON_INTERPRET=1 before the spawn) over the slots each rank received."""
    _join(rank, port)
    calls, fused = [], experts_module.bias_act
    experts_module.bias_act = lambda *args: calls.append(1) or fused(*args)
    try:
        _check_parity(rank)
        _check_fast_path_matches_reference_path(rank)
        assert len(calls) == 2 * WideNetConfig.from_preset("debug").num_hidden_layers, "the fused kernel ran"
    finally:
        experts_module.bias_act = fused
        close_distributed()


@pytest.mark.distributed
def test_ep2_grouped_experts_with_the_fused_kernel_match_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(_fused_kernel_worker, args=(free_port(),), nprocs=WORLD, join=True)


def _check_fast_path_matches_reference_path(rank):
    """ep_size 2, dropping with capacities agreed across the group (ranks differ in length), padding,
    router noise: the batched experts, the grouped experts over the packed received slots and the
    sync-free router give DeepSpeed's loop's results."""
    def build(impl):
        torch.manual_seed(0)
        model = WideNetForPreTraining(WideNetConfig.from_preset(
            "debug", num_experts=4, moe={"ep_size": WORLD, "capacity_factor": 0.6, "min_capacity": 0,
                                         "impl": impl})).train()
        for layer in model.moe_layers():
            layer.moe.set_deepspeed_parallelism()
        return model

    ref = build("deepspeed")
    batch = _batch(rank, ref.config)
    batch["attention_mask"][0, -3:] = 0
    ref_out = _forward_backward(ref, batch, seed=5 + rank)
    assert (ref_out.dropped_fraction > 0).any(), "the case drops routes"
    for impl in ("batched", "grouped"):
        _check_fast_impl(rank, build(impl), ref, ref_out, batch)


def _check_fast_impl(rank, fast, ref, ref_out, batch):
    fast.load_state_dict(ref.state_dict())
    reduce = gate_module.all_reduce_max
    calls = []
    gate_module.all_reduce_max = lambda *a, **k: calls.append(1) or reduce(*a, **k)
    try:
        with _counting_grouped_calls() as grouped_calls:
            fast_out = _forward_backward(fast, batch, seed=5 + rank)
    finally:
        gate_module.all_reduce_max = reduce
    assert len(grouped_calls) == (fast.config.num_hidden_layers if fast.config.moe.get("impl") == "grouped" else 0)
    assert len(calls) == 1 < fast.config.num_hidden_layers, "the capacity is agreed once per forward"
    torch.testing.assert_close(fast_out.prediction_logits, ref_out.prediction_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_out.loss, ref_out.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast_out.aux_loss, ref_out.aux_loss)
    assert torch.equal(fast_out.expert_counts, ref_out.expert_counts)
    ref_grads = dict(ref.named_parameters())
    for name, param in fast.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def _check_compiled_model_matches_eager(rank):
    """compile_model(scope 'model') at ep_size 2: AOT autograd traces the all-to-alls into the graphs
    (a graph break where the ranks agree on the capacity); same outputs and gradients as eager
    (no dropout or router noise: compiled code draws other random numbers). Both fast impls; the
    grouped one also traces the all-to-all of the kept counts."""
    for impl in ("batched", "grouped"):
        _check_compiled_impl_matches_eager(rank, impl)


def _check_compiled_impl_matches_eager(rank, impl):
    def build():
        torch.manual_seed(0)
        model = WideNetForPreTraining(WideNetConfig.from_preset(
            "debug", num_experts=4, router_noise="none", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
            moe={"ep_size": WORLD, "capacity_factor": 0.6, "min_capacity": 0, "impl": impl})).train()
        for layer in model.moe_layers():
            layer.moe.set_deepspeed_parallelism()
        return model

    eager, compiled = build(), build()
    compile_model(compiled, "model", backend="aot_eager")
    batch = _batch(rank, eager.config)
    eager_out = _forward_backward(eager, batch, seed=3)
    with _counting_grouped_calls() as grouped_calls:
        compiled_out = _forward_backward(compiled, batch, seed=3)
    assert bool(grouped_calls) == (impl == "grouped"), impl  # traced: counted while dynamo traces
    assert (eager_out.dropped_fraction > 0).any(), "the case drops routes"
    torch.testing.assert_close(compiled_out.loss, eager_out.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled_out.prediction_logits, eager_out.prediction_logits, atol=1e-5, rtol=1e-5)
    eager_grads = dict(eager.named_parameters())
    for name, param in compiled.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
