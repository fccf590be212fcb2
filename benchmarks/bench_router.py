"""The router of one MoE layer alone, forward + backward, compiled, on one GPU: fp32 logits of bf16
activations (E = 4) and top-2 choices: the plain formulation (fp32 ``F.linear`` + ``torch.topk``, the
reference), the gate's (``gate.router_logits`` + ``gate.top_k_choices``), and candidate formulations.

    python -m benchmarks.bench_router --out runs/benchmarks/router.json
    python -m benchmarks.bench_router --smoke --out /tmp/router.json   # CPU, 512 tokens (the test)

Each variant: softmax of the logits, top-2 choices, their gates, a loss of the gates and of the mean
probabilities, backward to the activations and the router weight. Writes per variant the wall time of
a compiled call (launches included: no CUDA graphs), the GPU time of its kernels (profiler), its largest
kernels, and whether the choices and gradients agree with the first variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from widenet_ds.modeling.gate import router_logits, top_k_choices

from .common import kernel_table, time_calls


def linear_logits(x, w):  # reference: an fp32 matmul over an fp32 copy of the activations
    return F.linear(x.float(), w.float())


def per_expert_logits(x, w):  # candidate: one sum per expert (Inductor fuses them into one reduction)
    return torch.stack([(x.float() * w[e].float()).sum(-1) for e in range(w.shape[0])], dim=-1)


def torch_topk(scores, k):  # reference: a selection kernel and a sort
    return torch.topk(scores, k, dim=-1).indices


VARIANTS = {
    "linear+topk (reference)": (linear_logits, torch_topk),
    "multiply-sum+argmax (gate)": (router_logits, top_k_choices),
    "per-expert sums+argmax": (per_expert_logits, top_k_choices),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64 * 512, help="tokens of one micro-batch")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (5 measurements)")
    p.add_argument("--out", type=Path, required=True, help="result JSON, e.g. runs/benchmarks/router.json")
    p.add_argument("--smoke", action="store_true", help="512 tokens on the CPU, 2 calls")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.repeats = 512, 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device=device, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(args.experts, args.hidden, device=device, generator=g) * 0.02).bfloat16().requires_grad_()
    coef = torch.randn(args.tokens, 2, device=device, generator=g)
    ranks = torch.arange(args.experts, device=device)

    def make(logits_fn, choice_fn):
        def step(x, w):
            probs = F.softmax(logits_fn(x, w), -1)
            choice = choice_fn(probs, 2)
            loss = (probs.gather(1, choice) * coef).sum() + (probs.mean(0) * ranks).sum()
            loss.backward()
            return choice
        return torch.compile(step)

    def call(fn):
        x.grad = w.grad = None
        return fn(x, w)

    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "tokens": args.tokens, "hidden": args.hidden, "experts": args.experts, "variants": []}
    reference = None
    for name, (logits_fn, choice_fn) in VARIANTS.items():
        torch._dynamo.reset()
        fn = make(logits_fn, choice_fn)
        rec = {"name": name}
        start = time.time()
        for _ in range(3):
            choice = call(fn)
        sync()
        rec["compile_s"] = round(time.time() - start, 1)
        result = (choice.clone(), x.grad.float().clone(), w.grad.float().clone())
        if reference is None:
            reference = result
        rec["choices_equal"] = bool(torch.equal(result[0], reference[0]))
        for key, got, want in (("x_grad", result[1], reference[1]), ("w_grad", result[2], reference[2])):
            rec[f"{key}_max_rel_diff"] = float((got - want).abs().max() / want.abs().max())
        rec["wall_ms"] = min(time_calls(lambda: call(fn), sync, args.repeats, measurements=5))
        if device.type == "cuda":
            kernels = kernel_table(lambda: call(fn), sync, calls=args.repeats, top=None)
            rec["gpu_us"] = round(sum(us for us, _ in kernels), 1)
            rec["kernels_us"] = kernels[:10]
        print(f"[router] {name}: {({k: v for k, v in rec.items() if k != 'kernels_us'})}", flush=True)
        report["variants"].append(rec)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"[router] wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
