"""The router on golden inputs: capacity, priority, dropping, noise, load-balance loss,
and parity with DeepSpeed's own top-2 gate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.moe.sharded_moe import top2gating, topkgating

from widenet_ds.modeling import (
    WideNetGate,
    expert_capacity,
    load_balance_loss,
    top_k_route,
)
from widenet_ds.modeling.gate import router_logits, top_k_choices


def _logits(choices, num_experts, scale=5.0):
    """Logits under which token s prefers experts choices[s][0] > choices[s][1] > the rest."""
    logits = torch.zeros(len(choices), num_experts)
    for s, ranked in enumerate(choices):
        for rank, e in enumerate(ranked):
            logits[s, e] = scale * (len(ranked) - rank)
    return logits


@pytest.mark.parametrize("tokens,experts,k,factor,minimum,expected", [
    (8, 2, 1, 1.0, 0, 4),   # C*K*S/E = 4
    (10, 4, 2, 1.2, 0, 6),  # 1.2*2*10/4 = 6.0 exactly (float noise must not make it 7)
    (10, 4, 1, 1.0, 0, 3),  # ceil(2.5)
    (6, 4, 1, 1.0, 4, 4),   # min_capacity wins
    (512, 4, 2, 1.2, 4, 308),
])
def test_capacity_is_ceil_of_c_k_tokens_over_e(tokens, experts, k, factor, minimum, expected):
    assert expert_capacity(tokens, experts, k, factor, minimum) == expected


def test_top1_drops_the_routes_beyond_capacity_in_token_order():
    # 6 of 8 tokens want expert 0; capacity is 4: tokens 4 and 5 (the 5th and 6th asking) are dropped.
    choices = [[0], [0], [1], [0], [0], [0], [1], [0]]
    l_aux, cap, E, idx, loc, gates, counts = top_k_route(_logits(choices, 2), k=1, capacity=4)
    assert int(cap) == 4 and E == 2
    assert idx.tolist() == [[0, 0, 1, 0, 0, -1, 1, -1]]
    assert loc.tolist() == [[0, 1, 0, 2, 3, 0, 1, 0]]
    assert counts.tolist() == [[6, 2], [4, 2]]
    assert (gates[0, [5, 7]] == 0).all() and (gates[0, [0, 2]] > 0.99).all()


def test_top2_fills_capacity_with_first_choices_before_second_choices():
    # capacity 2; every token's first choice is kept before any second choice.
    choices = [[0, 1], [1, 0], [0, 1], [2, 0]]
    _, _, _, idx, loc, gates, counts = top_k_route(_logits(choices, 3), k=2, capacity=2)
    # expert 0: first choices of tokens 0 and 2 fill it, so the second choices of tokens 1 and 3 are dropped;
    # expert 1: token 1's first choice, then token 0's second choice; token 2's second choice is dropped.
    assert idx.tolist() == [[0, 1, 0, 2], [1, -1, -1, -1]]
    assert loc.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
    assert counts.tolist() == [[4, 3, 1], [2, 2, 1]]
    probs = torch.softmax(_logits(choices, 3), -1)
    assert torch.allclose(gates[1, 0], probs[0, 1])  # not renormalised by default: TopK(softmax(.))


def test_no_dropping_keeps_every_route():
    choices = [[0, 1]] * 7 + [[1, 0]]
    _, cap, _, idx, _, _, counts = top_k_route(_logits(choices, 4), k=2, capacity=None)
    assert int(cap) == 8 and (idx >= 0).all() and torch.equal(counts[0], counts[1])


def test_padding_tokens_are_not_routed_and_not_in_the_loss():
    choices = [[0, 1], [1, 0], [2, 3], [3, 2]]
    logits = _logits(choices, 4)
    mask = torch.tensor([1, 1, 0, 0])
    l_aux, _, _, idx, _, gates, counts = top_k_route(logits, k=2, capacity=8, token_mask_S=mask)
    assert (idx[:, 2:] == -1).all() and (gates[:, 2:] == 0).all()
    assert counts[0].tolist() == [2, 2, 0, 0]
    l_real, *_ = top_k_route(logits[:2], k=2, capacity=8)
    torch.testing.assert_close(l_aux, l_real)


def test_load_balance_loss_is_e_times_sum_of_route_share_times_mean_prob():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    routed = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    m = torch.tensor([2, 1, 1]) / 4
    P = probs.mean(0)
    torch.testing.assert_close(load_balance_loss(probs, routed, k=1), 3 * (m * P).sum())
    assert load_balance_loss(torch.full((4, 4), 0.25), torch.eye(4), k=1).item() == pytest.approx(1.0)


@pytest.mark.parametrize("tokens,factor", [(16, 1.0), (16, 0.5), (37, 1.2)])
def test_matches_deepspeed_top2_routing_when_renormalised(tokens, factor):
    logits = torch.randn(tokens, 4)
    ours = top_k_route(logits.clone(), k=2, capacity=expert_capacity(tokens, 4, 2, factor, 0), normalize=True)
    ds = top2gating(logits.clone(), factor, 0, drop_tokens=True, top2_2nd_expert_sampling=False,
                    sparse_routes=True)
    assert int(ours[1]) == int(ds[1])
    assert torch.equal(ours[3], ds[3]), "expert indices (-1 = dropped)"
    kept = ours[3] >= 0
    assert torch.equal(ours[4][kept], ds[4][kept]), "slot of each kept route"
    torch.testing.assert_close(ours[5], ds[5])
    assert torch.equal(ours[6][0], ds[6])
    ds_topk_laux = topkgating(logits.clone(), 2, factor, 0, drop_tokens=True)[0]
    torch.testing.assert_close(ours[0], ds_topk_laux)


def _gate(k=2, experts=4, noise="gaussian", std=0.25, drop=True):
    gate = WideNetGate(8, experts, k, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0,
                       drop_tokens=drop, noise=noise, noise_std=std)
    torch.nn.init.normal_(gate.wg.weight, std=0.5)
    return gate


def test_gaussian_noise_is_added_to_logits_in_training_only():
    gate, x = _gate(), torch.randn(64, 8)
    clean = x @ gate.wg.weight.t()
    gate.train()
    torch.manual_seed(7)
    noisy = gate(x)
    torch.manual_seed(7)
    expected = top_k_route(clean + torch.randn_like(clean) * 0.25, 2, gate.capacity(64))
    for a, b in zip(noisy, expected):
        torch.testing.assert_close(a, b) if torch.is_tensor(a) else None
    assert not torch.equal(noisy[5], top_k_route(clean, 2, gate.capacity(64))[5])
    gate.eval()
    first, second = gate(x), gate(x)
    clean_eval = top_k_route(clean, 2, gate.capacity(64))
    assert torch.equal(first[3], second[3]) and torch.equal(first[5], clean_eval[5])


def test_eval_uses_the_eval_capacity_factor():
    gate = _gate()
    gate.train()
    assert gate.capacity(64) == 32  # 1.0 * 2 * 64 / 4
    gate.eval()
    assert gate.capacity(64) == 64  # 2.0 * 2 * 64 / 4


def test_every_noise_policy_is_off_in_eval_and_only_none_is_deterministic_in_training():
    x = torch.randn(64, 8)
    reference = _gate(k=1, noise="none", drop=False)
    reference.eval()
    clean = reference(x)
    for policy in ("gaussian", "jitter", "rsample", "none"):
        gate = _gate(k=1, noise=policy, std=1.0, drop=False)
        gate.load_state_dict(reference.state_dict())
        gate.eval()
        assert torch.equal(gate(x)[3], clean[3]) and torch.equal(gate(x)[5], clean[5]), policy
        gate.train()
        differs = any(not torch.equal(gate(x)[5], clean[5]) for _ in range(3))
        assert differs == (policy != "none"), policy


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_choices_are_topk_best_first(k):
    scores = torch.randn(300, 5, generator=torch.Generator().manual_seed(k))
    assert torch.equal(top_k_choices(scores, k), torch.topk(scores, k, dim=-1).indices)
    # ties go to the lower expert, every chosen expert once
    tied = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.2, 0.9, 0.2, 0.9]])
    assert top_k_choices(tied, 3).tolist() == [[0, 1, 2], [1, 3, 0]]


def test_compiled_router_logits_are_the_fp32_linear_with_its_gradients():
    """Compiled, the logits are a multiply-sum (no linear in the traced graph); same values and
    gradients as the eager fp32 linear up to summation order (bf16 input gradient: one rounding)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(4, 48, generator=g) * 0.1).bfloat16().requires_grad_()
    gy = torch.randn(64, 4, generator=g)
    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    ref = router_logits(x, w)
    assert ref.dtype == torch.float32
    (ref_gx, ref_gw) = torch.autograd.grad(ref, (x, w), gy)
    out = torch.compile(router_logits, backend=backend, fullgraph=True)(x, w)
    assert traced and not any("linear" in t or "matmul" in t for t in traced), traced
    gx, gw = torch.autograd.grad(out, (x, w), gy)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx.float(), ref_gx.float(), rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(gw.float(), ref_gw.float(), rtol=8e-3, atol=1e-6)
    assert (x.float() @ w.float().t() - ref).abs().max() < 1e-5


@pytest.mark.slow
def test_router_benchmark_runs_on_cpu_in_smoke_mode(tmp_path):
    """benchmarks/bench_router.py (the router's measurement): every formulation ran on the same inputs and
    picks the same experts, with the gradients of the fp32 linear up to bf16 rounding."""
    out = tmp_path / "router.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_router", "--smoke", "--out", str(out)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    assert [v["name"] for v in variants][:2] == ["linear+topk (reference)", "multiply-sum+argmax (gate)"]
    for v in variants:
        assert v["choices_equal"] and v["wall_ms"] > 0, v
        assert v["x_grad_max_rel_diff"] < 1e-2 and v["w_grad_max_rel_diff"] < 1e-2, v
