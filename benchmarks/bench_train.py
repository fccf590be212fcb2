"""Training-step speed and model FLOP utilisation (MFU) of WideNet, ALBERT and BERT on one GPU.

Three tables, one run (see benchmarks/README.md for the formula and the flags):

- train: full training steps (forward, backward, optimizer step) under the DeepSpeed engine
  (bf16, AdamW) for each preset x sequence length x MoE impl x compile variant x ZeRO variant;
- hf: Hugging Face ``AlbertForPreTraining`` (sdpa, bf16, plain torch AdamW) on the same shapes;
- stack: the encoder stack alone (hidden 768, 12 shared blocks), MoE vs the shared dense stack,
  forward + backward, as time per model FLOP relative to the dense stack.

MFU = model FLOPs per step / step time / the measured bf16 matmul ceiling (8192^3).

    python -m benchmarks.bench_train                    # everything eager, every MoE impl (to runs/benchmarks)
    python -m benchmarks.bench_train --compile model --breakdown   # compiled, with phase times
    python -m benchmarks.bench_train --smoke              # CPU, debug shapes, 2 steps (the test)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from widenet_ds import WideNetConfig, WideNetForPreTraining, WideNetModel
from widenet_ds.config import MOE_IMPLS
from widenet_ds.data.pretraining import num_to_predict
from widenet_ds.engine.compile import (
    COMPILE_SCOPES,
    check_cuda_graphs,
    compile_model,
    compile_settings,
)
from widenet_ds.engine.ds_config import check_run_config
from widenet_ds.jobs.args import compile_variant
from widenet_ds.modeling import GatherMOELayer, combine_aux_loss
from widenet_ds.modeling.flops import forward_flops, kept_routes

from .common import (
    MASK_PROB,
    MLM_HEADS,
    ROOT,
    ZERO_VARIANTS,
    batch_feed,
    load_init,
    load_text_batches,
    make_batch,
    model_config,
    sync,
    zero_settings,
)

PRESET_NAMES = ("albert-base", "bert-base", "widenet-base-e4", "widenet-base-e8")
# The encoder stacks of the stack table: hidden 768, 12 shared blocks, FFN 3072.
STACKS = {
    "dense": dict(num_experts=1, top_k=1),
    "moe-e4-top2": dict(num_experts=4, top_k=2),
    "moe-e4-top1": dict(num_experts=4, top_k=1),
    "moe-e8-top2": dict(num_experts=8, top_k=2),
}

@dataclass
class Row:
    """One measured configuration."""

    table: str  # train | hf | stack
    model: str  # preset, 'hf-albert-base' or stack name
    impl: str  # MoE impl ('batched' / 'deepspeed'), '-' without MoE
    seq: int
    batch: int
    compile: str = "none"  # compile_model scope[:mode], or 'none' (eager)
    zero: str = "-"  # train table: ZeRO stage[:fp32] (fp32: gradients accumulated in fp32)
    mlm_head: str = "-"  # train and hf tables: MLM head at 'all' positions or the 'masked' ones (mlm_positions)
    grad_accum: int = 1  # train and hf tables: micro-batches of `batch` per optimizer step (one step is timed)
    ms_per_step: float | None = None  # median over the timed steps (CUDA events on GPU)
    wall_ms_per_step: float | None = None  # host wall clock over all timed steps / steps (after a sync)
    tokens_per_s: float | None = None
    model_tflop_per_step: float | None = None  # 3 x forward matmul FLOPs (README)
    mfu: float | None = None  # model FLOPs / time / measured ceiling
    peak_mem_gib: float | None = None  # torch.cuda.max_memory_allocated
    kept_routes_per_token: float | None = None  # MoE: routes kept within capacity per token per routing call
    # the training loss at the first warm-up step and the last timed step (the fixed batch is learnt:
    # a sanity check that a variant trains like the others, e.g. with CUDA graphs)
    loss_first: float | None = None
    loss_last: float | None = None
    losses: list[float] = field(default_factory=list)  # every step's training loss, warm-up and timed
    time_per_flop_vs_dense: float | None = None  # stack table: (ms / FLOP) / (dense ms / dense FLOP)
    error: str | None = None
    step_ms: list[float] = field(default_factory=list)
    # --breakdown: per phase (forward / backward / optimizer), median over steps with a sync after each
    # phase: host_ms = time until the phase's work is queued, total_ms = until the GPU has finished it
    phases: dict[str, dict[str, float]] | None = None


# ----------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESET_NAMES), help="presets for the train table")
    p.add_argument("--seqs", nargs="+", type=int, default=[128, 512], help="sequence lengths")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--impls", nargs="+", default=list(MOE_IMPLS), choices=MOE_IMPLS,
                   help="MoE impls to measure (MoE presets and stacks); dense models run once")
    p.add_argument("--tables", nargs="+", default=["train", "hf", "stack"], choices=["train", "hf", "stack"])
    p.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--capacity_factor", type=float, default=1.2, help="C in training")
    p.add_argument("--no_fused_act", action="store_true",
                   help="moe.fused_act false: the grouped experts' first bias + activation as plain ops instead of "
                        "the Triton kernel (the unfused side of an A/B)")
    p.add_argument("--batches", nargs="+", type=Path, default=[], metavar="FILE",
                   help="train and hf tables: real-text batches (benchmarks/text_batches.py), one file per "
                        "sequence length, cycled through; default one fixed batch of random ids")
    p.add_argument("--no_attention_mask", action="store_true",
                   help="pass attention_mask=None (unpadded batches: SDPA may use flash attention)")
    p.add_argument("--compile", nargs="*", default=["none"], type=compile_variant, metavar="SCOPE[:SETTING...]",
                   help="compile variants, each measured: 'none' (eager) or a compile_model scope "
                        f"({', '.join(COMPILE_SCOPES)}), optionally with a torch.compile mode and/or Inductor "
                        "options, e.g. model:reduce-overhead (CUDA graphs), model:cpp_wrapper, "
                        "model:max-autotune-no-cudagraphs; '--compile' alone means 'model'")
    p.add_argument("--zero", nargs="+", default=["1:fp32"], choices=ZERO_VARIANTS,
                   help="train table: ZeRO stages to measure; ':fp32' accumulates gradients in fp32 "
                        "(DeepSpeed's BF16_Optimizer) instead of bf16")
    p.add_argument("--mlm_head", nargs="+", default=["masked"], choices=MLM_HEADS,
                   help="train table: run the MLM head at the masked positions only (the collator's "
                        "mlm_positions) or at all positions, each measured; the HF reference runs all")
    p.add_argument("--grad_accum", type=int, default=1,
                   help="train and hf tables: micro-batches of --batch per optimizer step, each the next batch "
                        "(a timed step is all of them and one optimizer step; ds_configs/pretrain_1gpu.json "
                        "accumulates 64)")
    p.add_argument("--optimizer", default="AdamW", choices=["AdamW", "Lamb"],
                   help="train table: the engine's optimizer (Lamb: widenet_ds.engine.optim.Lamb, as the pretraining configs)")
    p.add_argument("--init", type=Path, metavar="DIR",
                   help="train table: start the WideNet/ALBERT/BERT rows from this exported model (launch/pretrain.py's "
                        "output_dir/final) instead of fresh weights: the router's load and the weights of a run in "
                        "progress; it must be one of --presets (vocabulary and padding id taken from it)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time forward, backward and optimizer separately (sync after each)")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler kernel table per configuration")
    p.add_argument("--matmul_n", type=int, default=8192, help="size of the bf16 matmul that sets the ceiling")
    p.add_argument("--name", default=None, help="results file stem (default: device and time)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks",
                   help="results folder (default runs/benchmarks, git-ignored)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script: debug-size presets, seq 16, batch 2, 1+2 steps")
    args = p.parse_args(argv)
    args.compile = args.compile or ["model"]
    if args.smoke:
        args.seqs, args.batch, args.warmup, args.steps, args.matmul_n = [16], 2, 1, 2, 256
    if args.grad_accum < 1:
        p.error(f"--grad_accum {args.grad_accum}: one micro-batch per step or more")
    if args.batches and args.no_attention_mask:
        p.error("--no_attention_mask: real-text batches are padded and need their attention mask")
    fed = args.seqs if {"train", "hf"} & set(args.tables) else []
    args.text = load_text_batches(p, args.batches, args.batch, fed)
    args.init_model = load_init(p, args) if args.init else None
    return args


# ----------------------------------------------------------------------------- timing

def matmul_ceiling(device: torch.device, n: int) -> float:
    """bf16 n^3 matmul rate in TFLOP/s (median of 10 after 3 warm-ups, random data)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = time_steps(lambda: torch.mm(a, b), device, warmup=3, steps=10)[0]
    return 2 * n ** 3 / (statistics.median(times) / 1e3) / 1e12


def _no_mark(phase: str) -> None:
    """What a step calls after each of its phases when nobody is timing them."""


class PhaseTimer:
    """``step(mark=timer)``: times each phase of a step from a synchronised start (see Row.phases)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host: dict[str, list[float]] = {}
        self.total: dict[str, list[float]] = {}
        self.start()

    def start(self) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def __call__(self, phase: str) -> None:
        queued = time.perf_counter()
        sync(self.device)
        done = time.perf_counter()
        self.host.setdefault(phase, []).append((queued - self.t0) * 1e3)
        self.total.setdefault(phase, []).append((done - self.t0) * 1e3)
        self.t0 = time.perf_counter()

    def summary(self) -> dict[str, dict[str, float]]:
        return {phase: {"host_ms": round(statistics.median(self.host[phase]), 3),
                        "total_ms": round(statistics.median(self.total[phase]), 3)} for phase in self.host}


def time_phases(step: Callable[..., Any], device: torch.device, steps: int) -> dict[str, dict[str, float]]:
    timer = PhaseTimer(device)
    for _ in range(steps):
        timer.start()
        step(mark=timer)
    return timer.summary()


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> tuple[list[float], float]:
    """Per-step times in ms (CUDA events on GPU, host clock on CPU) and the wall-clock mean over the steps."""
    for _ in range(warmup):
        step()
    sync(device)
    cuda = device.type == "cuda"
    marks = []
    start_wall = time.perf_counter()
    for _ in range(steps):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            marks.append((begin, end))
        else:
            t0 = time.perf_counter()
            step()
            marks.append((t0, time.perf_counter()))
    sync(device)
    wall_ms = (time.perf_counter() - start_wall) * 1e3 / max(steps, 1)
    times = [b.elapsed_time(e) if cuda else (e - b) * 1e3 for b, e in marks]
    return times, wall_ms


def _profile(step: Callable[[], Any], device: torch.device, path: Path) -> None:
    """Kernel table of 3 steps (self device time), written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=80))


# ----------------------------------------------------------------------------- inputs and models

def run_config(config: WideNetConfig, batch: int, device: torch.device, zero: str = "0", optimizer: str = "AdamW",
               grad_accum: int = 1):
    """The DeepSpeed run config of the benchmark: bf16, ZeRO ``zero`` (stage[:fp32]), ``optimizer`` (AdamW or
    widenet_ds's Lamb, as ds_configs/pretrain_1gpu.json), clipping 1.0, ``grad_accum`` micro-batches per step
    (then each gradient moved to fp32 as it is made, as pretrain_1gpu.json: what CUDA graphs need)."""
    raw = {
        "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": optimizer, "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-6,
                                                    "weight_decay": 0.01}},
        **({"zero_allow_untested_optimizer": True} if optimizer == "Lamb" else {}),
        "gradient_clipping": 1.0, "bf16": {"enabled": True, **({"immediate_grad_update": True} if grad_accum > 1 else {})},
        "steps_per_print": 10 ** 9, "moe": config.moe,
        **zero_settings(zero),
    }
    return check_run_config(raw, "benchmarks/bench_train.py", world_size=1, cuda=device.type == "cuda")


# ----------------------------------------------------------------------------- the three tables

class Measure:
    """Runs one configuration: builds, times, counts FLOPs, records errors instead of raising."""

    def __init__(self, args: argparse.Namespace, device: torch.device, ceiling_tflops: float, results: Path):
        self.args, self.device, self.ceiling, self.results = args, device, ceiling_tflops, results

    def __call__(self, row: Row, build: Callable[[], tuple[Callable[[], Any], Callable[[float], float], Any]]) -> Row:
        """``build() -> (step, flops_of(kept_routes_per_call), routed_sum, losses)``; ``routed_sum`` a list
        that step appends kept-route tensors and routing-call counts to, ``losses`` one its losses."""
        _free(self.device)
        torch.manual_seed(0)  # every configuration starts from the same weights: loss_first/last are comparable
        try:
            step, flops_of, routes, losses = build()
            times, wall_ms = time_steps(step, self.device, self.args.warmup, self.args.steps)
            if self.args.breakdown:
                row.phases = time_phases(step, self.device, self.args.steps)
            if self.args.profile:
                _profile(step, self.device, self.results / "profiles" / f"{_slug(row)}.txt")
            self._fill(row, times, wall_ms, flops_of, routes)
            row.losses = [round(v, 4) for v in torch.stack(losses[:self.args.warmup + self.args.steps]).tolist()]
            row.loss_first, row.loss_last = row.losses[0], row.losses[-1]
        except Exception as err:  # noqa: BLE001 - one broken configuration must not stop the run
            row.error = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
        finally:
            step = flops_of = routes = losses = None  # noqa: F841 - drop references before freeing memory
            _free(self.device)
        _print_row(row)
        return row

    def _fill(self, row: Row, times: list[float], wall_ms: float, flops_of, routes: list) -> None:
        row.step_ms = [round(t, 3) for t in times]
        row.ms_per_step = statistics.median(times)
        row.wall_ms_per_step = wall_ms
        row.tokens_per_s = row.batch * row.seq * row.grad_accum / (row.ms_per_step / 1e3)
        kept_per_call = None
        if routes:  # [(kept routes summed over calls, calls)] per step, warm-up included
            kept = torch.stack([k for k, _ in routes]).sum().item()
            calls = sum(c for _, c in routes)
            kept_per_call = kept / calls
            row.kept_routes_per_token = kept_per_call / (row.batch * row.seq)
        flops = 3 * flops_of(kept_per_call) * row.grad_accum
        row.model_tflop_per_step = flops / 1e12
        row.mfu = flops / (row.ms_per_step / 1e3) / (self.ceiling * 1e12)
        if self.device.type == "cuda":
            row.peak_mem_gib = torch.cuda.max_memory_allocated(self.device) / 2 ** 30


def apply_compile(model: torch.nn.Module, variant: str) -> None:
    """``variant``: 'none' or 'scope[:setting...]' (``compile_model``; settings: ``compile_settings``)."""
    if variant != "none":
        compile_model(model, variant)


def bench_widenet(measure: Measure, preset: str, impl: str, seq: int, variant: str, zero: str,
                  mlm_head: str = "masked") -> Row:
    """Full training steps under the DeepSpeed engine."""
    from widenet_ds.engine.build import initialize_engine

    args, device = measure.args, measure.device
    init = args.init_model
    config = model_config(preset, args, impl, **(init["overrides"] if init else {}))
    moe = config.num_experts > 1
    row = Row("train", preset, impl if moe else "-", seq, args.batch, variant, zero, mlm_head, args.grad_accum)
    positions = num_to_predict(seq, MASK_PROB, None) if mlm_head == "masked" else None

    def build():
        run = run_config(config, args.batch, device, zero, args.optimizer, args.grad_accum)
        check_cuda_graphs(variant, run)
        with torch.device(device):
            model = WideNetForPreTraining(config)
        if init:
            model.load_state_dict(init["state"])
        apply_compile(model, variant)
        engine, _, _ = initialize_engine(model, run)
        feed = batch_feed(args.text, args.batch, config.vocab_size, seq, device, mlm_positions=positions is not None,
                          mask=not args.no_attention_mask)
        routes, losses = [], []

        def step(mark=_no_mark):
            step_losses = []
            for _ in range(args.grad_accum):  # DeepSpeed steps the optimizer at the last one
                out = engine(**feed())
                step_losses.append(out.loss.detach().clone())
                mark("forward")
                engine.backward(out.loss)
                mark("backward")
                engine.step()
                if moe:
                    routes.append((kept_routes(out.expert_counts, out.dropped_fraction), len(out.expert_counts)))
            mark("optimizer")
            losses.append(torch.stack(step_losses).mean())

        return step, lambda kept: forward_flops(config, args.batch, seq, kept, mlm_positions=positions), routes, losses

    return measure(row, build)


def bench_hf_albert(measure: Measure, seq: int, variant: str) -> Row:
    """Hugging Face AlbertForPreTraining (sdpa), bf16 weights, plain torch AdamW: the outside reference.
    Any compile variant but 'none' compiles the whole model (``nn.Module.compile``, with the mode)."""
    from transformers import AlbertConfig, AlbertForPreTraining

    args, device = measure.args, measure.device
    config = model_config("albert-base", args, "batched")
    row = Row("hf", "hf-albert-base", "-", seq, args.batch, variant, mlm_head="all", grad_accum=args.grad_accum)

    def build():
        hf_config = AlbertConfig(
            vocab_size=config.vocab_size, embedding_size=config.embedding_size, hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size, hidden_act="gelu_new", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, max_position_embeddings=config.max_position_embeddings,
            attn_implementation="sdpa")
        with torch.device(device):
            model = AlbertForPreTraining(hf_config).to(torch.bfloat16).train()
        if variant != "none":
            model.compile(**compile_settings(variant)[1])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        # Gradients live in buffers of their own, zeroed in place: with CUDA graphs a gradient left None is
        # adopted from the backward graph's output, which the next micro-batch's replay overwrites.
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        feed = batch_feed(args.text, args.batch, config.vocab_size, seq, device, mlm_positions=False,
                          mask=not args.no_attention_mask)

        losses = []

        def step(mark=_no_mark):
            step_losses = []
            for _ in range(args.grad_accum):
                loss = model(**feed()).loss
                step_losses.append(loss.detach().clone())
                mark("forward")
                (loss / args.grad_accum).backward()
                mark("backward")
            losses.append(torch.stack(step_losses).mean())
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            mark("optimizer")

        return step, lambda kept: forward_flops(config, args.batch, seq, kept), [], losses

    return measure(row, build)


def bench_stack(measure: Measure, name: str, impl: str, seq: int, variant: str) -> Row:
    """The encoder stack alone (bf16 weights, no engine): forward + backward of a fixed input."""
    args, device = measure.args, measure.device
    config = model_config("widenet-base-e4", args, impl, **STACKS[name])
    moe = config.num_experts > 1
    row = Row("stack", name, impl if moe else "-", seq, args.batch, variant)

    def build():
        with torch.device(device):
            encoder = WideNetModel(config).encoder.to(torch.bfloat16).train()
        apply_compile(encoder, variant)
        x = torch.randn(args.batch, seq, config.hidden_size, device=device, dtype=torch.bfloat16)
        mask = None if args.no_attention_mask else torch.ones(args.batch, seq, dtype=torch.long, device=device)
        routes, losses = [], []

        def step(mark=_no_mark):
            y, routing = encoder(x, mask)
            loss = y.float().square().mean()
            losses.append(loss.detach().clone())
            if routing:
                loss = loss + combine_aux_loss(routing, 0.01)
                counts = torch.stack([r.expert_counts for r in routing])
                routes.append((kept_routes(counts, torch.stack([r.dropped_fraction for r in routing])),
                               len(routing)))
            mark("forward")
            loss.backward()
            mark("backward")
            encoder.zero_grad(set_to_none=True)

        return step, lambda kept: forward_flops(config, args.batch, seq, kept, encoder_only=True), routes, losses

    return measure(row, build)


def parity_check(args: argparse.Namespace, device: torch.device, preset: str = "widenet-base-e4") -> dict[str, Any]:
    """Each fast MoE impl vs the reference on this device: same weights, inputs and router noise, fp32
    (TF32 off), one training forward + backward. Reports the largest differences (expected: rounding).
    In fp32 on a GPU the grouped layer would run the batched experts (``grouped_mm_is_fast``); here it
    runs its own fp32 path (``GatherMOELayer.grouped_anywhere``)."""
    batch, seq = (2, 16) if args.smoke else (4, 128)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    runs, report = {}, {"preset": preset, "batch": batch, "seq": seq, "dtype": "float32"}
    grouped_anywhere = GatherMOELayer.grouped_anywhere
    try:
        GatherMOELayer.grouped_anywhere = True
        for impl in ("deepspeed", *(i for i in MOE_IMPLS if i != "deepspeed")):
            try:
                torch.manual_seed(0)
                with torch.device(device):
                    model = WideNetForPreTraining(model_config(preset, args, impl)).train()
                inputs = make_batch(model.config.vocab_size, batch, seq, device, mask=True)
                torch.manual_seed(1)
                out = model(**inputs)
                out.loss.backward()
                runs[impl] = (out, {n: p.grad for n, p in model.named_parameters()})
            except Exception as err:  # noqa: BLE001 - reported, not fatal
                traceback.print_exc()
                report[impl] = {"error": f"{type(err).__name__}: {err}"[:500]}
        if "deepspeed" in runs:
            for impl in runs.keys() - {"deepspeed"}:
                report[impl] = _parity(runs[impl], runs["deepspeed"])
        return report
    finally:
        GatherMOELayer.grouped_anywhere = grouped_anywhere
        torch.backends.cuda.matmul.allow_tf32 = tf32
        runs.clear()
        _free(device)


def _parity(fast_run, ref_run) -> dict[str, Any]:
    (fast, fast_grads), (ref, ref_grads) = fast_run, ref_run
    norms = {n: g.norm().item() for n, g in ref_grads.items() if g is not None}
    # Gradients that are zero in exact arithmetic (the attention key bias: softmax ignores it) are
    # rounding noise of ~1e-8 in both paths; compare the others.
    floor = 1e-5 * max(norms.values())
    diffs = {n: (fast_grads[n] - ref_grads[n]).norm().item() / v for n, v in norms.items() if v > floor}
    worst = max(diffs, key=diffs.get)
    return {"max_abs_logit_diff": (fast.prediction_logits - ref.prediction_logits).abs().max().item(),
            "loss_diff": abs(fast.loss.item() - ref.loss.item()),
            "expert_counts_equal": bool(torch.equal(fast.expert_counts, ref.expert_counts)),
            "max_relative_grad_diff": diffs[worst], "worst_grad": worst,
            "grads_compared": f"{len(diffs)} of {len(norms)} (norm > 1e-5 x the largest)"}


# ----------------------------------------------------------------------------- output

def _slug(row: Row) -> str:
    return f"{row.table}_{row.model}_{row.impl}_s{row.seq}_{row.compile}_{row.mlm_head}".replace("-", "_").replace(":", "_")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_row(row: Row) -> None:
    status = f"ERROR {row.error}" if row.error else (f"{_fmt(row.ms_per_step, '.2f')} ms  "
                                                      f"MFU {_fmt(row.mfu, '.1%')}")
    phases = "" if not row.phases else "  " + ", ".join(
        f"{k} {v['host_ms']:.1f}/{v['total_ms']:.1f}" for k, v in row.phases.items()) + " ms host/total"
    print(f"[bench] {row.table:5s} {row.model:16s} {row.impl:9s} {row.compile:14s} zero {row.zero:6s} "
          f"mlm {row.mlm_head:6s} seq {row.seq:4d}: "
          f"{status}{phases}",
          flush=True)


def set_relative_costs(rows: list[Row]) -> None:
    """Stack rows: time per model FLOP relative to the dense stack at the same sequence length."""
    dense = {(r.seq, r.compile): r for r in rows if r.table == "stack" and r.model == "dense" and r.mfu}
    for r in rows:
        if r.table == "stack" and r.mfu and (r.seq, r.compile) in dense:
            r.time_per_flop_vs_dense = dense[r.seq, r.compile].mfu / r.mfu


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [f"# Training-step benchmark: {meta['name']}", "",
             f"{meta['device']}, torch {meta['torch']}, deepspeed {meta['deepspeed']}, transformers "
             f"{meta['transformers']}; batch {meta['args']['batch']}, bf16, ceiling {meta['ceiling_tflops']:.3g} "
             f"TFLOP/s (bf16 {meta['args']['matmul_n']}^3 matmul); median of {meta['args']['steps']} steps after "
             f"{meta['args']['warmup']}; {_data_line(meta)}.", "",
             f"Fast vs reference MoE path, same weights and inputs (fp32): {meta.get('parity')}", ""]
    head = ("| model | MoE impl | compile | ZeRO | MLM head | seq | ms / step | tokens / s | model TFLOP / step | MFU "
            "| peak GiB | kept routes / token | loss, first -> last step |")
    optimizer, accum = meta["args"].get("optimizer", "AdamW"), meta["args"].get("grad_accum", 1)
    per_step = f", {accum} micro-batches per step" if accum > 1 else ""
    for table, title in (("train", f"Full training step (DeepSpeed engine, {optimizer}{per_step})"),
                         ("hf", f"Hugging Face AlbertForPreTraining (sdpa, torch AdamW{per_step})"),
                         ("stack", "Encoder stack only, forward + backward")):
        chosen = [r for r in rows if r.table == table]
        if not chosen:
            continue
        extra = " time / FLOP vs dense |" if table == "stack" else ""
        lines += [f"## {title}", "", head + extra, "|---" * (head.count("|") - 1 + bool(extra)) + "|"]
        for r in chosen:
            cells = [r.model, r.impl, r.compile, r.zero, r.mlm_head, str(r.seq), _fmt(r.ms_per_step, ".2f"),
                     _fmt(r.tokens_per_s, ",.0f"),
                     _fmt(r.model_tflop_per_step, ".3f"), _fmt(r.mfu, ".1%"), _fmt(r.peak_mem_gib, ".2f"),
                     _fmt(r.kept_routes_per_token, ".3f"),
                     f"{_fmt(r.loss_first, '.3f')} -> {_fmt(r.loss_last, '.3f')}"]
            if table == "stack":
                cells.append(_fmt(r.time_per_flop_vs_dense, ".2f"))
            if r.error:
                cells[6] = f"error: {r.error[:80]}"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    timed = [r for r in rows if r.phases]
    if timed:
        lines += ["## Phases (--breakdown): ms until queued on the host / until done on the GPU, sync after each", "",
                  "| table | model | MoE impl | compile | ZeRO | seq | forward | backward | optimizer |", "|---" * 9 + "|"]
        for r in timed:
            cells = [f"{r.phases[k]['host_ms']:.1f} / {r.phases[k]['total_ms']:.1f}" if k in r.phases else "-"
                     for k in ("forward", "backward", "optimizer")]
            lines.append(f"| {r.table} | {r.model} | {r.impl} | {r.compile} | {r.zero} | {r.seq} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _data_line(meta: dict[str, Any]) -> str:
    init = meta["args"].get("init")
    start = f"; train rows start from the weights of {init}" if init else ""
    if meta.get("batches"):
        return "batches: " + "; ".join(meta["batches"]) + start
    return (f"one fixed batch of random ids, attention mask "
            f"{'none' if meta['args']['no_attention_mask'] else 'all ones'}{start}")


def write_results(rows: list[Row], meta: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{meta['name']}.json", out / f"{meta['name']}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    md_path.write_text(markdown(rows, meta))
    return json_path, md_path


# ----------------------------------------------------------------------------- main

def setup(args: argparse.Namespace) -> torch.device:
    """One-process distributed world (DeepSpeed's engine needs one), quiet DeepSpeed logs, the device."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from widenet_ds.distributed import init_distributed

    if not torch.cuda.is_available():
        if not args.smoke:
            raise SystemExit("no CUDA device: this benchmark is for a GPU; use --smoke for a CPU check")
        import deepspeed.comm.torch as ds_comm

        ds_comm.build_shm_op = lambda: None  # one process needs no shared-memory collectives (a ~1 min JIT build)
    ds_logger.setLevel(logging.WARNING)
    init_distributed()
    torch.manual_seed(0)
    _ = deepspeed
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def metadata(args: argparse.Namespace, device: torch.device, ceiling: float) -> dict[str, Any]:
    import deepspeed
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    stem = args.name or f"{name.replace(' ', '-').lower()}-{time.strftime('%Y%m%d-%H%M%S')}"
    return {"name": stem, "device": name, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "ceiling_tflops": ceiling,
            "args": {k: json.loads(json.dumps(v, default=str)) for k, v in vars(args).items()
                     if k not in ("text", "init_model")},
            "batches": [f"{len(t['input_ids'])} real-text batches of seq {seq} from {t['path']} (text: "
                        f"{', '.join(Path(s).name for s in t['source'])}; "
                        f"{t['attention_mask'].float().mean().item():.1%} real tokens)"
                        for seq, t in args.text.items()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def plan(args: argparse.Namespace) -> list[tuple[str, Callable[[Measure], Row]]]:
    """Every configuration to measure, in order."""
    jobs = []
    for seq in args.seqs:
        if "train" in args.tables:
            for preset in args.presets:
                moe = WideNetConfig.from_preset(preset).num_experts > 1
                for impl in args.impls if moe else args.impls[:1]:
                    for v, z, h in ((v, z, h) for v in args.compile for z in args.zero for h in args.mlm_head):
                        jobs.append(("train", lambda m, p=preset, i=impl, s=seq, v=v, z=z, h=h:
                                     bench_widenet(m, p, i, s, v, z, h)))
        if "hf" in args.tables:
            for v in (v for v in args.compile if v == "none" or v.startswith("model")):  # HF: eager or whole
                jobs.append(("hf", lambda m, s=seq, v=v: bench_hf_albert(m, s, v)))
        if "stack" in args.tables:
            for name in args.stacks:
                for impl in args.impls if STACKS[name]["num_experts"] > 1 else args.impls[:1]:
                    for v in args.compile:
                        jobs.append(("stack", lambda m, n=name, i=impl, s=seq, v=v: bench_stack(m, n, i, s, v)))
    return jobs


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = setup(args)
    try:
        ceiling = matmul_ceiling(device, args.matmul_n)
        print(f"[bench] bf16 {args.matmul_n}^3 matmul ceiling: {ceiling:.1f} TFLOP/s", flush=True)
        meta = metadata(args, device, ceiling)
        meta["parity"] = parity_check(args, device)
        print(f"[bench] fast vs reference MoE path on this device: {meta['parity']}", flush=True)
        measure = Measure(args, device, ceiling, args.out)
        rows: list[Row] = []
        for _, job in plan(args):
            rows.append(job(measure))
            set_relative_costs(rows)
            write_results(rows, meta, args.out)  # after every row: a crash keeps what was measured
        json_path, md_path = write_results(rows, meta, args.out)
        print("\n" + markdown(rows, meta))
        print(f"[bench] wrote {json_path} and {md_path}")
        return rows
    finally:
        from widenet_ds.distributed import close_distributed

        close_distributed()


if __name__ == "__main__":
    main()
