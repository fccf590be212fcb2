"""The fused bias + activation kernels of the grouped experts (widenet_ds/modeling/fused_act.py).

On the CPU they run in Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before Triton sees a kernel: the checks run in a child process. Without it, on the CPU, the
grouped experts take the unfused ops that test_fast_path.py checks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from widenet_ds.modeling import fused_act
from widenet_ds.modeling.experts import bias_act_ops
from widenet_ds.modeling.fused_act import fused_bias_act_runs
from widenet_ds.modeling.layers import ACTIVATION_FNS

HERE = Path(__file__).resolve().parent


def _in_interpreter(check: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_fused_act; test_fused_act.{check}()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"{check} passed" in run.stdout


def _check_kernels():
    """Groups starting at multiples of the tile's 16 rows, as packed: 144 rows of expert 0, none of
    expert 1, 160 of expert 2, then 88 past the last group (expert E = 3; 392 rows: the last tile is
    cut); columns not a multiple of the block (300); strips of 256 rows that start inside a group
    and cross expert boundaries; eager and compiled (aot_eager) alike."""
    torch.manual_seed(0)
    E, I = 3, 300
    expert_X = torch.tensor([0] * 144 + [2] * 160 + [3] * 88)
    compiled = torch.compile(fused_act.bias_act, backend="aot_eager", fullgraph=True)
    for act in fused_act.ACTS:
        for fn in fused_act.bias_act, compiled:
            h = (torch.randn(len(expert_X), I) * 2).bfloat16().requires_grad_()
            b = torch.randn(E, I).bfloat16().requires_grad_()
            grad = torch.randn(len(expert_X), I).bfloat16()
            out = fn(h, b, expert_X, act)
            out.backward(grad)
            hf, bf = (t.detach().float().requires_grad_() for t in (h, b))
            ref = bias_act_ops(hf, bf, expert_X, ACTIVATION_FNS[act])  # the unfused ops, in fp32
            ref.backward(grad.float())
            assert out.dtype == h.grad.dtype == b.grad.dtype == torch.bfloat16, act
            torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=0.01)
            torch.testing.assert_close(h.grad.float(), hf.grad, atol=0.02, rtol=0.01)
            torch.testing.assert_close(b.grad.float(), bf.grad, atol=0.05, rtol=0.01)
            assert (out[304:] == 0).all() and (h.grad[304:] == 0).all() and (b.grad[1] == 0).all(), act
    print("_check_kernels passed")


def _check_model():
    """A grouped WideNet in bf16 with the fused kernel against the batched experts (unfused): loss and
    every gradient, bf16 rounding apart; the kernel ran once per block, each way."""
    from test_fast_path import _batch, _bf16_run, _models

    from widenet_ds import MoESettings
    from widenet_ds.modeling import experts

    calls = []
    fused = experts.bias_act

    def counting(h, b, expert, act):
        calls.append(act)
        assert experts.fused_bias_act_runs(h, act)
        return fused(h, b, expert, act)

    experts.bias_act = counting
    grouped, batched = _models(impl="grouped")
    batched.apply_moe_settings(MoESettings(impl="batched"))
    batch = _batch(grouped.config)
    (loss_g, grads_g), (loss_b, grads_b) = _bf16_run(grouped, batch), _bf16_run(batched, batch)
    assert calls == [grouped.config.hidden_act] * grouped.config.num_hidden_layers
    torch.testing.assert_close(loss_g, loss_b, atol=2e-2, rtol=1e-2)
    for name, grad in grads_b.items():
        assert torch.isfinite(grads_g[name]).all(), name
        assert (grads_g[name] - grad).norm() <= 0.05 * grad.norm() + 1e-3, name
    print("_check_model passed")


@pytest.mark.slow
def test_fused_bias_act_matches_the_unfused_ops_forward_and_backward():
    _in_interpreter("_check_kernels")


@pytest.mark.slow
def test_grouped_model_with_the_fused_kernel_matches_the_batched_experts():
    _in_interpreter("_check_model")


def test_fused_kernel_runs_where_triton_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(16, 8)
    assert fused_act.triton is not None, "Triton is a requirement (requirements.txt)"
    assert not fused_bias_act_runs(x, "gelu_new"), "the CPU without the interpreter: the unfused ops"
    assert fused_bias_act_runs(torch.zeros(16, 8, device="meta"), "gelu_new") is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_bias_act_runs(x, "gelu_new") and fused_bias_act_runs(x, "relu")
    assert not fused_bias_act_runs(x, "silu"), "an activation the kernel does not know: the unfused ops"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not fused_bias_act_runs(x, "gelu_new"), "deterministic algorithms: the bias gradient's atomics are not"


@pytest.mark.parametrize("fused", [True, False])
def test_the_moe_fused_act_setting_switches_the_kernel(monkeypatch, fused):
    """``moe.fused_act`` (the DeepSpeed JSON's moe block, recorded in the config): on, the grouped experts
    call the kernel where it can run (here: the interpreter's conditions, the kernel itself replaced by
    its plain-ops twin); off, they never do. Same results either way; switchable at run time."""
    from test_fast_path import _batch, _models, _run

    from widenet_ds import MoESettings
    from widenet_ds.modeling import experts

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    monkeypatch.setattr(experts, "bias_act",
                        lambda h, b, e, act: calls.append(act) or bias_act_ops(h, b, e, ACTIVATION_FNS[act]))
    grouped, ref = _models(impl="grouped", moe={"fused_act": fused})
    assert grouped.config.moe["fused_act"] is fused
    batch = _batch(grouped.config)
    grouped_run = _run(grouped, batch, train=True)
    assert len(calls) == (grouped.config.num_hidden_layers if fused else 0)
    torch.testing.assert_close(grouped_run[0].loss, _run(ref, batch, train=True)[0].loss)
    grouped.apply_moe_settings(MoESettings(impl="grouped", fused_act=not fused))
    calls.clear()
    _run(grouped, batch, train=True)
    assert len(calls) == (0 if fused else grouped.config.num_hidden_layers)


def test_a_fused_act_that_is_not_a_boolean_is_refused():
    from widenet_ds import ConfigError, WideNetConfig

    with pytest.raises(ConfigError, match="moe.fused_act must be true or false, got 'off'"):
        WideNetConfig.from_preset("debug", moe={"fused_act": "off"})


@pytest.mark.slow
def test_expert_benchmark_runs_on_cpu_in_smoke_mode(tmp_path):
    """benchmarks/bench_experts.py (the fused kernels' measurement), interpreted: both variants ran on
    the same inputs and agree; the kernel check is within bf16 rounding."""
    out = tmp_path / "experts.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_experts", "--smoke", "--out", str(out)], cwd=HERE.parent,
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    unfused, fused = result["variants"]
    assert (unfused["variant"], fused["variant"]) == ("unfused", "fused") and min(fused["ms"]) > 0
    assert (unfused["fused_kernel"], fused["fused_kernel"]) == (False, True)
    assert result["rows"] % 16 == 0 and sum(result["kept_routes"]) < result["rows"]
    for name, value in unfused["checksums"].items():
        assert abs(fused["checksums"][name] - value) <= 0.02 * abs(value), name
    for act, (out_error, input_grad_error, bias_grad_error) in result["kernel_check"].items():
        assert out_error < 0.05 and input_grad_error < 0.05 and bias_grad_error < 0.01, act
