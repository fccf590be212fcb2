"""Training throughput of the vision models at 224 px on one GPU: WideNet-B (``widenet-vit-b``) against
ViT-B/16 (``vit-b16``), forward + backward + AdamW step in bf16 autocast.

    python -m benchmarks.bench_vit --out runs/benchmarks/vit.json
    python -m benchmarks.bench_vit --presets widenet-vit-b vit-b16 vit-moe-b16 --batch 128 --compile
    python -m benchmarks.bench_vit --smoke --out /tmp/vit.json   # CPU, 32 px, 2 steps (the test)

Per preset: trainable parameters, ms per step (median of the timed steps), images/s, model TFLOP/s
(3 x forward matmul FLOPs; an MoE counts the routes kept within capacity, measured) and peak memory.
Every preset starts from the same seed and the same random images and labels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from widenet_ds import WideNetForImageClassification, WideNetVisionConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["widenet-vit-b", "vit-b16"])
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--layers", type=int, help="blocks instead of the preset's (a shorter stack of the same widths)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (scope 'model')")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/vit.json"))
    p.add_argument("--smoke", action="store_true", help="CPU, 32 px images, 2 blocks, batch 2, 1 + 2 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size, args.batch, args.warmup, args.steps, args.labels, args.layers = 32, 2, 1, 2, 10, 2
    return args


def forward_flops(config: WideNetVisionConfig, images: int, kept_routes: float) -> float:
    """Forward matmul FLOPs of ``images`` images: patch projection, attention, FFN (an MoE: router and the
    ``kept_routes`` of all its calls), classifier."""
    h, t, i = config.hidden_size, config.num_patches + 1, config.intermediate_size
    n = images * t
    patches = 2 * images * config.num_patches * config.num_channels * config.patch_size ** 2 * h
    attention = config.num_hidden_layers * (8 * n * h * h + 4 * n * t * h)
    moe_calls = config.num_hidden_layers // config.moe_every if config.num_experts > 1 else 0
    dense_calls = config.num_hidden_layers - moe_calls
    ffn = dense_calls * 4 * n * h * i + moe_calls * 2 * n * h * config.num_experts + 4 * h * i * kept_routes
    return patches + attention + ffn + 2 * images * h * config.num_labels


def measure(preset: str, args: argparse.Namespace, device: torch.device) -> dict:
    depth = {} if args.layers is None else {"num_hidden_layers": args.layers}
    config = WideNetVisionConfig.from_preset(preset, num_labels=args.labels, image_size=args.image_size, **depth)
    torch.manual_seed(0)
    model = WideNetForImageClassification(config).to(device).train()
    if args.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, generator=g)
    labels = torch.randint(0, args.labels, (args.batch,), device=device, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    kept: list[torch.Tensor] = []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(images, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if out.expert_counts is not None:
            kept.append((out.expert_counts.sum(-1).float() * (1 - out.dropped_fraction.float())).sum().detach())

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kept.clear()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    routes = float(torch.stack(kept).mean()) if kept else 0.0
    flops = 3 * forward_flops(config, args.batch, routes)
    return {"preset": preset, "kept_routes_per_image": round(routes / args.batch, 2), "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "ms_per_step": round(seconds * 1e3, 2), "images_per_s": round(args.batch / seconds, 1),
            "model_tflop_per_s": round(flops / seconds / 1e12, 2),
            "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "image_size": args.image_size, "batch": args.batch, "layers": args.layers or "preset", "precision": "bf16 autocast" if device.type == "cuda"
              else "fp32", "compile": args.compile, "rows": []}
    for preset in args.presets:
        row = measure(preset, args, device)
        print(f"[vit] {row}", flush=True)
        report["rows"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"[vit] wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
