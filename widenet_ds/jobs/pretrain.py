"""Pretraining: corpus -> SentencePiece tokenizer -> ALBERT-style MLM + SOP examples ->
DeepSpeed training with checkpoints, evaluation, metrics and a Hugging Face export.

``setup`` checks everything a user can get wrong before any compute, ``fit`` trains (the
shared ``TrainingLoop`` with this job's evaluation, checkpoints and stop), ``evaluate`` measures MLM and SOP accuracy on the held-out split. ``launch/pretrain.py``
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

from ..analysis.evaluation import evaluation_statistics
from ..config import PRESETS, ConfigError, WideNetConfig
from ..distributed import (
    distributed_run,
    init_distributed,
    is_main_process,
    on_rank_zero,
)
from ..engine import checkpointing
from ..engine.checkpointing import CheckpointError
from ..engine.compile import check_cuda_graphs, compile_if_asked
from ..engine.ds_config import RunConfig, load_run_config
from ..engine.guards import NonFiniteGuard
from ..modeling import WideNetForPreTraining, mlm_labels_at
from .args import (
    HelpFormatter,
    add_compile_argument,
    add_launcher_arguments,
    add_output_arguments,
    add_profile_argument,
    at_least,
    check_profile_steps,
    parse_overrides,
)
from .loop import MetricWindow, Schedule, StepProfiler, TrainingLoop
from .metrics import MetricsWriter, start_run_log
from .run_dir import REPO_ROOT, OutputDirLock, claim_output_dir, write_run_record

DEFAULT_DS_CONFIG = REPO_ROOT / "ds_configs" / "pretrain_cpu_smoke.json"
JOB = "pretrain"  # recorded in run.json: another job refuses this output folder
STATISTICS_BATCHES = 8  # held-out batches the block-similarity statistic reads at each evaluation
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain WideNet / ALBERT / BERT with MLM + SOP on DeepSpeed.",
                                formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--train_files", nargs="+", help="globs of .txt / .jsonl / .parquet files "
                      "(default: the docstrings of Python's standard library, a small built-in corpus)")
    data.add_argument("--dataset", help="a datasets hub name instead of files, e.g. wikitext (default: none, the "
                      "files of --train_files)")
    data.add_argument("--dataset_config", help="the hub dataset's config, e.g. wikitext-103-raw-v1 (default: the "
                      "dataset's default config)")
    data.add_argument("--text_field", default="text", help="text column of .jsonl / .parquet / hub data")
    data.add_argument("--tokenizer", help="an existing tokenizer folder (default: train one into output_dir/tokenizer)")
    data.add_argument("--vocab_size", type=at_least(6), help="SentencePiece vocabulary when training one "
                      "(default 30000; 8000 for the built-in corpus)")
    data.add_argument("--max_seq_length", type=at_least(5), default=512,
                      help="tokens per sequence, special tokens included (at most the model's positions)")
    data.add_argument("--short_seq_prob", type=float, default=0.1,
                      help="share of sequences aimed at a random shorter length")
    data.add_argument("--masked_lm_prob", type=float, default=0.15, help="share of tokens predicted")
    data.add_argument("--max_ngram", type=at_least(1), default=3, help="longest masked n-gram")
    data.add_argument("--eval_fraction", type=float, default=0.02, help="documents held out for evaluation")
    data.add_argument("--num_proc", type=at_least(1), default=1, help="processes for tokenization")
    data.add_argument("--loader_workers", type=at_least(0), default=None,
                      help="DataLoader worker processes that assemble and mask the next batches while the GPU "
                           "trains (the batches and resume do not depend on it); default 2 with a GPU, 0 on CPU")
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="widenet-small", choices=sorted(PRESETS), help="the architecture")
    model.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                       help="change one model-config field, e.g. --override num_experts=8 (repeatable)")
    model.add_argument("--activation_checkpointing", action="store_true", help="non-reentrant, per block")
    add_compile_argument(model, "A compiled run pads every batch to --max_seq_length (one shape)")
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", default="runs/pretrain", help="checkpoints, metrics, tokenizer, final export")
    run.add_argument("--max_steps", type=at_least(1), default=200, help="optimizer steps")
    run.add_argument("--resume", help="'auto' (newest complete checkpoint in output_dir, if any) or a path "
                     "(default: none, a new run)")
    add_output_arguments(run, resumable=True)
    run.add_argument("--seed", type=int, default=42, help="seeds the data split, masking and initialisation")
    run.add_argument("--log_every", type=at_least(1), default=10, help="steps between metric records")
    run.add_argument("--eval_every", type=at_least(0), default=100, help="steps between evaluations (0: never)")
    run.add_argument("--eval_batches", type=at_least(1), default=20, help="held-out batches per evaluation")
    run.add_argument("--save_every", type=at_least(0), default=100, help="steps between checkpoints (0: never)")
    run.add_argument("--keep_last", type=at_least(0), default=3, help="complete checkpoints to keep (0: all)")
    add_profile_argument(run)
    add_launcher_arguments(run, "ds_configs/pretrain_cpu_smoke.json")
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
    state: dict[str, Any] = field(default_factory=dict)  # step, tokens, sampler position, tokenizer_sha256
    lock: OutputDirLock | None = None  # held by rank 0 while the job runs
    stopped_by: str = ""  # the signal that stopped the run early ("" if it ran to --max_steps)


def setup(args: argparse.Namespace) -> Job:
    """Check the inputs, prepare tokenizer and data, build the model and the engine, resume."""
    init_distributed()
    start_run_log()  # rank-aware console logging for every widenet_ds module
    world = dist.get_world_size()
    run = load_run_config(args.deepspeed_config or DEFAULT_DS_CONFIG, world_size=world,
                          cuda=torch.cuda.is_available(), max_steps=args.max_steps)
    check_cuda_graphs(args.compile, run)
    check_profile_steps(args.profile, args.max_steps)
    overrides = parse_overrides(args.override)
    planned = WideNetConfig.from_preset(args.preset, **overrides).with_moe_settings(run.moe)  # fail before data work
    if args.max_seq_length > planned.max_position_embeddings:
        raise ConfigError("command line", [f"--max_seq_length {args.max_seq_length} is longer than the model's "
                                           f"{planned.max_position_embeddings} positions (max_position_embeddings)"])
    output_dir = Path(args.output_dir)
    lock = on_rank_zero(lambda: claim_output_dir(output_dir, JOB, resuming=bool(args.resume),
                                                 overwrite=args.overwrite_output_dir, resume_hint=True),
                        share_result=False)
    try:
        resume_from = on_rank_zero(lambda: checkpointing.resolve_resume(args.resume, output_dir / "checkpoints"))
        return _build(args, run, overrides, output_dir, resume_from, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(args: argparse.Namespace, run: RunConfig, overrides: dict[str, Any], output_dir: Path,
           resume_from: Path | None, lock: OutputDirLock | None) -> Job:
    from ..data.pipeline import prepare_pretraining_data

    for note in run.notes:
        log.warning("%s", note)
    if resume_from is not None:
        check_tokenizer_kept(args, output_dir, resume_from)
    data = prepare_pretraining_data(args, output_dir, micro_batch_size=run.micro_batch_size)
    if "vocab_size" in overrides and overrides["vocab_size"] != data.vocab_size:
        raise ConfigError("command line", [f"--override vocab_size={overrides['vocab_size']} does not match the "
                                           f"tokenizer's {data.vocab_size} tokens ({data.tokenizer_dir})"])
    config = WideNetConfig.from_preset(args.preset, **{**overrides, "vocab_size": data.vocab_size},
                                       pad_token_id=data.pad_token_id).with_moe_settings(run.moe)
    tokenizer_sha256 = tokenizer_fingerprint(data.tokenizer_dir)
    if resume_from is not None:
        check_same_tokenizer(resume_from, tokenizer_sha256, data.tokenizer_dir)  # the cause of a vocab_size diff
        checkpointing.check_architecture(resume_from, config)

    torch.manual_seed(args.seed)
    model = WideNetForPreTraining(config)
    if args.activation_checkpointing:
        model.set_activation_checkpointing(True)
    compile_if_asked(model, args.compile)
    from ..engine.build import initialize_engine

    job = Job(args, run, config, output_dir, data, lock=lock)
    job.engine, _, _ = initialize_engine(model, run)
    job.state = {"step": 0, "tokens": 0, "sampler": None, "tokenizer_sha256": tokenizer_sha256}
    if resume_from is not None:
        job.state = {**job.state, **checkpointing.load_checkpoint(job.engine, resume_from, config)}
        log.info("resumed from %s at step %d", resume_from, job.state["step"])
    job.data.sampler.load_state_dict(job.state["sampler"]) if job.state["sampler"] else None
    job.metrics = MetricsWriter(output_dir)
    job.metrics.write_event({"event": "resume", "step": job.state["step"], "checkpoint": str(resume_from)}
                            if resume_from is not None else {"event": "start", "step": 0})
    write_run_record(output_dir, config, run, args, job=JOB)
    return job


def check_tokenizer_kept(args: argparse.Namespace, output_dir: Path, checkpoint: Path) -> None:
    """Refuse to resume when the run's own tokenizer folder is gone: a new one trained in its place
    would give every token another id, and the model would train (and export) with it silently."""
    if args.tokenizer or (output_dir / "tokenizer" / "tokenizer_config.json").is_file():
        return
    raise CheckpointError(f"resuming from {checkpoint}, but the run's tokenizer ({output_dir / 'tokenizer'}) is "
                          "missing: a new tokenizer would map the text to other ids than the model learnt. Restore "
                          "that folder, or pass --tokenizer with the tokenizer the run was trained with")


def tokenizer_fingerprint(tokenizer_dir: Path) -> str | None:
    """sha256 of the tokenizer's vocabulary file (tokenizer.json, else spiece.model)."""
    from ..safe_io import sha256_file

    for name in ("tokenizer.json", "spiece.model"):
        if (tokenizer_dir / name).is_file():
            return sha256_file(tokenizer_dir / name)
    return None


def check_same_tokenizer(checkpoint: Path, found: str | None, tokenizer_dir: Path) -> None:
    """Refuse to resume with another tokenizer than the checkpoint was trained with (when it recorded one)."""
    saved = checkpointing.read_marker(checkpoint)["trainer_state"].get("tokenizer_sha256")
    if saved and found and saved != found:
        raise CheckpointError(f"{checkpoint} was trained with another tokenizer than {tokenizer_dir} (their "
                              "vocabulary files differ): resume with the run's own tokenizer (--tokenizer)")


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
    """Train to ``--max_steps``, or until a stop signal (``widenet_ds.jobs.preemption``): then save and return.
    Returns the logged records."""
    args = job.args
    world = dist.get_world_size() if dist.is_initialized() else 1
    schedule = Schedule(max_steps=args.max_steps, log_every=args.log_every, eval_every=args.eval_every,
                        save_every=args.save_every)
    loop = TrainingLoop(job.engine, job.data.train_batches(), schedule, grad_accum=job.run.grad_accum,
                        metrics=job.metrics, guard=NonFiniteGuard(**job.run.nonfinite_loss),
                        window=MetricWindow(flop_config=job.config, tokens_seen=job.state["tokens"] * world),
                        profiler=StepProfiler(args.profile, job.output_dir / "profile"), description="pretrain",
                        bar_fields=("loss", "lr", "tokens_per_s"), preempt_grace=args.preempt_grace,
                        evaluate=lambda step: _evaluate_with_statistics(job), save=lambda step: _save(job),
                        on_stop=lambda step, cause: _stop(job, cause), finish=checkpointing.wait_for_pending_save,
                        logger=log)
    return loop.run(job.state)


def _evaluate_with_statistics(job: Job) -> dict[str, Any]:
    """``evaluate`` and the model's LayerNorm and block-similarity statistics (``widenet_ds.analysis``)."""
    return {**evaluate(job), **evaluation_statistics(job.engine.module, job.data.eval_batches(),
                                                     min(job.args.eval_batches, STATISTICS_BATCHES))}


def _stop(job: Job, cause: str) -> None:
    """Save a checkpoint at this step (every rank) and record why the run stopped early."""
    _save(job)
    checkpointing.wait_for_pending_save()
    job.stopped_by = cause
    job.metrics.write_event({"event": "stopped", "step": job.state["step"], "signal": cause})
    log.warning("stopped by %s at step %d, checkpoint saved in %s: continue with --resume auto", cause,
                job.state["step"], job.output_dir / "checkpoints" / checkpointing.tag_for(job.state["step"]))


def export_final(job: Job) -> Path | None:
    """Export the newest complete checkpoint to ``output_dir/final``.

    Rank 0 decides and writes (its checkpoint marker is written on a background thread the other ranks
    do not wait for); every rank gets the outcome, so all of them leave together."""
    def export() -> Path | None:
        checkpointing.wait_for_pending_save()
        saved = checkpointing.complete_checkpoints(job.output_dir / "checkpoints")
        if not saved:  # --save_every 0 and no earlier checkpoint: nothing to export, and nothing is lost
            log.warning("no checkpoint in %s (--save_every 0): nothing exported", job.output_dir / "checkpoints")
            return None
        final = job.output_dir / "final"
        checkpointing.export_pretrained(saved[-1], final, tokenizer_dir=job.data.tokenizer_dir)
        log.info("exported %s to %s", saved[-1].name, final)
        return final

    return on_rank_zero(export)


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The whole job: setup, fit, export (unless stopped early), close."""
    args = build_parser().parse_args(argv)
    with distributed_run():
        job = setup(args)
        try:
            records = fit(job)
            if not job.stopped_by:
                export_final(job)
            job.metrics.close()
            if not job.stopped_by and is_main_process():
                from ..analysis.report import (
                    finish_pretraining,  # matplotlib only where a report is written
                )

                finish_pretraining(job.output_dir)
        finally:
            if job.lock is not None:
                job.lock.release()
        return records
