"""The engine's optimizer: MoE-aware parameter groups, AdamW and LAMB under DeepSpeed."""

import pytest
import torch

from widenet_ds import WideNetConfig, WideNetForPreTraining
from widenet_ds.engine import build_optimizer, param_groups


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
    from widenet_ds.ds_config import check_run_config
    from widenet_ds.engine import initialize_engine

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
