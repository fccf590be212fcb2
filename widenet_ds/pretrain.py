"""Pretraining: corpus -> SentencePiece tokenizer -> ALBERT-style MLM + SOP examples ->
DeepSpeed training with checkpoints, evaluation, metrics and a Hugging Face export.

``setup`` checks everything a user can get wrong before any compute, ``fit`` trains,
``evaluate`` measures MLM and SOP accuracy on the held-out split. ``launch/pretrain.py``
only parses the command line and calls ``run``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpointing
from .config import PRESETS, ConfigError, WideNetConfig
from .distributed import distributed_session, init_distributed
from .ds_config import RunConfig, load_run_config
from .guards import NonFiniteGuard
from .metrics_log import MetricsWriter, get_logger, is_main_process
from .modeling import WideNetForPreTraining, mlm_labels_at
from .training import (REPO_ROOT, MetricWindow, StepProfiler, add_compile_argument, add_launcher_arguments,
                       add_profile_argument, check_cuda_graphs, check_profile_steps, compile_if_asked, parse_overrides,
                       train_step, write_run_record)

DEFAULT_DS_CONFIG = REPO_ROOT / "ds_configs" / "pretrain_cpu_smoke.json"
log = logging.getLogger(__name__)


def _workers(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a number of processes, 0 or more")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain WideNet / ALBERT / BERT with MLM + SOP on DeepSpeed.")
    data = p.add_argument_group("data")
    data.add_argument("--train_files", nargs="+", help="globs of .txt / .jsonl / .parquet files "
                      "(default: the docstrings of Python's standard library, a small built-in corpus)")
    data.add_argument("--dataset", help="a datasets hub name instead of files, e.g. wikitext")
    data.add_argument("--dataset_config", help="the hub dataset's config, e.g. wikitext-103-raw-v1")
    data.add_argument("--text_field", default="text", help="text column of .jsonl / .parquet / hub data")
    data.add_argument("--tokenizer", help="an existing tokenizer folder (default: train one into output_dir/tokenizer)")
    data.add_argument("--vocab_size", type=int, help="SentencePiece vocabulary when training one "
                      "(default 30000; 8000 for the built-in corpus)")
    data.add_argument("--max_seq_length", type=int, default=512)
    data.add_argument("--short_seq_prob", type=float, default=0.1)
    data.add_argument("--masked_lm_prob", type=float, default=0.15)
    data.add_argument("--max_ngram", type=int, default=3)
    data.add_argument("--eval_fraction", type=float, default=0.02, help="documents held out for evaluation")
    data.add_argument("--num_proc", type=int, default=1, help="processes for tokenization")
    data.add_argument("--loader_workers", type=_workers, default=None,
                      help="DataLoader worker processes that assemble and mask the next batches while the GPU "
                           "trains (the batches and resume do not depend on it); default 2 with a GPU, 0 on CPU")
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="widenet-small", choices=sorted(PRESETS))
    model.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                       help="change one model-config field, e.g. --override num_experts=8 (repeatable)")
    model.add_argument("--activation_checkpointing", action="store_true", help="non-reentrant, per block")
    add_compile_argument(model)
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", default="runs/pretrain")
    run.add_argument("--max_steps", type=int, default=200, help="optimizer steps")
    run.add_argument("--resume", help="'auto' (newest complete checkpoint in output_dir, if any) or a path")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--log_every", type=int, default=10)
    run.add_argument("--eval_every", type=int, default=100)
    run.add_argument("--eval_batches", type=int, default=20)
    run.add_argument("--save_every", type=int, default=100)
    run.add_argument("--keep_last", type=int, default=3, help="complete checkpoints to keep")
    add_profile_argument(run)
    add_launcher_arguments(p, run)
    return p


@dataclass
class Job:
    """Everything ``fit`` needs, built by ``setup``."""

    args: argparse.Namespace
    run: RunConfig
    config: WideNetConfig
    output_dir: Path
    data: Any  # PretrainingData from widenet_ds.data
    engine: Any = None
    metrics: MetricsWriter | None = None
    state: dict[str, Any] = field(default_factory=dict)  # step, tokens, sampler position


def setup(args: argparse.Namespace) -> Job:
    """Check the inputs, prepare tokenizer and data, build the model and the engine, resume."""
    from .data.pipeline import prepare_pretraining_data

    init_distributed()
    get_logger()  # rank-aware console logging for every widenet_ds module
    world = dist.get_world_size()
    run = load_run_config(args.deepspeed_config or DEFAULT_DS_CONFIG, world_size=world,
                          cuda=torch.cuda.is_available(), max_steps=args.max_steps)
    check_cuda_graphs(args.compile, run)
    check_profile_steps(args.profile, args.max_steps)
    overrides = parse_overrides(args.override)
    WideNetConfig.from_preset(args.preset, **overrides).with_moe_settings(run.moe)  # fail before data work
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = checkpointing.resolve_resume(args.resume, output_dir / "checkpoints")

    data = prepare_pretraining_data(args, output_dir, micro_batch_size=run.micro_batch_size)
    if "vocab_size" in overrides and overrides["vocab_size"] != data.vocab_size:
        raise ConfigError("command line", [f"--override vocab_size={overrides['vocab_size']} does not match the "
                                           f"tokenizer's {data.vocab_size} tokens ({data.tokenizer_dir})"])
    config = WideNetConfig.from_preset(args.preset, **{**overrides, "vocab_size": data.vocab_size},
                                       pad_token_id=data.pad_token_id).with_moe_settings(run.moe)
    if resume_from is not None:
        checkpointing.check_architecture(resume_from, config)

    torch.manual_seed(args.seed)
    model = WideNetForPreTraining(config)
    if args.activation_checkpointing:
        model.set_activation_checkpointing(True)
    compile_if_asked(model, args.compile)
    from .engine import initialize_engine

    job = Job(args, run, config, output_dir, data)
    job.engine, _, _ = initialize_engine(model, run)
    job.state = {"step": 0, "tokens": 0, "sampler": None}
    if resume_from is not None:
        job.state = checkpointing.load_checkpoint(job.engine, resume_from, config)
        log.info("resumed from %s at step %d", resume_from, job.state["step"])
    job.data.sampler.load_state_dict(job.state["sampler"]) if job.state["sampler"] else None
    job.metrics = MetricsWriter(output_dir)
    write_run_record(output_dir, config, run, args)
    return job


def evaluate(job: Job) -> dict[str, float]:
    """MLM accuracy (masked positions), SOP accuracy and losses on the held-out split.

    The sums stay on the engine's device (one host read at the end; NCCL reduces device tensors only)."""
    engine = job.engine
    engine.eval()
    # mlm correct, mlm total, sop correct, sop total, loss, batches
    sums = torch.zeros(6, dtype=torch.float64, device=engine.device)
    with torch.no_grad():
        for i, batch in enumerate(job.data.eval_batches()):
            if i >= job.args.eval_batches:
                break
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            out = engine(**batch)
            labels = mlm_labels_at(batch["labels"], batch.get("mlm_positions"))
            masked = labels != -100
            sop = batch["sentence_order_label"]
            sums += torch.stack([((out.prediction_logits.argmax(-1) == labels) & masked).sum(), masked.sum(),
                                 (out.sop_logits.argmax(-1) == sop).sum(), sop.new_tensor(sop.numel()),
                                 out.loss.detach(), sop.new_tensor(1)]).double()
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    mlm_correct, mlm_total, sop_correct, sop_total, loss, batches = sums.tolist()
    return {"eval_mlm_accuracy": mlm_correct / max(mlm_total, 1), "eval_sop_accuracy": sop_correct / max(sop_total, 1),
            "eval_loss": loss / max(batches, 1)}


def _save(job: Job) -> None:
    job.state["sampler"] = job.data.sampler.state_dict()
    checkpointing.save_checkpoint(job.engine, job.output_dir / "checkpoints", job.state["step"], job.state,
                                  job.config, job.run.to_dict(), keep_last=job.args.keep_last)


def fit(job: Job) -> list[dict[str, Any]]:
    """Train to ``--max_steps``; returns the logged records."""
    from tqdm.auto import tqdm

    args, engine = job.args, job.engine
    world = dist.get_world_size() if dist.is_initialized() else 1
    batches = job.data.train_batches()
    records, window = [], MetricWindow(flop_config=job.config)
    guard = NonFiniteGuard(**job.run.nonfinite_loss)
    profiler = StepProfiler(args.profile, job.output_dir / "profile")
    bar = tqdm(total=args.max_steps, initial=job.state["step"], disable=not is_main_process(), desc="pretrain")
    engine.train()
    while job.state["step"] < args.max_steps:
        tokens_before = window.tokens
        profiler.begin(job.state["step"] + 1)
        train_step(engine, batches, job.run.grad_accum, window, guard, job.state["step"] + 1)
        job.state["step"] += 1
        job.state["tokens"] += window.tokens - tokens_before  # this rank's real (unpadded) tokens
        step = job.state["step"]
        profiler.end(step)
        bar.update(1)
        if step % args.log_every == 0 or step == args.max_steps:
            record = window.record(step, engine.get_lr()[0], world)
            job.metrics.write(record)
            records.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            window.reset()
        if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
            result = {"step": step, **evaluate(job)}
            job.metrics.write(result, prefix="eval")
            log.info("step %d: %s", step, {k: round(v, 4) for k, v in result.items() if k != "step"})
        if args.save_every and (step % args.save_every == 0 or step == args.max_steps):
            _save(job)
    bar.close()
    return records


def export_final(job: Job) -> Path | None:
    """Export the newest complete checkpoint to ``output_dir/final`` (rank 0)."""
    final = job.output_dir / "final"
    saved = checkpointing.complete_checkpoints(job.output_dir / "checkpoints")
    if not saved:  # --save_every 0 and no earlier checkpoint: nothing to export, and nothing is lost
        log.warning("no checkpoint in %s (--save_every 0): nothing exported", job.output_dir / "checkpoints")
        return None
    if is_main_process():
        checkpointing.export_pretrained(saved[-1], final, tokenizer_dir=job.data.tokenizer_dir)
        log.info("exported %s to %s", saved[-1].name, final)
    if dist.is_initialized():
        dist.barrier()
    return final


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The whole job: setup, fit, export, close."""
    args = build_parser().parse_args(argv)
    with distributed_session():
        job = setup(args)
        records = fit(job)
        export_final(job)
        job.metrics.close()
        return records
