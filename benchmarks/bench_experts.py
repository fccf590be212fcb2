"""The grouped experts of one MoE layer alone, forward + backward, compiled, on one GPU: the fused
bias + activation kernels (widenet_ds/modeling/fused_act.py) against the unfused ops, at a trained
router's load (every expert ~1/E of the kept routes, groups padded to 16 rows as the packing does).

    python -m benchmarks.bench_experts --out runs/benchmarks/experts.json
    TRITON_INTERPRET=1 python -m benchmarks.bench_experts --smoke --out /tmp/smoke.json   # CPU (the test)

Writes, per variant, the time of forward + backward and its TFLOP/s (the three matmuls of each FFN
layer over the kept routes), the CUDA kernel table and checksums (same inputs, same weights); then
the fused kernels against fp32 references of the unfused ops for every activation, and (CUDA) the
kernels' times for a few tile shapes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from widenet_ds import WideNetConfig
from widenet_ds.modeling import BatchedExperts, FeedForward, fused_act
from widenet_ds.modeling.experts import bias_act_ops
from widenet_ds.modeling.layers import ACTIVATION_FNS
from widenet_ds.modeling.packing import packed_slots

from .common import kernel_table, time_calls

TILES = [(256, 256), (128, 256), (512, 256), (256, 128), (256, 512)]  # (BLOCK_N, STRIP_M)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="widenet-base-e4")
    p.add_argument("--tokens", type=int, default=64 * 512, help="tokens of one micro-batch")
    p.add_argument("--routes_per_token", type=float, default=1.91, help="kept routes (a trained router: ~1.91)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (3 measurements)")
    p.add_argument("--out", type=Path, required=True, help="result JSON, e.g. runs/benchmarks/experts.json")
    p.add_argument("--smoke", action="store_true", help="debug preset, 64 tokens, CPU (set TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.tokens, args.repeats = "debug", 64, 1
    return args


def packed_rows(tokens: int, routes_per_token: float, num_experts: int, device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          list[int], int]:
    """``end_E``, ``expert_X``, the kept routes per expert and the row count of the layer's packing
    (``packing.packed_slots``, top-2, C = 1.2) when each expert keeps ~1/E of the routes."""
    share = tokens * routes_per_token / num_experts
    kept = [round(share * (1 + 0.01 * (2, -3, 1, 0)[e % 4])) for e in range(num_experts)]  # a little uneven
    no_routes_KS = torch.full((2, tokens), -1, device=device)  # only the group layout is wanted
    _, end_E, expert_X, X = packed_slots(no_routes_KS, no_routes_KS, torch.tensor(kept, device=device),
                                         int(1.2 * 2 * tokens / num_experts + 1))
    return end_E, expert_X, kept, X


def main(args) -> dict:
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = WideNetConfig.from_preset(args.preset)
    E = config.num_experts
    experts = BatchedExperts(FeedForward(config), num_local_experts=E, group_name="ep_size_1")
    experts = experts.to(device).bfloat16()
    M, I, act = config.hidden_size, config.intermediate_size, config.hidden_act
    end_E, expert_X, kept, X = packed_rows(args.tokens, args.routes_per_token, E, device)
    g = torch.Generator(device=device).manual_seed(0)
    x_XM = torch.randn(X, M, device=device, generator=g).bfloat16()
    grad_XM = torch.randn(X, M, device=device, generator=g).bfloat16() * (expert_X < E)[:, None]
    for e, k in enumerate(kept):  # a group's padding rows: zero input (as dispatched), zero gradient
        start = int(end_E[e - 1]) if e else 0
        x_XM[start + k:int(end_E[e])] = 0
        grad_XM[start + k:int(end_E[e])] = 0
    x_XM.requires_grad_()
    flops = 3 * 2 * 2 * sum(kept) * M * I
    result = {"preset": args.preset, "tokens": args.tokens, "rows": X, "kept_routes": kept, "activation": act,
              "flops": flops, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "variants": []}

    def step(fn):
        fn(x_XM).backward(grad_XM)

    def clear_grads():
        for t in (x_XM, *experts.parameters()):
            t.grad = None

    for variant in ("unfused", "fused"):
        fused = variant == "fused"  # the moe.fused_act setting
        torch._dynamo.reset()
        fn = torch.compile(lambda t: experts.forward_grouped(t, end_E, expert_X, fused_act=fused))
        start = time.perf_counter()
        for _ in range(3):
            step(fn)
        sync()
        record = {"variant": variant, "fused_kernel": fused and fused_act.fused_bias_act_runs(x_XM, act),
                  "compile_s": round(time.perf_counter() - start, 1), "ms": time_calls(lambda: step(fn), sync, args.repeats)}
        record["tflop_per_s"] = round(flops / min(record["ms"]) / 1e9, 1)
        if cuda:
            record["kernels_us"] = kernel_table(lambda: step(fn), sync)
        clear_grads()
        out = fn(x_XM)
        out.backward(grad_XM)
        first = experts.deepspeed_experts[0]
        rows = int(end_E[-1])
        record["checksums"] = {"out_sq_mean": out[:rows].float().square().mean().item(),
                               **{name: p.grad.float().norm().item() for name, p in first.named_parameters()},
                               "x_grad": x_XM.grad[:rows].float().norm().item()}
        clear_grads()
        result["variants"].append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "kernels_us"}), flush=True)
    result["kernel_check"] = kernel_check(X, I, E, expert_X, device, g)
    if cuda:
        result["tiles"] = tile_sweep(X, I, E, expert_X, act, device, g)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


def kernel_check(X, I, E, expert_X, device, g) -> dict:
    """The fused kernels against the unfused ops in fp32 for every activation: max |output error|,
    max |input-gradient error|, max |bias-gradient error| / max |bias gradient|."""
    h = (torch.randn(X, I, device=device, generator=g) * 2).bfloat16().requires_grad_()
    b = torch.randn(E, I, device=device, generator=g).bfloat16().requires_grad_()
    grad = torch.randn(X, I, device=device, generator=g).bfloat16()
    errors = {}
    for act in fused_act.ACTS:
        h.grad = b.grad = None
        out = fused_act.bias_act(h, b, expert_X, act)
        out.backward(grad)
        hf, bf = (t.detach().float().requires_grad_() for t in (h, b))
        ref = bias_act_ops(hf, bf, expert_X, ACTIVATION_FNS[act])
        ref.backward(grad.float())
        errors[act] = [(out.float() - ref).abs().max().item(), (h.grad.float() - hf.grad).abs().max().item(),
                       ((b.grad.float() - bf.grad).abs().max() / bf.grad.abs().max()).item()]
    return errors


def tile_sweep(X, I, E, expert_X, act, device, g, calls: int = 30) -> list[dict]:
    """Each fused kernel's time (us) for a few (BLOCK_N, STRIP_M) tile shapes; the defaults come back after."""
    h = torch.randn(X, I, device=device, generator=g).bfloat16()
    b = torch.randn(E, I, device=device, generator=g).bfloat16()
    grad = torch.randn(X, I, device=device, generator=g).bfloat16()

    def us(fn):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return round(start.elapsed_time(end) * 1000 / calls, 1)

    defaults, rows = (fused_act.BLOCK_N, fused_act.STRIP_M), []
    for fused_act.BLOCK_N, fused_act.STRIP_M in TILES:
        rows.append({"BLOCK_N": fused_act.BLOCK_N, "STRIP_M": fused_act.STRIP_M,
                     "forward_us": us(lambda: fused_act.bias_act(h, b, expert_X, act)),
                     "backward_us": us(lambda: fused_act.bias_act_backward(grad, h, b, expert_X, act))})
    fused_act.BLOCK_N, fused_act.STRIP_M = defaults
    return rows


if __name__ == "__main__":
    main(parse_args())
