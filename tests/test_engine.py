"""The engine's optimizer: MoE-aware parameter groups, AdamW and LAMB under DeepSpeed."""

import pytest
import torch

from widenet_ds import ConfigError, WideNetConfig, WideNetForPreTraining
from widenet_ds.engine.build import build_optimizer, param_groups


def test_param_groups_split_experts_and_exempt_biases_and_norms_from_decay():
    model = WideNetForPreTraining(WideNetConfig.from_preset("debug"))
    groups = param_groups(model, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {(g.get("moe", False), g["weight_decay"] > 0): [names[id(p)] for p in g["params"]] for g in groups}
    expert_decay = by_kind[(True, True)]
    assert expert_decay and all("deepspeed_experts" in n and n.endswith("weight") for n in expert_decay)
    assert all("deepspeed_experts" not in n for n in by_kind[(False, True)] + by_kind[(False, False)])
    assert all(n.endswith("bias") or "norm" in n.lower() for n in by_kind[(False, False)] + by_kind[(True, False)])
    assert all("name" in g for g in groups), "DeepSpeed needs a name on every group"
    counted = sum(len(g["params"]) for g in groups)
    assert counted == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["AdamW", "Lamb"])
def test_both_optimizers_train_the_model(kind):
    model = WideNetForPreTraining(WideNetConfig.from_preset("debug"))
    optimizer = build_optimizer(model, {"type": kind, "params": {"lr": 5e-3, "betas": [0.9, 0.999],
                                                                  "weight_decay": 0.01}})
    ids = torch.randint(5, 500, (4, 16))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    losses = []
    for _ in range(10):
        loss = model(ids, labels=labels, sentence_order_label=torch.tensor([0, 1, 0, 1])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_lamb_under_the_deepspeed_engine(zero_stage):
    from widenet_ds.distributed import close_distributed, init_distributed
    from widenet_ds.engine.build import initialize_engine
    from widenet_ds.engine.ds_config import check_run_config

    raw = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "optimizer": {"type": "Lamb", "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True}
    init_distributed()
    try:
        run = check_run_config(raw, "test", world_size=1)
        config = WideNetConfig.from_preset("debug").with_moe_settings(run.moe)
        engine, optimizer, _ = initialize_engine(WideNetForPreTraining(config), run)
        ids = torch.randint(5, 500, (4, 16), generator=torch.Generator().manual_seed(0))
        labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)
        losses = []
        for _ in range(8):
            loss = engine(ids, labels=labels, sentence_order_label=torch.tensor([0, 1, 0, 1])).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.1, losses
    finally:
        close_distributed()


def test_the_engine_does_not_synchronise_the_device_for_its_throughput_timer(monkeypatch):
    """DeepSpeed's throughput timer synchronises the device at every forward and step unless the config says
    otherwise; the run config turns it off (a config's own "timers" block is kept: the check can fail)."""
    from deepspeed.accelerator import get_accelerator

    from widenet_ds.distributed import close_distributed, init_distributed
    from widenet_ds.engine.build import initialize_engine
    from widenet_ds.engine.ds_config import check_run_config

    calls = []
    accelerator = type(get_accelerator())
    monkeypatch.setattr(accelerator, "synchronize", lambda self, *a: calls.append(1))
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    ids = torch.randint(5, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    init_distributed()
    try:
        counted = {}
        for name, extra in (("default", {}), ("asked", {"timers": {"throughput": {"enabled": True}}})):
            run = check_run_config({**base, **extra}, "test", world_size=1)
            config = WideNetConfig.from_preset("debug").with_moe_settings(run.moe)
            engine, _, _ = initialize_engine(WideNetForPreTraining(config), run)
            calls.clear()
            for _ in range(4):  # the timer starts at the second step
                engine.backward(engine(ids, labels=ids).loss)
                engine.step()
            counted[name] = len(calls)
        assert counted == {"default": 0, "asked": counted["asked"]} and counted["asked"] > 0
    finally:
        close_distributed()


def test_foreach_grad_norm_and_clipping_equal_deepspeeds():
    from deepspeed.runtime import utils as ds_utils

    from widenet_ds.engine import grad_norm

    grad_norm.use_foreach_grad_norm()
    deepspeed_norm = grad_norm._DEEPSPEED["get_global_norm_of_tensors"]
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=g) * scale for shape, scale in (((7, 3), 1.0), ((5,), 30.0), ((2, 2, 2), 1e-3))]
    tensors.append(torch.randn(4, generator=g).bfloat16())
    torch.testing.assert_close(grad_norm.global_norm_of_tensors(tensors), deepspeed_norm(tensors), rtol=1e-6, atol=0)
    assert ds_utils.get_global_norm_of_tensors is grad_norm.global_norm_of_tensors, "installed where DeepSpeed looks"
    ours, theirs = [t.clone() for t in tensors[:3]], [t.clone() for t in tensors[:3]]
    grad_norm.clip_tensors_by_global_norm(ours, max_norm=1.0)
    ds_utils_clip = ds_utils.clip_tensors_by_global_norm  # DeepSpeed's, still in its own module
    ds_utils_clip(theirs, max_norm=1.0, global_norm=deepspeed_norm(theirs))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert torch.linalg.vector_norm(torch.cat([t.flatten() for t in ours])) == pytest.approx(1.0, rel=1e-5)
    assert grad_norm.global_norm_of_tensors(tensors, norm_type=float("inf")) == max(t.abs().max().float() for t in tensors)


@pytest.mark.slow
def test_the_bf16_engine_steps_alike_with_deepspeeds_and_the_foreach_grad_norm(monkeypatch):
    """bf16, ZeRO 1, fp32 accumulation (DeepSpeed's BF16_Optimizer), an MoE model, clipping active."""
    from deepspeed.runtime import bf16_optimizer
    from deepspeed.runtime import utils as ds_utils

    from widenet_ds.distributed import close_distributed, init_distributed
    from widenet_ds.engine import grad_norm
    from widenet_ds.engine.build import initialize_engine
    from widenet_ds.engine.ds_config import check_run_config

    raw = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.05,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}, "bf16": {"enabled": True},
           "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}}
    ids = torch.randint(5, 500, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)

    def train(foreach):
        init_distributed()
        try:
            grad_norm.use_foreach_grad_norm()
            if not foreach:  # DeepSpeed's own functions, for this run only
                deepspeed_norm = grad_norm._DEEPSPEED["get_global_norm_of_tensors"]
                for module in (ds_utils, bf16_optimizer):
                    monkeypatch.setattr(module, "get_global_norm_of_tensors", deepspeed_norm)
                monkeypatch.setattr(bf16_optimizer, "clip_tensors_by_global_norm", ds_utils.clip_tensors_by_global_norm)
            run = check_run_config(raw, "test", world_size=1)
            config = WideNetConfig.from_preset("debug").with_moe_settings(run.moe)
            torch.manual_seed(0)
            model = WideNetForPreTraining(config)
            engine, _, _ = initialize_engine(model, run)
            assert type(engine.optimizer).__name__ == "BF16_Optimizer"
            norms = []
            for _ in range(2):
                engine.eval()  # no router noise: both runs route alike
                loss = engine(ids, labels=labels, sentence_order_label=torch.tensor([0, 1, 0, 1])).loss
                engine.backward(loss)
                engine.step()
                norms.append(float(engine.get_global_grad_norm()))
            return norms, {n: p.detach().float().clone() for n, p in model.named_parameters()}
        finally:
            monkeypatch.undo()
            close_distributed()

    (ours, ours_params), (theirs, theirs_params) = train(True), train(False)
    assert min(theirs) > 0.05 * 2, "clipping was active"
    assert ours == pytest.approx(theirs, rel=1e-5)
    for name, value in theirs_params.items():
        torch.testing.assert_close(ours_params[name], value, msg=name)


@pytest.mark.slow
def test_immediate_grad_update_keeps_no_gradient_between_micro_batches_and_trains_alike():
    """What CUDA graphs need with gradient accumulation (widenet_ds.engine.compile.check_cuda_graphs): DeepSpeed's bf16
    optimizer with ``immediate_grad_update`` (ds_configs/pretrain_1gpu.json) moves each gradient into its fp32
    buffer during backward, so no ``param.grad`` outlives a micro-batch (a CUDA-graph replay would overwrite it);
    the default keeps them. Both reach the same weights: 2 steps of 2 micro-batches, clipping active."""
    import json
    from pathlib import Path

    from widenet_ds.distributed import close_distributed, init_distributed
    from widenet_ds.engine.build import initialize_engine
    from widenet_ds.engine.compile import check_cuda_graphs
    from widenet_ds.engine.ds_config import check_run_config

    shipped = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "pretrain_1gpu.json").read_text())
    ids = torch.randint(5, 500, (2, 4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)

    def train(immediate):
        raw = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 0.05,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "bf16": {**shipped["bf16"]},
               "data_types": shipped["data_types"], "zero_optimization": shipped["zero_optimization"]}
        raw["bf16"]["immediate_grad_update"] = immediate
        run = check_run_config(raw, "test", world_size=1)
        if immediate:
            check_cuda_graphs("model:reduce-overhead", run)  # accepted
        else:
            with pytest.raises(ConfigError, match="immediate_grad_update"):
                check_cuda_graphs("model:reduce-overhead", run)
        init_distributed()
        try:
            config = WideNetConfig.from_preset("debug").with_moe_settings(run.moe)
            torch.manual_seed(0)
            model = WideNetForPreTraining(config)
            initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
            engine, _, _ = initialize_engine(model, run)
            kept = []
            engine.eval()  # no router noise: both runs route alike
            for micro in range(4):
                sop = torch.tensor([0, 1, 0, 1])
                loss = engine(ids[micro % 2], labels=labels[micro % 2], sentence_order_label=sop).loss
                engine.backward(loss)
                kept.append(sum(p.grad is not None for p in model.parameters()))
                engine.step()
            trained = {n: p.detach().float().clone() for n, p in model.named_parameters()}
            assert all(not torch.equal(trained[n], v) for n, v in initial.items() if "encoder" in n), "all trained"
            return kept, trained
        finally:
            close_distributed()

    (kept_immediate, immediate), (kept_default, default) = train(True), train(False)
    assert kept_immediate == [0, 0, 0, 0]
    assert min(kept_default) > 0, "the default keeps the micro-batch gradients (what the check refuses)"
    for name, value in default.items():
        torch.testing.assert_close(immediate[name], value, msg=name)
