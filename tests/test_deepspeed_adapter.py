"""Every DeepSpeed MoE internal the package relies on (widenet_ds/modeling/deepspeed_moe.py), checked
against the installed DeepSpeed: names, signatures, attributes, tags, checkpoint key and file names,
and the all-to-all's behaviour. After a DeepSpeed upgrade a failure here names what changed and where
the package depends on it; fix the adapter, not its callers."""

from __future__ import annotations

import inspect
import os
import re

import deepspeed
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from widenet_ds import WideNetConfig, WideNetForPreTraining
from widenet_ds.modeling import deepspeed_moe as ds
from widenet_ds.modeling.gate import Routing

WHERE = "widenet_ds/modeling/deepspeed_moe.py"


def _require(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(f"DeepSpeed {deepspeed.__version__} changed {what}; the package relies on it through {WHERE}",
                    pytrace=False)


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _has_params(fn, names: list[str], what: str) -> None:
    missing = [n for n in names if n not in _params(fn)]
    _require(not missing, f"the signature of {what}: no parameter(s) {missing} (has {_params(fn)})")


def test_the_classes_and_functions_used_exist_with_the_signatures_used():
    _has_params(ds.MoE.__init__, ["hidden_size", "expert", "num_experts", "ep_size", "k", "capacity_factor",
                                  "eval_capacity_factor", "min_capacity", "drop_tokens", "use_rts", "use_tutel",
                                  "top2_2nd_expert_sampling"], "deepspeed.moe.layer.MoE")
    _require(_params(ds.MOELayer.__init__)[:6] == ["self", "gate", "experts", "ep_group_name", "ep_size",
                                                   "num_local_experts"] and "use_tutel" in _params(ds.MOELayer.__init__),
             f"the signature of deepspeed.moe.sharded_moe.MOELayer ({_params(ds.MOELayer.__init__)})")
    _require(_params(ds.TopKGate.__init__)[:7] == ["self", "model_dim", "num_experts", "k", "capacity_factor",
                                                   "eval_capacity_factor", "min_capacity"],
             f"the positional parameters of deepspeed.moe.sharded_moe.TopKGate ({_params(ds.TopKGate.__init__)})")
    _has_params(ds.TopKGate.__init__, ["noisy_gate_policy", "drop_tokens", "use_rts"], "TopKGate")
    _require(_params(ds.Experts.__init__) == ["self", "expert", "num_local_experts", "expert_group_name"],
             f"the signature of deepspeed.moe.experts.Experts ({_params(ds.Experts.__init__)})")
    _require(issubclass(ds._AllToAll, torch.autograd.Function) and _params(ds._AllToAll.forward) == ["ctx", "group",
                                                                                                     "input"],
             "deepspeed.moe.sharded_moe._AllToAll (a private autograd Function forward(ctx, group, input))")
    _has_params(ds.gumbel_rsample, ["shape", "device"], "deepspeed.moe.sharded_moe.gumbel_rsample")
    _has_params(ds.multiplicative_jitter, ["x", "device"], "deepspeed.moe.sharded_moe.multiplicative_jitter")
    _has_params(ds.groups._get_expert_parallel_ranks, ["world_size", "tensor_parallel_size_",
                                                       "expert_parallel_size_", "use_data_before_expert_parallel_"],
                "deepspeed.utils.groups._get_expert_parallel_ranks")
    for name in ("_get_expert_data_parallel_group", "_get_data_parallel_group", "_get_expert_parallel_group_dict"):
        _require(callable(getattr(ds.groups, name, None)), f"deepspeed.utils.groups.{name} (gone)")
    _require(hasattr(ds.groups, "mpu"), "deepspeed.utils.groups.mpu (gone)")


def test_the_module_tree_attributes_and_tags_are_deepspeeds():
    """The MoE layer lives in DeepSpeed's tree: the engine finds ``MoE`` by type, reads these attributes,
    and keeps expert parameters out of the data-parallel all-reduce by their tags."""
    model = WideNetForPreTraining(WideNetConfig.from_preset("debug", num_experts=4))
    ffn = model.widenet.encoder.ffn[0]
    moe = ffn.moe
    _require(isinstance(moe, ds.MoE) and isinstance(moe.deepspeed_moe, ds.MOELayer), "the MoE / MOELayer classes")
    for attr in ("ep_size", "num_local_experts", "expert_group_name", "deepspeed_moe"):
        _require(hasattr(moe, attr), f"MoE.{attr}")
    _require(moe.expert_group_name == "ep_size_1", f"MoE's expert group name ({moe.expert_group_name!r})")
    layer = moe.deepspeed_moe
    for attr in ("gate", "experts", "ep_group", "ep_size", "num_local_experts", "use_tutel", "wall_clock_breakdown"):
        _require(hasattr(layer, attr), f"MOELayer.{attr}")
    _require(callable(getattr(layer, "_set_ep_group", None)) and callable(getattr(layer.gate, "_set_ep_group", None)),
             "MOELayer._set_ep_group / TopKGate._set_ep_group (how deepspeed.initialize hands over the group)")
    gate = layer.gate
    for attr in ("k", "capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens", "ep_group"):
        _require(hasattr(gate, attr), f"TopKGate.{attr}")
    _require(isinstance(gate.wg, nn.Linear) and gate.wg.bias is None
             and gate.wg.weight.shape == (4, model.config.hidden_size),
             "TopKGate.wg (the router weight, an (E, H) Linear without bias)")
    experts = getattr(layer.experts, ds.EXPERTS_ATTR, None)
    _require(isinstance(experts, nn.ModuleList) and len(experts) == 4, f"Experts.{ds.EXPERTS_ATTR} (the expert list)")
    for param in layer.experts.parameters():
        _require(param.allreduce is False and param.group_name == "ep_size_1",
                 "the expert parameters' tags (allreduce False, group_name)")
    _require(all(getattr(p, "allreduce", True) for p in gate.parameters()), "the gate's parameters (untagged)")


def test_checkpoint_key_names_are_the_ones_deepspeed_saves_experts_by():
    model = WideNetForPreTraining(WideNetConfig.from_preset("debug", num_experts=4))
    keys = [k for k in model.state_dict() if ds.is_expert_key(k)]
    assert keys and all(ds.EXPERT_KEY.fullmatch(k) for k in keys)
    assert "widenet.encoder.ffn.0.moe.deepspeed_moe.experts.deepspeed_experts.3.ffn.weight" in keys
    assert ds.expert_module_prefix("widenet.encoder.ffn.0", 3) + "ffn.weight" in keys
    # the engine picks expert keys out of the model's state dict by this substring, and names the files so
    engine_source = inspect.getsource(deepspeed.runtime.engine.DeepSpeedEngine)
    _require(f".{ds.MOE_EXPERTS_PATH.split('.', 1)[1]}." in engine_source,
             f"the expert key prefix DeepSpeed's engine saves experts by ('.{ds.MOE_EXPERTS_PATH.split('.', 1)[1]}.')")
    name = deepspeed.runtime.engine.DeepSpeedEngine._get_expert_ckpt_name("ckpt", 2, 5, "tag")
    _require(re.fullmatch(ds.EXPERT_FILE_GLOB.replace("*", r"\d+"), os.path.basename(name)) is not None,
             f"the expert checkpoint file name ({os.path.basename(name)!r} vs {ds.EXPERT_FILE_GLOB!r})")


def test_deepspeeds_moelayer_unpacks_the_routing_and_runs_the_loop():
    """impl 'deepspeed' runs DeepSpeed's own forward with this package's gate: it must unpack a ``Routing``
    (a 7-tuple) and return what the package's forward returns."""
    torch.manual_seed(0)
    model = WideNetForPreTraining(WideNetConfig.from_preset("debug", num_experts=4, moe={"impl": "deepspeed"}))
    layer = model.widenet.encoder.ffn[0].layer
    assert len(Routing._fields) == 7
    x, mask = torch.randn(2, 6, model.config.hidden_size), torch.ones(12)
    layer.eval()
    reference = layer(x, mask)
    _require(isinstance(layer.exp_counts, torch.Tensor) and layer.exp_counts.shape == (2, 4),
             "MOELayer.forward (no longer stores the gate's counts as exp_counts)")
    layer.impl = "batched"
    torch.testing.assert_close(layer(x, mask), reference, atol=1e-5, rtol=1e-5)


def test_experts_forward_is_a_loop_over_chunks_of_the_local_expert_dimension():
    experts = ds.Experts(nn.Linear(3, 3), num_local_experts=2, expert_group_name="g")
    x = torch.randn(1, 2, 4, 3)  # (ranks, local experts, capacity, H)
    out = experts(x)
    _require(torch.allclose(out[:, 1], experts.deepspeed_experts[1](x[:, 1])),
             "Experts.forward (chunk i of dim 1 through expert i)")


def test_rank_groups_are_laid_out_as_the_package_expects():
    _require(ds.expert_parallel_rank_groups(4, 2, False) == [[0, 1], [2, 3]],
             "the expert-parallel rank layout (_get_expert_parallel_ranks)")
    _require(ds.expert_parallel_rank_groups(4, 2, True) == [[0, 2], [1, 3]],
             "the expert-parallel rank layout with use_data_before_expert_parallelism")


def _all_to_all_worker(rank, port):
    from widenet_ds.distributed import close_distributed, init_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed()
    try:
        group = torch.distributed.group.WORLD
        x = (torch.arange(4.0).view(2, 2) + 10 * rank).requires_grad_()  # block g goes to rank g
        y = ds.all_to_all(group, x)
        _require(y.tolist() == [[2.0 * rank, 2.0 * rank + 1], [10 + 2.0 * rank, 11 + 2.0 * rank]],
                 f"_AllToAll's forward (rank {rank} got {y.tolist()})")
        (y * torch.tensor([[1.0], [2.0]])).sum().backward()  # rank r's row g: weight g + 1
        # the gradient comes back the same way: rank g's rows are the gradients rank r gave its row g
        _require(x.grad.tolist() == [[rank + 1.0] * 2] * 2, f"_AllToAll's backward (rank {rank} got {x.grad.tolist()})")
        counts = ds.exchange_counts(torch.tensor([rank * 10 + 0, rank * 10 + 1]), group)
        _require(counts.tolist() == [rank, 10 + rank], f"the count exchange (rank {rank} got {counts.tolist()})")
        value = torch.tensor(rank + 3)
        ds.all_reduce_max(value, group)
        _require(value.item() == 4, "all_reduce with ReduceOp.MAX")
    finally:
        close_distributed()


@pytest.mark.slow
@pytest.mark.distributed
def test_the_all_to_all_sends_block_g_to_rank_g_both_ways():
    from widenet_ds.distributed import free_port

    mp.spawn(_all_to_all_worker, args=(free_port(),), nprocs=2, join=True)
