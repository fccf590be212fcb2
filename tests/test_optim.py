"""LAMB (widenet_ds.engine.optim.Lamb): the paper's update per tensor, and a trust ratio per layer under every
DeepSpeed wrapper (flat bf16 master weights, ZeRO partitions across ranks), which a LAMB that takes
the norm of the tensor it is handed does not have (one ratio per group or per partition)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from widenet_ds import WideNetConfig, WideNetForPreTraining
from widenet_ds.distributed import close_distributed, free_port, init_distributed
from widenet_ds.engine.optim import Lamb, _pieces

LR, BETAS, EPS, WD = 0.1, (0.9, 0.999), 1e-6, 0.01


def _reference(weights, grad_steps):
    """LAMB, Algorithm 2 of You et al. (bias correction, weight decay in the update), float64, per tensor."""
    ws = [w.double().clone() for w in weights]
    ms, vs = [torch.zeros_like(w) for w in ws], [torch.zeros_like(w) for w in ws]
    for t, grads in enumerate(grad_steps, 1):
        for i, g in enumerate(grads):
            g = g.double()
            ms[i] = BETAS[0] * ms[i] + (1 - BETAS[0]) * g
            vs[i] = BETAS[1] * vs[i] + (1 - BETAS[1]) * g * g
            u = (ms[i] / (1 - BETAS[0] ** t)) / ((vs[i] / (1 - BETAS[1] ** t)).sqrt() + EPS) + WD * ws[i]
            ratio = ws[i].norm() / u.norm() if ws[i].norm() > 0 and u.norm() > 0 else 1.0
            ws[i] = ws[i] - LR * ratio * u
    return ws


def _case():
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7), torch.zeros(4), torch.randn(2, 2) * 30]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]
    return weights, grads, _reference(weights, grads)


def test_lamb_is_the_papers_update_on_each_tensor():
    weights, grads, expected = _case()
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = Lamb([{"params": params}], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        optimizer.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=1e-6)


def test_lamb_on_a_padded_flat_buffer_keeps_one_trust_ratio_per_tensor():
    """DeepSpeed's layout: the model's tensors become views into a flat low-precision buffer with
    padding between and after them; the optimizer is handed an fp32 master copy of that buffer."""
    weights, grads, expected = _case()
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = Lamb([{"params": params}], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    offsets, position = [], 0
    for w in weights:
        offsets.append(position)
        position += w.numel() + 3  # alignment padding after each tensor
    flat_lp = torch.zeros(position + 5)
    for p, offset in zip(params, offsets):
        flat_lp[offset:offset + p.numel()] = p.detach().flatten()
        p.data = flat_lp[offset:offset + p.numel()].view_as(p)
    master = torch.nn.Parameter(flat_lp.clone())
    optimizer.param_groups[0]["params"] = [master]
    for step in grads:
        master.grad = torch.zeros_like(flat_lp)
        for g, offset in zip(step, offsets):
            master.grad[offset:offset + g.numel()] = g.flatten()
        optimizer.step()
    gaps = torch.ones_like(master, dtype=torch.bool)
    for offset, e in zip(offsets, expected):
        torch.testing.assert_close(master.detach()[offset:offset + e.numel()].double(), e.flatten(),
                                   atol=1e-6, rtol=1e-6)
        gaps[offset:offset + e.numel()] = False
    assert master.detach()[gaps].abs().max() == 0, "padding stays zero"


def test_a_partition_is_cut_into_the_pieces_of_the_layers_it_holds():
    spans = [(0, 5, 0), (8, 4, 1), (12, 6, 2)]  # (offset, length, layer); a gap at 5-8, the tail after 18
    assert _pieces(spans, 3, 0, 10) == ([0, 3, 1], [5, 3, 2])
    assert _pieces(spans, 3, 10, 20) == ([1, 2, 3], [2, 6, 2])
    assert _pieces(spans, 3, 3, 4) == ([0], [1])


def test_an_all_zero_gradient_is_no_step():
    """DeepSpeed's wrappers step once with zero gradients to create the state; plain LAMB would make
    that a weight-decay-only step that moves every decayed layer by lr * ||w||."""
    w = torch.nn.Parameter(torch.randn(6))
    before = w.detach().clone()
    optimizer = Lamb([w], lr=0.5, weight_decay=0.01)
    w.grad = torch.zeros_like(w)
    optimizer.step()
    assert torch.equal(w.detach(), before) and optimizer.state[w]["step"].item() == 0
    w.grad = torch.randn(6)
    optimizer.step()
    assert optimizer.state[w]["step"].item() == 1
    torch.testing.assert_close((w.detach() - before).norm(), 0.5 * before.norm())


def _engine_step_ratios(raw, lr):
    """One training step of the debug WideNet under the engine; per parameter tensor,
    ||w_after - w_before|| / (lr * ||w_before||) (LAMB: 1 for every layer), and the number of tensors
    that are not zero (biases start at zero)."""
    from widenet_ds.engine.build import initialize_engine
    from widenet_ds.engine.ds_config import check_run_config

    run = check_run_config(raw, "test", world_size=int(os.environ.get("WORLD_SIZE", 1)))
    config = WideNetConfig.from_preset("debug").with_moe_settings(run.moe)
    torch.manual_seed(0)
    engine, _, _ = initialize_engine(WideNetForPreTraining(config), run)
    before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    g = torch.Generator().manual_seed(int(os.environ.get("RANK", 0)))
    ids = torch.randint(5, 500, (4, 16), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
    loss = engine(ids, labels=labels, sentence_order_label=torch.tensor([0, 1, 0, 1])).loss
    engine.backward(loss)
    engine.step()
    ratios = {}
    for name, p in engine.module.named_parameters():
        moved, norm = (p.detach().float() - before[name]).norm(), before[name].norm()
        if norm > 0 and moved > 0:  # a zero tensor's ratio is 1 by definition; no update: no gradient, no decay
            ratios[name] = (moved / (lr * norm)).item()
    return ratios, sum(1 for w in before.values() if w.norm() > 0)


def _lamb_config(precision, zero, lr):
    raw = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "optimizer": {"type": "Lamb", "params": {"lr": lr, "weight_decay": 0.01}},
           "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True}
    if precision != "fp32":
        raw["bf16"] = {"enabled": True}
    if precision == "bf16+fp32-accumulation":
        raw["data_types"] = {"grad_accum_dtype": "fp32"}
    return raw


def _assert_layerwise(ratios, count, bf16):
    # bf16 weights round to ~0.4% of their norm; the update is half the norm (lr 0.5)
    tolerance = 0.03 if bf16 else 1e-4
    assert len(ratios) >= 0.9 * count, "most tensors moved"
    bad = {n: r for n, r in ratios.items() if abs(r - 1) > tolerance}
    assert not bad, f"layers whose update is not lr x their norm: {bad}"


@pytest.mark.parametrize("precision,zero", [
    ("fp32", 0),  # the optimizer sees the model's tensors
    ("bf16", 0),  # DeepSpeed's FP16_Optimizer in bf16: one flat fp32 master tensor per group
    ("bf16+fp32-accumulation", 1),  # BF16_Optimizer: flat, padded
    ("bf16", 2),  # ZeRO-2 (one rank: its partition is the whole padded, aligned buffer)
])
def test_every_layer_moves_lr_times_its_norm_under_the_engine(precision, zero):
    lr = 0.5
    init_distributed()
    try:
        ratios, count = _engine_step_ratios(_lamb_config(precision, zero, lr), lr)
    finally:
        close_distributed()
    _assert_layerwise(ratios, count, bf16=precision != "fp32")


def _partitioned_worker(rank, port, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed()
    try:
        queue.put((rank, _engine_step_ratios(_lamb_config("fp32", 2, 0.5), 0.5)))
    finally:
        close_distributed()


@pytest.mark.distributed
def test_layers_cut_across_zero2_partitions_of_two_ranks_keep_their_trust_ratio():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_partitioned_worker, args=(free_port(), queue), nprocs=2, join=True, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    for ratios, count in results.values():
        _assert_layerwise(ratios, count, bf16=False)


@pytest.mark.slow
def test_lamb_state_survives_a_deepspeed_checkpoint(tmp_path):
    """bf16, ZeRO 1 + fp32 accumulation (pretrain_1gpu.json's settings): two steps, save, then one more
    step in the same engine and in a fresh engine that loaded the checkpoint: the same weights."""
    from widenet_ds.engine.build import initialize_engine
    from widenet_ds.engine.ds_config import check_run_config

    run = check_run_config(_lamb_config("bf16+fp32-accumulation", 1, 1e-2), "test", world_size=1)
    config = WideNetConfig.from_preset("debug").with_moe_settings(run.moe)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (4, 16), generator=g)
    batch = dict(input_ids=ids, labels=torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100),
                 sentence_order_label=torch.tensor([0, 1, 0, 1]))

    def step(engine):
        torch.manual_seed(5)  # router noise
        engine.backward(engine(**batch).loss)
        engine.step()

    init_distributed()
    try:
        torch.manual_seed(0)
        engine, _, _ = initialize_engine(WideNetForPreTraining(config), run)
        step(engine), step(engine)
        engine.save_checkpoint(str(tmp_path), tag="two")
        step(engine)
        torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
        resumed, _, _ = initialize_engine(WideNetForPreTraining(config), run)
        resumed.load_checkpoint(str(tmp_path), tag="two")
        step(resumed)
        for (name, a), b in zip(engine.module.named_parameters(), resumed.module.parameters()):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    finally:
        close_distributed()


def test_the_state_of_another_optimizer_is_refused_with_what_to_do():
    params = [torch.nn.Parameter(torch.randn(3))]
    adamw = torch.optim.AdamW(params)
    params[0].grad = torch.randn(3)
    adamw.step()
    lamb = Lamb(params)
    with pytest.raises(ValueError, match="not written by widenet_ds.engine.optim.Lamb.*resume with the optimizer that wrote it"):
        lamb.load_state_dict(adamw.state_dict())
    own = Lamb([torch.nn.Parameter(torch.randn(3))])
    own.param_groups[0]["params"][0].grad = torch.randn(3)
    own.step()
    lamb.load_state_dict(own.state_dict())  # its own state loads
    assert lamb.state[params[0]]["step"].item() == 1
