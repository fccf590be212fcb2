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
