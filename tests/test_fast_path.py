"""The fast MoE paths (moe.impl "batched": gather dispatch/combine, batched experts; "grouped": the
same with the kept routes packed into grouped matmuls) compute what the reference path (moe.impl
"deepspeed": DeepSpeed's MOELayer forward and expert loop, same router) computes: routes, outputs,
losses, expert counts and every gradient, on the same weights and inputs. The router itself is
checked against tests/reference_router.py in tests/test_reference_router.py. The expert-parallel (ep_size 2) case is in tests/test_expert_parallel.py; the
benchmark script's FLOP formula and smoke run are checked at the end."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.moe.experts import Experts
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from widenet_ds import ConfigError, MoESettings, WideNetConfig, WideNetForPreTraining
from widenet_ds.engine.compile import compile_model, compile_settings, uses_cuda_graphs
from widenet_ds.modeling import BatchedExperts, FeedForward, GatherMOELayer, top_k_route
from widenet_ds.modeling import moe as moe_module
from widenet_ds.modeling.dispatch import _Combine, _Dispatch
from widenet_ds.modeling.experts import _ExpertLinear, _GroupedLinear, _RowBias, grouped_mm_is_fast
from widenet_ds.modeling.packing import received_packing, route_maps


def test_a_training_step_needs_no_host_sync():
    """On the meta device no value can be read back to the host: what runs there never waits on the GPU."""
    config = WideNetConfig.from_preset("debug")  # drop_tokens true, padding mask: a whole training step
    model = WideNetForPreTraining(config).train().to("meta")
    ids = torch.ones(3, 12, dtype=torch.long, device="meta")
    model(input_ids=ids, attention_mask=ids, labels=ids, sentence_order_label=ids[:, 0]).loss.backward()
    assert model.widenet.encoder.ffn[0].experts.deepspeed_experts[0].ffn.weight.grad is not None


def _config(impl, moe=None, **overrides):
    return WideNetConfig.from_preset("debug", **overrides, moe={**(moe or {}), "impl": impl})


def _models(moe=None, impl="batched", **overrides):
    torch.manual_seed(0)
    fast = WideNetForPreTraining(_config(impl, moe, **overrides))
    torch.manual_seed(0)
    ref = WideNetForPreTraining(_config("deepspeed", moe, **overrides))
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), ref.state_dict().values())), \
        "the impl does not change the initial weights"
    return fast, ref


def _batch(config, lengths=(12, 9, 5)):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, config.vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                sentence_order_label=torch.arange(len(lengths)) % 2)


def _run(model, batch, train, seed=11):
    model.train(train)
    model.zero_grad()
    torch.manual_seed(seed)  # same router noise in both models
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def _assert_same(fast_run, ref_run):
    (fast, fast_grads), (ref, ref_grads) = fast_run, ref_run
    torch.testing.assert_close(fast.prediction_logits, ref.prediction_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.loss, ref.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast.aux_loss, ref.aux_loss)
    assert torch.equal(fast.expert_counts, ref.expert_counts)
    torch.testing.assert_close(fast.dropped_fraction, ref.dropped_fraction)
    assert fast_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert grad is not None, name
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", [
    dict(),  # top-2, C 1.2, padding, Gaussian router noise
    dict(moe={"capacity_factor": 0.5, "eval_capacity_factor": 0.5, "min_capacity": 0}),  # many drops
    dict(top_k=1, moe={"capacity_factor": 0.6, "eval_capacity_factor": 0.6, "min_capacity": 0}),
    dict(top_k=1, router_noise="rsample", moe={"capacity_factor": 1.0, "min_capacity": 0}),
    dict(router_noise="jitter", router_normalize_top_k=True, num_experts=8),
    dict(moe={"drop_tokens": False}),
])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("impl", ["batched", "grouped"])
def test_fast_model_matches_the_reference_model(case, train, impl):
    fast, ref = _models(impl=impl, **case)
    batch = _batch(fast.config)
    fast_run, ref_run = _run(fast, batch, train), _run(ref, batch, train)
    _assert_same(fast_run, ref_run)
    if case.get("moe", {}).get("eval_capacity_factor", 1.2) < 1:
        assert (fast_run[0].dropped_fraction > 0).all(), "the case drops routes"


def test_impl_keeps_parameter_names_tags_and_can_switch_at_run_time():
    fast, ref = _models()
    assert list(fast.state_dict()) == list(ref.state_dict())
    layer = fast.widenet.encoder.ffn[0].moe.deepspeed_moe
    experts = layer.experts
    assert isinstance(layer, GatherMOELayer) and isinstance(experts, BatchedExperts) and isinstance(experts, Experts)
    names = [n for n, _ in fast.named_parameters() if "deepspeed_experts" in n]
    assert "widenet.encoder.ffn.0.moe.deepspeed_moe.experts.deepspeed_experts.3.ffn.weight" in names
    for name, param in fast.named_parameters():
        tagged = getattr(param, "allreduce", True) is False and getattr(param, "group_name", None) == "ep_size_1"
        assert tagged == ("deepspeed_experts" in name), name
    batch = _batch(fast.config)
    ref_run = _run(ref, batch, train=True)
    fast.apply_moe_settings(MoESettings(impl="deepspeed"))
    assert not experts.batched and layer.impl == "deepspeed"
    assert fast.config.moe["impl"] == "deepspeed"
    _assert_same(_run(fast, batch, train=True), ref_run)


def _bf16_run(model, batch):
    model.bfloat16()
    out, grads = _run(model, batch, train=True)
    return out.loss.float(), {n: g.float() for n, g in grads.items()}


def test_grouped_runs_where_grouped_mm_is_fast_and_falls_back_to_batched_elsewhere(monkeypatch, caplog):
    assert grouped_mm_is_fast("cuda", torch.bfloat16, (9, 0)) and grouped_mm_is_fast("cuda", torch.bfloat16, (10, 0))
    assert not grouped_mm_is_fast("cuda", torch.bfloat16, (8, 0))  # Ampere: a loop after a host sync
    assert not grouped_mm_is_fast("cuda", torch.float16, (9, 0))  # the dense fallback, E x the work
    assert grouped_mm_is_fast("cpu", torch.float32, None)
    grouped, ref = _models(impl="grouped")
    monkeypatch.setattr(BatchedExperts, "forward_grouped", lambda *a: pytest.fail("the grouped experts ran"))
    monkeypatch.setattr(moe_module, "grouped_mm_is_fast", lambda *a: False)  # as on an A100
    batch = _batch(grouped.config)
    with caplog.at_level("WARNING"):
        _assert_same(_run(grouped, batch, train=True), _run(ref, batch, train=True))
        _run(grouped, batch, train=True)
    assert sum("running the 'batched' experts instead" in r.message for r in caplog.records) == 1


def test_grouped_matmuls_in_bf16_match_the_batched_experts(monkeypatch):
    """bf16 runs ``torch._grouped_mm`` (fp32 takes the dense fallback above). The rows past the last
    group are left undefined by it (forward and input gradients): here they are NaN, and neither the
    loss nor any gradient may see them. Same weights, same routes (eval: no noise): the two paths
    differ by bf16 rounding only."""
    grouped_mm = torch._grouped_mm
    tails, weight_grads = [], []

    def poisoned(a, b, offs=None, **kwargs):
        out = grouped_mm(a, b, offs=offs, **kwargs)
        if out.dim() == 3:  # a weight gradient (E, o, i)
            weight_grads.append(out.shape)
            return out
        tails.append(out.shape[0] - int(offs[-1]))
        out[int(offs[-1]):] = float("nan")
        return out

    monkeypatch.setattr(torch, "_grouped_mm", poisoned)
    grouped, batched = _models(impl="grouped")
    batched.apply_moe_settings(MoESettings(impl="batched"))
    batch = _batch(grouped.config)
    (loss_g, grads_g), (loss_b, grads_b) = _bf16_run(grouped, batch), _bf16_run(batched, batch)
    layers = grouped.config.num_hidden_layers
    assert min(tails) > 0 and len(tails) == 4 * layers, "grouped_mm ran forward and backward, with a tail"
    assert len(weight_grads) == 2 * layers
    torch.testing.assert_close(loss_g, loss_b, atol=2e-2, rtol=1e-2)
    for name, grad in grads_b.items():
        assert torch.isfinite(grads_g[name]).all(), name
        assert (grads_g[name] - grad).norm() <= 0.05 * grad.norm() + 1e-3, name


def test_compile_scope_is_checked():
    with pytest.raises(ValueError, match="compile scope 'all': choose one of model, blocks, parts"):
        compile_model(WideNetForPreTraining(_config("batched")), "all")


@pytest.mark.parametrize("variant, expected", [
    ("none", ("none", {})),
    ("model", ("model", {})),
    ("model:reduce-overhead", ("model", {"mode": "reduce-overhead"})),
    ("blocks:combo_kernels", ("blocks", {"options": {"combo_kernels": True}})),
    ("model:triton.cudagraphs=False:max_autotune_gemm_backends=ATEN",
     ("model", {"options": {"triton.cudagraphs": False, "max_autotune_gemm_backends": "ATEN"}})),
])
def test_compile_settings_parse_scope_mode_and_inductor_options(variant, expected):
    assert compile_settings(variant) == expected


def test_compile_settings_with_a_mode_and_options_keep_the_modes_options():
    scope, kwargs = compile_settings("model:reduce-overhead:combo_kernels")
    assert scope == "model" and kwargs["options"]["triton.cudagraphs"] is True  # what reduce-overhead means
    assert kwargs["options"]["combo_kernels"] is True and "mode" not in kwargs  # torch.compile takes one of them


@pytest.mark.parametrize("variant, graphs", [("none", False), ("model", False), ("model:reduce-overhead", True),
                                             ("blocks:max-autotune", True), ("model:max-autotune-no-cudagraphs", False),
                                             ("model:triton.cudagraphs", True), ("model:combo_kernels", False)])
def test_uses_cuda_graphs(variant, graphs):
    assert uses_cuda_graphs(variant) is graphs


def test_compile_settings_name_every_unknown_piece():
    with pytest.raises(ValueError) as err:
        compile_settings("graph:reduce_overhead:no_such_option=1:default:max-autotune")
    message = str(err.value)
    for piece in ("scope 'graph': choose one of model, blocks, parts", "'reduce_overhead' is neither a torch.compile "
                  "mode", "'no_such_option=1' is neither", "one mode at most, got default, max-autotune"):
        assert piece in message


def test_a_bad_compile_setting_stops_the_command_line():
    from widenet_ds.jobs.pretrain import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--compile", "model:cudagraphs"])
    assert build_parser().parse_args(["--compile", "model:reduce-overhead"]).compile == "model:reduce-overhead"


def test_unknown_impl_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"moe.impl must be one of \('batched', 'grouped', 'deepspeed'\), "
                                          r"got 'fast'"):
        WideNetConfig.from_preset("debug", moe={"impl": "fast"})


def test_batched_experts_match_the_loop_in_bf16_and_across_expert_parallel_groups():
    config = WideNetConfig.from_preset("debug")
    batched = BatchedExperts(FeedForward(config), num_local_experts=3, group_name="ep_size_2")
    for param in batched.parameters():
        torch.nn.init.normal_(param, std=0.3)
    assert all(p.allreduce is False and p.group_name == "ep_size_2" for p in batched.parameters())
    experts = batched
    x = torch.randn(2, 3, 5, config.hidden_size)  # (ep_size, local experts, capacity, H)
    loop = Experts.forward(experts, x)
    torch.testing.assert_close(batched(x), loop, atol=1e-5, rtol=1e-5)
    experts.bfloat16()
    for y in batched(x.bfloat16()), Experts.forward(experts, x.bfloat16()):  # bf16 rounding, both alike
        assert y.dtype == torch.bfloat16 and ((y.float() - loop).norm() / loop.norm()).item() < 1e-2


@pytest.mark.parametrize("scope", ["model", "blocks", "parts"])
def test_compile_model_keeps_names_and_outputs(scope):
    fast, ref = _models()
    compile_model(fast, scope, backend="eager")  # dynamo traces the whole scope; no code generation here
    assert list(fast.state_dict()) == list(ref.state_dict())
    batch = _batch(fast.config)
    _assert_same(_run(fast, batch, train=True), _run(ref, batch, train=True))


@pytest.mark.parametrize("impl", ["batched", "grouped"])
def test_the_whole_model_traces_as_one_graph(impl):
    """``compile_model(scope="model")`` is fast because the forward is one graph: a graph break would put
    Python between the pieces on every step (at ep_size 1; expert parallelism breaks once, by design)."""
    model = WideNetForPreTraining(_config(impl, None)).bfloat16()
    batch = _batch(model.config)
    positions = torch.tensor([[1, 3], [2, -1], [4, -1]])
    explained = torch._dynamo.explain(model)(**batch, mlm_positions=positions)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_dispatch_combine_and_expert_linear_gradients_are_exact():
    """float64 gradcheck of the fast path's autograd functions, with dropped routes and empty slots."""
    torch.manual_seed(0)
    S, M, E, C = 6, 3, 4, 2
    logits = torch.randn(S, E) + torch.tensor([3.0, 0.0, 0.0, -3.0])  # expert 0 overflows, expert 3 idles
    _, _, _, indices_KS, locations_KS, gates_KS, _ = top_k_route(logits, 2, C, torch.tensor([1, 1, 1, 1, 1, 0]))
    assert (indices_KS == -1).sum() > 1, "dropped routes and padding"
    gates_KS = gates_KS.double().requires_grad_()
    slot_KS, source_X, gate_X = route_maps(indices_KS, locations_KS, gates_KS, E, C)
    assert (source_X == S).any(), "empty slots"
    x_SM = torch.randn(S, M, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: _Dispatch.apply(x, slot_KS, source_X), (x_SM,))
    out_XM = torch.randn(E * C, M, dtype=torch.float64, requires_grad=True)
    gate_X = gate_X.double()
    torch.autograd.gradcheck(lambda o, g: _Combine.apply(o, g, slot_KS, source_X, gate_X), (out_XM, gates_KS))
    args = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((2, 5, 3), (2, 4, 3), (2, 4))]
    torch.autograd.gradcheck(_ExpertLinear.apply, args)
    expert_X = torch.tensor([0, 0, 1, 3, 3, 3, 4, 4])  # packed rows; 4 = E: past the last group, no bias
    y_XO, b_EO = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((8, 3), (4, 3)))
    torch.autograd.gradcheck(lambda y, b: _RowBias.apply(y, b, expert_X), (y_XO, b_EO))
    torch.testing.assert_close(_RowBias.apply(y_XO, b_EO, expert_X)[-2:], y_XO[-2:])


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_grouped_linear_matches_per_expert_matmuls_forward_and_backward(backend):
    """``_GroupedLinear`` (bf16, ``torch._grouped_mm`` in all three matmuls) against each group's rows times
    its expert's weight in fp32: groups of 16, 0 (an expert with no routes) and 32 rows, then 16 rows
    past the last group (their outputs and input gradients are undefined; their output gradient is zero,
    as the masking before the bias makes it, and must not reach the weight gradient)."""
    torch.manual_seed(0)
    end_E = torch.tensor([16, 16, 48], dtype=torch.int32)
    x_XI = torch.randn(64, 24).bfloat16().requires_grad_()
    w_EOI = torch.randn(3, 40, 24).bfloat16().requires_grad_()
    grad_XO = torch.randn(64, 40).bfloat16()
    grad_XO[48:] = 0
    x_XI.detach()[48:] = float("nan")  # rows past the last group are ignored
    fn = _GroupedLinear.apply if backend is None else torch.compile(_GroupedLinear.apply, backend=backend, fullgraph=True)
    out = fn(x_XI, w_EOI, end_E)
    out.backward(grad_XO)
    x, w, g = (t.detach().float().requires_grad_() for t in (x_XI, w_EOI, grad_XO))
    ref = torch.cat([x[0:16] @ w[0].t(), x[16:48] @ w[2].t()])
    ref.backward(g[:48])
    torch.testing.assert_close(out[:48].float(), ref, atol=0.1, rtol=0.02)
    torch.testing.assert_close(x_XI.grad[:48].float(), x.grad[:48], atol=0.1, rtol=0.02)
    assert (w_EOI.grad[1] == 0).all()
    torch.testing.assert_close(w_EOI.grad.float(), w.grad, atol=0.2, rtol=0.02)
    assert w_EOI.grad.is_contiguous() and w_EOI.grad.shape == w_EOI.shape


def test_received_slots_are_packed_expert_after_expert_and_back():
    """Expert parallelism, grouped: the (G, L, C) slots a rank received, the first counts[g, l] of each
    block filled, packed per local expert (ranks in order) into 16-aligned groups, and unpacked."""
    counts_GL = torch.tensor([[2, 0], [1, 3]])  # rank 0 sent 2 routes to local expert 0, none to 1; rank 1: 1 and 3
    source_P, packed_X, end_L, expert_P, P = received_packing(counts_GL, capacity=3)
    X = 2 * 2 * 3  # received slot (g, l, c) is g * 6 + l * 3 + c
    assert P == 48 and end_L.tolist() == [16, 32] and end_L.dtype == torch.int32
    assert packed_X.tolist() == [0, 1, P, P, P, P, 2, P, P, 16, 17, 18]
    assert source_P[:3].tolist() == [0, 1, 6] and source_P[16:19].tolist() == [9, 10, 11]
    assert (source_P[3:16] == X).all() and (source_P[19:] == X).all()
    assert expert_P.tolist() == [0] * 16 + [1] * 16 + [2] * 16
    slots_XM = torch.randn(X, 3, dtype=torch.float64, requires_grad=True)
    pack = lambda x: _Dispatch.apply(x, packed_X[None], source_P)  # noqa: E731 (one route per row)
    unpack = lambda y: _Dispatch.apply(y, source_P[None], packed_X)  # noqa: E731
    filled = packed_X < P
    torch.testing.assert_close(unpack(pack(slots_XM))[filled], slots_XM[filled])
    assert (unpack(pack(slots_XM))[~filled] == 0).all()
    torch.autograd.gradcheck(pack, (slots_XM,))
    torch.autograd.gradcheck(unpack, (torch.randn(P, 3, dtype=torch.float64, requires_grad=True),))


ROOT = Path(__file__).resolve().parents[1]  # the benchmarks run as modules from here: python -m benchmarks.X
BENCH = [sys.executable, "-m", "benchmarks.bench_train"]
EP_BENCH = ["--module", "benchmarks.bench_ep"]  # for deepspeed's launcher


def _bench_module():
    return importlib.import_module("benchmarks.bench_train")


@pytest.mark.parametrize("preset_overrides", [dict(num_experts=1, top_k=1), dict(num_experts=4, top_k=2)])
def test_benchmark_flop_formula_counts_every_matmul(preset_overrides):
    """The benchmark's forward FLOPs equal PyTorch's FLOP counter on the model (MoE: with every expert
    slot counted as a route, as the experts compute them; the benchmark counts kept routes only)."""
    bench = _bench_module()
    config = WideNetConfig.from_preset("debug", **preset_overrides, moe={"min_capacity": 0})
    model = WideNetForPreTraining(config).eval()
    batch, seq = 3, 10
    inputs = _batch(config, lengths=(seq,) * batch)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # attention as counted matmuls
        model(**inputs)
    slots = None
    if config.num_experts > 1:
        layer = model.widenet.encoder.ffn[0]
        slots = config.num_experts * layer.gate.capacity(batch * seq)
    assert counter.get_total_flops() == bench.forward_flops(config, batch, seq, slots)
    positions = torch.tensor([[1, 4, 6], [2, -1, -1], [3, 5, -1]])  # the MLM head at 3 positions per row
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(**inputs, mlm_positions=positions)
    assert counter.get_total_flops() == bench.forward_flops(config, batch, seq, slots, mlm_positions=3)


@pytest.mark.slow
def test_benchmark_script_runs_on_cpu_in_smoke_mode(tmp_path):
    # one dense and one MoE preset and stack (each row costs ~0.5 s here): every code path of the script
    command = [*BENCH, "--smoke", "--presets", "albert-base", "widenet-base-e4",
               "--stacks", "dense", "moe-e4-top2", "--breakdown", "--out", str(tmp_path), "--name", "smoke"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert [r["error"] for r in rows if r["error"]] == []
    measured = [(r["table"], r["model"], r["impl"]) for r in rows]
    assert measured == [("train", "albert-base", "-"), ("train", "widenet-base-e4", "batched"),
                        ("train", "widenet-base-e4", "grouped"), ("train", "widenet-base-e4", "deepspeed"),
                        ("hf", "hf-albert-base", "-"), ("stack", "dense", "-"), ("stack", "moe-e4-top2", "batched"),
                        ("stack", "moe-e4-top2", "grouped"), ("stack", "moe-e4-top2", "deepspeed")]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["model_tflop_per_step"] > 0 and r["mfu"] > 0
        if "-e" in r["model"] and r["table"] != "hf":
            assert 0 < r["kept_routes_per_token"] <= 2
        if r["table"] != "stack":  # the fixed batch is being learnt
            assert r["loss_last"] < r["loss_first"]
    assert [r["time_per_flop_vs_dense"] for r in rows if r["model"] == "dense"] == [1.0]
    table = (tmp_path / "smoke.md").read_text()
    assert "| widenet-base-e4 | batched | none | 1:fp32 | masked | 16 |" in table and "time / FLOP vs dense" in table
    for r in rows:  # --breakdown: each phase queued, then finished, within the step
        phases = ("forward", "backward") + (("optimizer",) if r["table"] != "stack" else ())
        assert tuple(r["phases"]) == phases
        assert all(0 < v["host_ms"] <= v["total_ms"] for v in r["phases"].values())
    assert "## Phases (--breakdown)" in table


@pytest.mark.distributed
def test_benchmark_trains_on_real_text_batches_it_cycles_through(tmp_path):
    """benchmarks/text_batches.py (the pretraining data path on the fixture book) -> bench_train --batches:
    every step takes the next batch of the file."""
    from data.helpers import VOCAB_SIZE, write_book

    made = tmp_path / "text.pt"
    maker = [sys.executable, "-m", "benchmarks.text_batches", "--text", str(write_book(tmp_path / "text")),
             "--seq", "16", "--batch", "2", "--count", "2", "--vocab_size", str(VOCAB_SIZE),
             "--work_dir", str(tmp_path / "work"), "--out", str(made)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(maker, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = torch.load(made, weights_only=True)
    assert saved["input_ids"].shape == (2, 2, 16) and saved["mlm_positions"].shape[:2] == (2, 2)
    assert (saved["labels"] != -100).sum() == (saved["mlm_positions"] >= 0).sum() > 0

    command = [*BENCH, "--smoke", "--tables", "train", "hf", "--presets", "widenet-base-e4",
               "--impls", "grouped", "--warmup", "1", "--batches", str(made), "--out", str(tmp_path), "--name", "t"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "t.json").read_text())
    assert [r["error"] for r in results["rows"]] == [None, None]
    assert "2 real-text batches of seq 16" in results["meta"]["batches"][0]
    assert all(len(r["losses"]) == 3 for r in results["rows"])

    bench, common = _bench_module(), importlib.import_module("benchmarks.common")
    args = bench.parse_args(["--smoke", "--batches", str(made)])
    feed = bench.batch_feed(args.text, args.batch, vocab=512, seq=16, device=torch.device("cpu"), mlm_positions=True)
    for step in range(5):  # the file's batches in turn, each key as saved
        batch = feed()
        assert {k: v.dtype for k, v in batch.items()} == {k: torch.long for k in common.TEXT_KEYS}
        assert all(torch.equal(batch[k], saved[k][step % 2].long()) for k in common.TEXT_KEYS)
    assert "mlm_positions" not in bench.batch_feed(args.text, 2, 512, 16, torch.device("cpu"), mlm_positions=False)()
    second_rank = bench.batch_feed(args.text, 2, 512, 16, torch.device("cpu"), mlm_positions=True, rank=1,
                                  world=2)
    assert all(torch.equal(second_rank()["input_ids"], saved["input_ids"][1].long()) for _ in range(3))

    ep_out = tmp_path / "ep2.json"  # the expert-parallel benchmark on the same file: rank r its r-th batches
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(29600 + os.getpid() % 1000), *EP_BENCH, "--smoke", "--ep_size", "2",
               "--seq", "16", "--batch", "2", "--batches", str(made), "--out", str(ep_out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(ep_out.read_text())
    assert (record["batches"], record["mlm_head"], record["seq"]) == ([str(made)], "masked", 16)
    with pytest.raises(SystemExit):  # another batch size than the file's, before any compute
        bench.parse_args(["--batches", str(made), "--batch", "4", "--seqs", "16"])
    with pytest.raises(SystemExit):  # no file for a sequence length of the run
        bench.parse_args(["--batches", str(made), "--batch", "2", "--seqs", "16", "32"])


@pytest.mark.slow
def test_benchmark_times_steps_of_several_micro_batches(tmp_path):
    """--grad_accum 3: a timed step is 3 micro-batches and one optimizer step (tokens and FLOPs x 3); CUDA graphs
    with accumulation under a config that keeps gradients between micro-batches are refused before any compute."""
    bench = _bench_module()
    command = [*BENCH, "--smoke", "--tables", "train", "hf", "--presets", "widenet-base-e4",
               "--impls", "grouped", "--grad_accum", "3", "--out", str(tmp_path), "--name", "acc"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((tmp_path / "acc.json").read_text())
    args = bench.parse_args(["--smoke"])
    for row in saved["rows"]:
        assert row["error"] is None and row["grad_accum"] == 3 and len(row["losses"]) == 3  # 1 warm-up + 2 steps
        assert row["tokens_per_s"] == pytest.approx(2 * 16 * 3 / (row["ms_per_step"] / 1e3))
    train = saved["rows"][0]
    config = bench.model_config("widenet-base-e4", args, "grouped")
    kept = train["kept_routes_per_token"] * 2 * 16
    expected = 3 * 3 * bench.forward_flops(config, 2, 16, kept, mlm_positions=bench.num_to_predict(16, 0.15, None))
    assert train["model_tflop_per_step"] == pytest.approx(expected / 1e12)
    assert "AdamW, 3 micro-batches per step" in (tmp_path / "acc.md").read_text()

    measure = bench.Measure(bench.parse_args(["--smoke", "--grad_accum", "3"]), torch.device("cpu"), 1.0, tmp_path)
    refused = bench.bench_widenet(measure, "widenet-base-e4", "grouped", 16, "model:reduce-overhead", "0")
    assert "overwrite the gradients this engine keeps between the 3 micro-batches" in refused.error


@pytest.mark.slow
def test_benchmark_starts_from_an_exported_model_with_init(tmp_path):
    """--init: the train rows start from an exported model's weights (here one whose MLM output bias puts
    +40 on a token no label uses: the first loss is ~40 higher than from fresh weights), its
    vocabulary with it; another preset's architecture is refused before any compute."""
    bench = _bench_module()
    args = bench.parse_args(["--smoke"])
    config = bench.model_config("widenet-base-e4", args, "grouped", vocab_size=600)
    model = WideNetForPreTraining(config)
    with torch.no_grad():
        model.predictions.bias[599] = 40.0  # make_batch draws ids below the vocabulary: label 599 is rare
    model.save_pretrained(tmp_path / "export")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = {}
    for name, extra in (("fresh", []), ("init", ["--init", str(tmp_path / "export")])):
        command = [*BENCH, "--smoke", "--tables", "train", "--presets", "widenet-base-e4",
                   "--impls", "grouped", "--out", str(tmp_path), "--name", name, *extra]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (row,) = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert row["error"] is None
        first[name] = row["loss_first"]
    assert first["init"] > first["fresh"] + 30
    assert f"start from the weights of {tmp_path / 'export'}" in (tmp_path / "init.md").read_text()
    with pytest.raises(SystemExit):  # an ALBERT preset cannot take a WideNet's weights
        bench.parse_args(["--smoke", "--presets", "albert-base", "--init", str(tmp_path / "export")])
    with pytest.raises(SystemExit):  # no exported model there
        bench.parse_args(["--smoke", "--init", str(tmp_path)])


@pytest.mark.distributed
def test_expert_parallel_benchmark_runs_on_two_cpu_ranks(tmp_path):
    """bench_ep.py at ep_size 2 on 2 CPU ranks: from fresh weights (batched), and from an exported model
    (grouped; its MLM output bias puts +40 on a rare label: the first loss is ~40 higher), each rank
    loading its own half of the experts."""
    bench = _bench_module()
    config = bench.model_config("debug", bench.parse_args(["--smoke"]), "grouped", vocab_size=600)
    model = WideNetForPreTraining(config)
    with torch.no_grad():
        model.predictions.bias[599] = 40.0
    model.save_pretrained(tmp_path / "export")
    records = {}
    for name, extra in (("fresh", ["--impl", "batched"]), ("init", ["--impl", "grouped", "--init", str(tmp_path / "export")])):
        out = tmp_path / f"{name}.json"
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                   "--master_port", str(29700 + os.getpid() % 1000), *EP_BENCH, "--smoke",
                   "--ep_size", "2", "--zero", "1:fp32", "--out", str(out), *extra]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        records[name] = record = json.loads(out.read_text())
        assert (record["world"], record["ep_size"], record["zero"]) == (2, 2, "1:fp32")
        assert record["ms_per_step"] > 0 and record["tokens_per_s_per_gpu"] > 0
        assert 0 < record["kept_routes_per_token"] <= 2
    assert records["init"]["loss_first_last"][0] > records["fresh"]["loss_first_last"][0] + 30
    assert records["init"]["init"] == str(tmp_path / "export") and records["fresh"]["init"] is None


@pytest.mark.parametrize("impl", ["batched", "grouped"])
def test_the_experts_train_under_autocast_with_fp32_weights(impl):
    """Mixed precision as ``torch.autocast`` gives it (fp32 weights, bf16 matmuls), the way a plain
    PyTorch loop such as the image benchmark trains: a whole step runs, every gradient comes back fp32
    and finite, and the loss is the fp32 step's up to bf16 rounding (bf16 may flip near-tied routes,
    so gradients are compared op by op in the next test)."""
    model, _ = _models(impl=impl)
    batch = _batch(model.config)
    loss_32 = _run(model, batch, train=False)[0].loss
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss.float(), loss_32.float(), atol=5e-2, rtol=2e-2)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_expert_matmuls_under_autocast_match_autocast_of_the_plain_ops():
    """Under ``torch.autocast`` the experts' custom matmuls give what autocast gives the same plain ops
    (bf16 operands, fp32 accumulate), forward and every gradient, each gradient in its input's dtype."""
    from widenet_ds.modeling.experts import _ExpertLinear

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g, requires_grad=True) for shape in ((3, 5, 8), (3, 6, 8), (3, 6)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        custom = _ExpertLinear.apply(x, w, b)
        plain = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    assert custom.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(custom, plain)
    grad_out = torch.randn(custom.shape, generator=g).bfloat16()
    custom_grads = torch.autograd.grad(custom, (x, w, b), grad_out)
    plain_grads = torch.autograd.grad(plain, (x, w, b), grad_out)
    for got, want, param in zip(custom_grads, plain_grads, (x, w, b)):
        assert got.dtype == param.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
