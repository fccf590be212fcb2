"""The package router (``top_k_route``) against the plain reference (tests/reference_router.py):
exactly the same expert indices, slots, capacities, counts and drops; the same gates, load-balance
loss and gradients up to float rounding; on crafted and random inputs, top-1, top-2 and top-3,
with padding, Gumbel selection and no dropping; and the gate deterministic in eval mode."""

import pytest
import torch
from reference_router import reference_top_k_route

from widenet_ds.modeling import Routing, WideNetGate, top_k_route


def _assert_same_routes(fast: Routing, ref: Routing) -> None:
    assert isinstance(fast, Routing) and isinstance(ref, Routing)
    assert int(fast.capacity) == int(ref.capacity) and fast.num_experts == ref.num_experts
    for name in ("indices_KS", "locations_KS", "counts_2E"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    torch.testing.assert_close(fast.gates_KS, ref.gates_KS)
    torch.testing.assert_close(fast.l_aux, ref.l_aux)


def _logits(choices, num_experts, scale=5.0):
    """Logits under which token s prefers experts choices[s][0] > choices[s][1] > the rest."""
    logits = torch.zeros(len(choices), num_experts)
    for s, ranked in enumerate(choices):
        for rank, e in enumerate(ranked):
            logits[s, e] = scale * (len(ranked) - rank)
    return logits


CRAFTED = [
    # top-1, 6 of 8 tokens want expert 0, capacity 4: the 5th and 6th asking are dropped
    ([[0], [0], [1], [0], [0], [0], [1], [0]], 2, 1, 4, None, [[0, 0, 1, 0, 0, -1, 1, -1]], [[6, 2], [4, 2]]),
    # top-2, capacity 2: first choices fill expert 0 before any second choice reaches it
    ([[0, 1], [1, 0], [0, 1], [2, 0]], 3, 2, 2, None, [[0, 1, 0, 2], [1, -1, -1, -1]], [[4, 3, 1], [2, 2, 1]]),
    # top-2 with padding: tokens 2 and 3 are never routed and not counted
    ([[0, 1], [1, 0], [2, 3], [3, 2]], 4, 2, 8, [1, 1, 0, 0], [[0, 1, -1, -1], [1, 0, -1, -1]],
     [[2, 2, 0, 0], [2, 2, 0, 0]]),
    # no dropping: the capacity is the busiest expert's load
    ([[0, 1]] * 7 + [[1, 0]], 4, 2, None, None, [[0] * 7 + [1], [1] * 7 + [0]], [[8, 8, 0, 0], [8, 8, 0, 0]]),
]


@pytest.mark.parametrize("choices,experts,k,capacity,mask,indices,counts", CRAFTED)
def test_crafted_routes_are_the_references_and_the_expected_ones(choices, experts, k, capacity, mask, indices, counts):
    logits = _logits(choices, experts)
    mask = None if mask is None else torch.tensor(mask)
    fast, ref = top_k_route(logits, k, capacity, mask), reference_top_k_route(logits, k, capacity, mask)
    _assert_same_routes(fast, ref)
    assert fast.indices_KS.tolist() == indices and fast.counts_2E.tolist() == counts
    kept = fast.indices_KS >= 0
    assert (fast.gates_KS[~kept] == 0).all() and (fast.locations_KS[~kept] == 0).all()


@pytest.mark.parametrize("tokens,experts,k,capacity,pad,normalize", [
    (64, 4, 2, 40, False, False),  # C = 1.25
    (64, 4, 2, 9, True, False),  # many drops, padding
    (64, 8, 1, 5, True, False),
    (37, 4, 3, 12, False, True),
    (50, 4, 2, None, True, False),  # no dropping: capacity from the loads
    (50, 4, 2, 30, True, True),
])
def test_random_routes_and_gradients_match_the_reference(tokens, experts, k, capacity, pad, normalize):
    logits = torch.randn(tokens, experts, requires_grad=True)
    mask = (torch.rand(tokens) > 0.3).long() if pad else None
    fast = top_k_route(logits, k, capacity, mask, normalize)
    ref = reference_top_k_route(logits, k, capacity, mask, normalize)
    _assert_same_routes(fast, ref)
    if capacity is not None and capacity < 10:
        assert (ref.counts_2E[1] < ref.counts_2E[0]).any(), "the case drops routes"
    grad_fast = torch.autograd.grad(fast.l_aux + (fast.gates_KS ** 2).sum(), logits)[0]
    grad_ref = torch.autograd.grad(ref.l_aux + (ref.gates_KS ** 2).sum(), logits)[0]
    torch.testing.assert_close(grad_fast, grad_ref)


def test_gumbel_selection_and_a_call_with_no_real_tokens_match_the_reference():
    logits = torch.randn(30, 4)
    select = logits + torch.randn(30, 4)
    _assert_same_routes(top_k_route(logits, 1, 10, select_SE=select), reference_top_k_route(logits, 1, 10,
                                                                                             select_SE=select))
    empty = torch.zeros(30, dtype=torch.long)
    fast, ref = top_k_route(logits, 2, 10, empty), reference_top_k_route(logits, 2, 10, empty)
    _assert_same_routes(fast, ref)
    assert fast.l_aux.item() == 0 and (fast.indices_KS == -1).all()


def test_the_package_router_needs_no_host_sync_where_the_reference_does():
    """On the meta device no value can be read back to the host: what runs there never waits on the GPU."""
    logits, mask = torch.randn(20, 4, device="meta"), torch.ones(20, device="meta")
    capacity = top_k_route(logits, 2, 8, mask).capacity
    assert capacity == 8 and isinstance(capacity, int), "MOELayer's int(C) reads a host value"
    with pytest.raises(NotImplementedError):
        reference_top_k_route(logits, 2, 8, mask)  # boolean indexing / .any() read device values


@pytest.mark.parametrize("k", [1, 2])
def test_the_gate_in_eval_is_deterministic_and_routes_as_the_reference(k):
    gate = WideNetGate(8, 4, k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=True,
                       noise="gaussian", noise_std=1.0)
    torch.nn.init.normal_(gate.wg.weight, std=0.5)
    gate.eval()
    x, mask = torch.randn(64, 8), (torch.rand(64) > 0.2).long()
    first, second = gate(x, mask), gate(x, mask)
    for a, b in zip(first, second):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    _assert_same_routes(first, reference_top_k_route(x @ gate.wg.weight.t(), k, gate.capacity(64), mask))
