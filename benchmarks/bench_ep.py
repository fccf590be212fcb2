"""Expert-parallel scaling: training steps of a WideNet preset under the DeepSpeed engine with
ep_size = world size, each rank its own batch (weak scaling), against the same on one GPU.

    python -m benchmarks.bench_ep --ep_size 1 --out runs/benchmarks/ep1.json                    # 1 GPU
    deepspeed --num_gpus 2 --module benchmarks.bench_ep --ep_size 2 --out runs/benchmarks/ep2.json  # 2 GPUs, ep 2
    deepspeed --num_gpus 2 --module benchmarks.bench_ep --ep_size 1 --out runs/benchmarks/dp2.json  # data parallel
    deepspeed --num_gpus 2 --module benchmarks.bench_ep --ep_size 2 --impl grouped --init runs/job/final \
        --batches runs/bench_data/text-s512-b32.pt --out runs/benchmarks/ep2-grouped.json   # from a trained router

Scaling efficiency = (tokens/s per GPU with N GPUs) / (tokens/s on one GPU). ``--smoke`` runs
the debug preset on CPU (gloo) for a check without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from widenet_ds import WideNetConfig, WideNetForPreTraining
from widenet_ds.distributed import close_distributed, init_distributed
from widenet_ds.engine.build import initialize_engine
from widenet_ds.engine.compile import compile_model
from widenet_ds.engine.ds_config import check_run_config
from widenet_ds.engine.expert_sharding import expert_parallel_rank, to_local_experts
from widenet_ds.jobs.args import compile_variant
from widenet_ds.modeling.flops import kept_routes

# the same ZeRO variants, batches and MLM head as bench_train's train table
from .common import (
    MLM_HEADS,
    ZERO_VARIANTS,
    batch_feed,
    load_init,
    load_text_batches,
    zero_settings,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="widenet-base-e4")
    p.add_argument("--ep_size", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="sequences per rank per step")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--zero", default="1", choices=ZERO_VARIANTS,
                   help="ZeRO stage; '1:fp32' accumulates gradients in fp32 (DeepSpeed's BF16_Optimizer)")
    p.add_argument("--impl", default="batched", choices=("batched", "grouped", "deepspeed"),
                   help="moe.impl (grouped: at ep_size > 1 over the filled slots each rank received)")
    p.add_argument("--compile", default="none", type=compile_variant,
                   help="'none' or a compile_model scope with settings, as bench_train.py (e.g. model:reduce-overhead)")
    p.add_argument("--mlm_head", default="masked", choices=MLM_HEADS,
                   help="the MLM head at the masked positions only (mlm_positions, as the pretraining job) or all")
    p.add_argument("--batches", nargs="*", type=Path, default=[], metavar="FILE",
                   help="real-text batches (benchmarks/text_batches.py) of --seq and --batch; rank r takes every "
                        "world-th one from the r-th; default a fixed random batch per rank")
    p.add_argument("--init", type=Path, metavar="DIR",
                   help="start from an exported pretraining model (launch/pretrain.py's output_dir/final, all "
                        "experts; each rank keeps its own): a trained router keeps nearly all of its routes where "
                        "a fresh one drops some, which flatters the grouped experts (they skip dropped routes)")
    p.add_argument("--out", type=Path, required=True, help="result JSON (rank 0 writes), e.g. runs/benchmarks/ep2.json")
    p.add_argument("--smoke", action="store_true", help="debug preset on CPU, 2 steps")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args(argv)
    args.text = load_text_batches(p, args.batches, args.batch, [args.seq])
    args.presets, args.capacity_factor = ["debug" if args.smoke else args.preset], 1.2  # what load_init checks
    args.init_model = load_init(p, args) if args.init else None
    return args


def main(args: argparse.Namespace) -> None:
    init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    cuda = torch.cuda.is_available()
    moe = {"capacity_factor": 1.2, "eval_capacity_factor": 1.2, "ep_size": args.ep_size, "impl": args.impl}
    preset = "debug" if args.smoke else args.preset
    init = args.init_model
    config = WideNetConfig.from_preset(preset, **(init["overrides"] if init else {}), moe=moe)
    seq = min(args.seq, config.max_position_embeddings)
    raw = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "gradient_clipping": 1.0,
           "bf16": {"enabled": cuda}, "steps_per_print": 10 ** 9, "moe": moe, **zero_settings(args.zero)}
    run = check_run_config(raw, "benchmarks/bench_ep.py", world_size=world, cuda=cuda)
    torch.manual_seed(0)
    model = WideNetForPreTraining(config)
    if init:
        ep_rank = expert_parallel_rank(rank, world, args.ep_size)
        model.load_state_dict(to_local_experts(init["state"], config.num_experts, args.ep_size, ep_rank))
    if args.compile != "none":
        compile_model(model, args.compile)
    engine, _, _ = initialize_engine(model, run)
    masked = args.mlm_head == "masked"
    feed = batch_feed(args.text, args.batch, config.vocab_size, seq, engine.device, mlm_positions=masked, rank=rank,
                      world=world)

    routes, losses = [], []

    def step():
        out = engine(**feed())
        engine.backward(out.loss)
        engine.step()
        routes.append((kept_routes(out.expert_counts, out.dropped_fraction), len(out.expert_counts)))
        losses.append(out.loss.detach().clone())  # a CUDA graph overwrites its outputs at the next replay

    times = []
    steps = 2 if args.smoke else args.warmup + args.steps
    for i in range(steps):
        if cuda:
            torch.cuda.synchronize()
        torch.distributed.barrier()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[-args.steps:] if not args.smoke else times
    ms = statistics.median(timed) * 1000
    kept = torch.stack([total / calls for total, calls in routes[-len(timed):]]).mean() / (args.batch * seq)
    torch.distributed.all_reduce(kept)  # this rank's tokens' kept routes, averaged over the ranks
    kept_per_token = kept.item() / world
    loss = [round(v, 4) for v in torch.stack([losses[0], losses[-1]]).tolist()]
    if rank == 0:
        result = {"preset": preset, "world": world, "ep_size": args.ep_size, "seq": seq, "batch_per_rank": args.batch,
                  "zero": args.zero, "impl": args.impl, "compile": args.compile, "mlm_head": args.mlm_head,
                  "batches": [str(path) for path in args.batches] or "random, fixed per rank", "ms_per_step": ms,
                  "tokens_per_s_per_gpu": args.batch * seq / (ms / 1000), "kept_routes_per_token": kept_per_token,
                  "loss_first_last": loss, "init": str(args.init) if args.init else None,
                  "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                  "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
    close_distributed()


if __name__ == "__main__":
    main(parse_args())
