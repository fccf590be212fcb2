"""GLUE fine-tuning on DeepSpeed, every task, from any starting point (see ``model_sources``).

``setup`` checks everything a user can get wrong (task, data files and rows, tokenizer vs
embeddings, overrides vs checkpoint, the DeepSpeed JSON) before any compute; ``fit`` trains
with the MoE on (the fine-tuning JSON's ``moe`` block), evaluates the dev split(s) every
``--eval_every`` steps and keeps the best model by the task's main metric; ``predict_test``
writes the GLUE submission files from the best model. ``launch/finetune_glue.py`` only calls ``run``.

Outputs in ``--output_dir``: ``eval_results.json`` (the best evaluation's metrics under their
GLUE names, e.g. ``accuracy`` and ``mnli_mm``), ``dev_predictions.json`` (its logits),
``best/`` (a Hugging Face folder with the tokenizer), ``submission/`` (``<TASK>.tsv``),
``metrics.jsonl`` / ``tensorboard/``, and the resolved configs with the git hash.

Expert parallelism (``moe.ep_size`` > 1): each rank loads its slice of the full weights before
``deepspeed.initialize``; the best model is exported by gathering every rank's experts to
rank 0 (``torch.distributed.gather_object``), which writes an ep_size-1 folder.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..config import ConfigError, WideNetConfig
from ..distributed import (
    distributed_run,
    init_distributed,
    is_main_process,
    on_rank_zero,
)
from ..engine.compile import check_cuda_graphs, compile_if_asked
from ..engine.ds_config import RunConfig, load_run_config
from ..engine.expert_sharding import (
    expert_parallel_rank,
    is_expert_key,
    to_global_experts,
    to_local_experts,
)
from ..engine.guards import NonFiniteGuard
from ..glue import (
    TaskSpec,
    collate,
    compute_metrics,
    describe_task_columns,
    encode,
    get_task,
    load_split,
    write_split_submission,
)
from ..modeling import WideNetForSequenceClassification
from ..safe_io import replace_folder
from . import model_sources
from .args import (
    HelpFormatter,
    add_compile_argument,
    add_launcher_arguments,
    add_output_arguments,
    add_profile_argument,
    at_least,
    check_profile_steps,
    parse_overrides,
    positive_float,
)
from .loop import Schedule, StepProfiler, TrainingLoop
from .metrics import MetricsWriter, start_run_log
from .run_dir import (
    REPO_ROOT,
    OutputDirLock,
    claim_output_dir,
    mark_finished,
    write_run_record,
)

log = logging.getLogger(__name__)
JOB = "finetune_glue"  # recorded in run.json: another job refuses this output folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune WideNet / ALBERT / BERT on a GLUE task with DeepSpeed.",
                                formatter_class=HelpFormatter, epilog=describe_task_columns())
    data = p.add_argument_group("data (default: the hub's nyu-mll/glue)")
    data.add_argument("--task", required=True, help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli")
    data.add_argument("--data_dir", help="a folder in the GLUE download layout (MNLI/dev_matched.tsv ...) "
                      "(default: none, the hub's nyu-mll/glue unless data files are given)")
    data.add_argument("--train_file", help="CSV / JSON / JSONL / TSV of the train split (columns: see below; "
                      "default: none, --data_dir or the hub)")
    data.add_argument("--validation_file", help="... of the (first) dev split, e.g. MNLI's validation_matched "
                      "(default: none, as --train_file)")
    data.add_argument("--test_file", help="... of the (first) test split (default: none, as --train_file)")
    data.add_argument("--split_file", action="append", default=[], metavar="SPLIT=PATH",
                      help="a file for any other split, e.g. validation_mismatched=dev_mm.jsonl (repeatable)")
    data.add_argument("--skip_malformed", action="store_true", help="skip (and count) malformed rows")
    data.add_argument("--max_seq_length", type=at_least(2), default=512,
                      help="longest input in tokens, special tokens included (at most the model's positions)")
    model = p.add_argument_group("model")
    model.add_argument("--model_name_or_path", required=True,
                       help="preset:NAME, a pretraining export, a DeepSpeed checkpoint, or an ALBERT folder")
    model.add_argument("--tokenizer", help="a tokenizer folder (default: the one saved with the model)")
    model.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                       help="a model-config field, e.g. hidden_dropout_prob=0.1 or (upcycling) num_experts=8")
    model.add_argument("--model_label", help="the model's name in result tables (default: --model_name_or_path)")
    add_compile_argument(model, f"A compiled run pads each batch to a multiple of {COMPILED_PAD_MULTIPLE} tokens "
                                "(a few shapes, each compiled once)")
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", help="best model, results, submission files, metrics (default: runs/glue/<task>)")
    add_output_arguments(run, resumable=False)
    run.add_argument("--max_steps", type=at_least(1), help="optimizer steps (default: the JSON's total_num_steps)")
    run.add_argument("--epochs", type=positive_float,
                     help="train this many epochs instead of --max_steps (default: none, --max_steps decides)")
    run.add_argument("--seed", type=int, default=42, help="seeds the classifier's initialisation and the data order")
    run.add_argument("--eval_every", type=at_least(0), default=1000,
                     help="steps between dev evaluations (0: only at the end)")
    run.add_argument("--eval_batch_size", type=at_least(1), help="default: the JSON's micro-batch size")
    run.add_argument("--log_every", type=at_least(1), default=10, help="steps between metric records")
    add_profile_argument(run)
    add_launcher_arguments(run, "ds_configs/finetune_<task>.json")
    return p


@dataclass
class Job:
    """Everything ``fit`` needs, built by ``setup``."""

    args: argparse.Namespace
    task: TaskSpec
    run: RunConfig
    config: WideNetConfig  # the architecture in effect, this run's MoE settings recorded
    output_dir: Path
    tokenizer: Any
    max_steps: int
    features: dict[str, list[dict[str, Any]]]  # encoded examples per split
    indices: dict[str, list[int]]  # the examples' idx per split (submission rows)
    engine: Any = None
    metrics: MetricsWriter | None = None
    best: dict[str, Any] = field(default_factory=dict)  # step, score, metrics, state (this rank's weights, CPU)
    lock: OutputDirLock | None = None  # held by rank 0 while the job runs


# --- setup ---------------------------------------------------------------------------------


def load_data(task: TaskSpec, args: argparse.Namespace) -> dict[str, list]:
    """Examples of every split the run uses: train, the dev splits, the test splits (those given)."""
    bad = [item for item in args.split_file if "=" not in item]
    if bad:
        raise ConfigError("command line", [f"--split_file {item!r}: expected SPLIT=PATH" for item in bad])
    files = dict(item.split("=", 1) for item in args.split_file)
    named = {"train": args.train_file, task.dev_splits[0]: args.validation_file, task.test_splits[0]: args.test_file}
    files.update({split: path for split, path in named.items() if path})
    if files and args.data_dir:
        raise ConfigError("command line", ["give --data_dir or data files (--train_file ...), not both"])
    if files:
        return {split: load_split(task.name, split, data_file=path, skip_malformed=args.skip_malformed)
                for split, path in files.items()}
    names = ["train", *task.dev_splits, *task.test_splits]
    if args.data_dir and task.name == "mnli" and (Path(args.data_dir) / task.split("ax").tsv_path).is_file():
        names.append("ax")  # the diagnostic set, predicted by the MNLI model
    return {split: load_split(task.name, split, data_dir=args.data_dir, skip_malformed=args.skip_malformed)
            for split in names}


def load_tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    path = args.tokenizer or model_sources.tokenizer_dir_for(args.model_name_or_path)
    if path is None:
        raise ConfigError("command line", [f"no tokenizer saved with {args.model_name_or_path}: pass --tokenizer"])
    if not Path(path).is_dir():
        raise ConfigError("command line", [f"--tokenizer {path}: no such folder (give the folder holding "
                                           "tokenizer.json / tokenizer_config.json)"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError("command line", [f"--tokenizer {path}: cannot load a tokenizer ({err})"]) from None
    if tokenizer.pad_token_id is None:
        raise ConfigError("command line", [f"the tokenizer in {path} has no pad token"])
    return tokenizer


def resolve_run(path: str | Path, world: int, max_steps: int | None, epochs: float | None,
                num_train: int) -> tuple[RunConfig, int]:
    """The checked DeepSpeed JSON and the run's length in optimizer steps.

    The length is ``--max_steps``, or ``--epochs`` over the train split, or the JSON's
    ``total_num_steps`` (the paper's, in ``ds_configs/finetune_<task>.json``). A JSON that fixes
    ``total_num_steps`` fixes the length: the learning-rate schedule (warmup, decay) is made for it.
    """
    cuda = torch.cuda.is_available()
    run = load_run_config(path, world, cuda, max_steps=max_steps or 1)  # read for its batch size only
    if max_steps is None and epochs is not None:
        max_steps = max(1, math.ceil(epochs * num_train / run.global_batch_size))
    fixed = json.loads(Path(path).read_text()).get("scheduler", {}).get("params", {}).get("total_num_steps")
    if isinstance(fixed, int) and max_steps not in (None, fixed):
        raise ConfigError(f"DeepSpeed config {path}", [
            f"its scheduler's total_num_steps is {fixed} (the schedule of the paper's run) but this run asks for "
            f"{max_steps} steps: drop --max_steps/--epochs, or use a JSON with \"total_num_steps\": \"auto\""])
    max_steps = fixed if isinstance(fixed, int) else max_steps
    if max_steps is None:
        raise ConfigError(f"DeepSpeed config {path}", ["no run length: give --max_steps or --epochs"])
    return load_run_config(path, world, cuda, max_steps=max_steps), max_steps


def build_model(start: model_sources.Start, config: WideNetConfig, run: RunConfig,
                seed: int) -> WideNetForSequenceClassification:
    """The classifier with this rank's slice of the starting weights (fresh parts seeded)."""
    torch.manual_seed(seed)
    model = WideNetForSequenceClassification(config)
    ep_size = run.moe.ep_size
    if ep_size > 1:
        ep_rank = expert_parallel_rank(dist.get_rank(), dist.get_world_size(), ep_size,
                                       run.deepspeed.get("use_data_before_expert_parallelism", False))
        start = dataclasses.replace(start, weights=to_local_experts(start.weights, config.num_experts, ep_size,
                                                                    ep_rank))
    model_sources.load_weights(model, start)
    return model


def setup(args: argparse.Namespace) -> Job:
    """Check the inputs, load and encode the data, build the model and the engine."""
    init_distributed()
    start_run_log()  # rank-aware console logging for every widenet_ds module
    task = get_task(args.task)
    output_dir = Path(args.output_dir or f"runs/glue/{task.name}")
    examples = load_data(task, args)
    missing = [name for name in ("train", task.dev_splits[0]) if name not in examples]
    if missing:
        raise ConfigError("command line", [f"no {name} split: give its file" for name in missing])
    tokenizer = load_tokenizer(args)
    start = model_sources.load_start(args.model_name_or_path, task.num_labels, parse_overrides(args.override),
                                     len(tokenizer))
    if args.max_seq_length > start.config.max_position_embeddings:
        raise ConfigError("command line", [f"--max_seq_length {args.max_seq_length} is longer than the model's "
                                           f"max_position_embeddings {start.config.max_position_embeddings}"])
    ds_config = args.deepspeed_config or REPO_ROOT / "ds_configs" / f"finetune_{task.name}.json"
    run, max_steps = resolve_run(ds_config, dist.get_world_size(), args.max_steps, args.epochs,
                                 len(examples["train"]))
    for note in run.notes:
        log.warning("%s", note)
    check_cuda_graphs(args.compile, run)
    check_profile_steps(args.profile, max_steps)
    config = start.config.with_moe_settings(run.moe)
    if not task.is_regression:
        config.id2label = dict(enumerate(task.label_names))
        config.label2id = {name: i for i, name in enumerate(task.label_names)}
    lock = on_rank_zero(lambda: claim_output_dir(output_dir, JOB, resuming=False,
                                                 overwrite=args.overwrite_output_dir), share_result=False)
    try:
        return _build(args, task, run, max_steps, start, config, tokenizer, examples, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(args: argparse.Namespace, task: TaskSpec, run: RunConfig, max_steps: int, start: model_sources.Start,
           config: WideNetConfig, tokenizer, examples: dict[str, list], lock: OutputDirLock | None) -> Job:
    """Encode the data, build the model and the engine, open the metrics (the output folder is claimed)."""
    from transformers import set_seed

    from ..engine.build import initialize_engine

    output_dir = Path(args.output_dir or f"runs/glue/{task.name}")
    features = {split: encode(rows, tokenizer, args.max_seq_length) for split, rows in examples.items()}
    indices = {split: [row.idx for row in rows] for split, rows in examples.items()}
    set_seed(args.seed)
    job = Job(args, task, run, config, output_dir, tokenizer, max_steps, features, indices, lock=lock)
    model = compile_if_asked(build_model(start, config, run, args.seed), args.compile)
    job.engine, _, _ = initialize_engine(model, run)
    job.metrics = MetricsWriter(output_dir)
    job.metrics.write_event({"event": "start", "step": 0})
    write_run_record(output_dir, config, run, args, job=JOB)
    log.info("%s: %d train examples, %d steps of %d sequences, from %s (%s)", task.name, len(examples["train"]),
             max_steps, run.global_batch_size, start.source, start.kind)
    return job


# --- training and evaluation -----------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


COMPILED_PAD_MULTIPLE = 64  # a compiled model sees lengths 64, 128, ... only (one graph, one CUDA graph each)


def batch_collator(job: Job, collate_fn: Callable = collate):
    """``collate`` for this job: to the longest example of a batch; a compiled model's batches to the next
    multiple of ``COMPILED_PAD_MULTIPLE`` (at most ``--max_seq_length``), so that it compiles, and records
    CUDA graphs, for a few lengths instead of one per length met."""
    compiled = job.args.compile != "none"
    return partial(collate_fn, pad_token_id=job.tokenizer.pad_token_id,
                   pad_to_multiple_of=COMPILED_PAD_MULTIPLE if compiled else None, max_length=job.args.max_seq_length)


def train_batches(job: Job, collate_fn: Callable = collate):
    """Endless micro-batches of this rank's share of the train split, reshuffled every epoch."""
    from torch.utils.data import DataLoader, DistributedSampler

    rank, world = _rank_world()
    sampler = DistributedSampler(job.features["train"], num_replicas=world, rank=rank, seed=job.args.seed)
    loader = DataLoader(job.features["train"], batch_size=job.run.micro_batch_size, sampler=sampler,
                        collate_fn=batch_collator(job, collate_fn))
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def predict_in_shares(job, features: list[dict[str, Any]], forward: Callable[[dict[str, Tensor], list[int]], list],
                      collate_fn: Callable = collate) -> list:
    """One value per feature, in order, the same on every rank: ``forward(batch, indices)`` gives one
    value per row of a collated batch (on the engine's device, in eval mode, without gradients).

    Each rank predicts an equal share (padded by wrapping around), so with expert parallelism
    every rank runs the same number of forwards; the shares are gathered and put in order.
    """
    engine = job.engine
    rank, world = _rank_world()
    positions = [i % len(features) for i in range(rank, math.ceil(len(features) / world) * world, world)]
    size = job.args.eval_batch_size or job.run.micro_batch_size
    rows, collate_batch = [], batch_collator(job, collate_fn)
    engine.eval()
    with torch.no_grad():
        for chunk in (positions[i:i + size] for i in range(0, len(positions), size)):
            batch = collate_batch([features[i] for i in chunk])
            rows.extend(forward({k: v.to(engine.device) for k, v in batch.items()}, chunk))
    engine.train()
    shares = [(positions, rows)]
    if world > 1:
        mine, shares = shares[0], [None] * world
        dist.all_gather_object(shares, mine)
    ordered: list[Any] = [None] * len(features)
    for where, values in shares:
        for i, value in zip(where, values):
            ordered[i] = value
    return ordered


def predict(job: Job, split: str) -> np.ndarray:
    """(N, num_labels) logits of a split, the same on every rank."""

    def logits(batch: dict[str, Tensor], indices: list[int]) -> list[np.ndarray]:
        batch.pop("labels", None)
        return list(job.engine(**batch).logits.float().cpu().numpy())

    return np.stack(predict_in_shares(job, job.features[split], logits)).reshape(-1, job.task.num_labels)


def evaluate(job: Job) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The task's metrics over its dev splits (those present), and their logits."""
    logits = {split: predict(job, split) for split in job.task.dev_splits if split in job.features}
    metrics = {}
    for split, values in logits.items():
        labels = [f["labels"] for f in job.features[split]]
        metrics.update(compute_metrics(job.task.name, values, labels, split=split))
    return metrics, logits


def fit(job: Job) -> dict[str, Any]:
    """Train for ``max_steps``, evaluating every ``--eval_every`` steps and at the end; returns the best."""
    return keep_best_over_training(job, evaluate, keep_if_best, f"finetune {job.task.name}")


def keep_best_over_training(job, evaluate: Callable, keep_if_best: Callable, description: str,
                            collate_fn: Callable = collate) -> dict[str, Any]:
    """The fine-tuning loop of this job and the SQuAD job: ``max_steps`` steps of ``collate_fn``'s
    batches, ``evaluate(job)`` -> (metrics, outputs) every ``--eval_every`` steps and at the end,
    ``keep_if_best(job, step, metrics, outputs)`` after each; returns ``job.best``."""
    args, outputs = job.args, {}

    def evaluate_dev(step: int) -> dict[str, float]:
        metrics, outputs[step] = evaluate(job)
        return metrics

    schedule = Schedule(max_steps=job.max_steps, log_every=args.log_every, eval_every=args.eval_every,
                        eval_at_end=True)
    loop = TrainingLoop(job.engine, train_batches(job, collate_fn), schedule, grad_accum=job.run.grad_accum,
                        metrics=job.metrics, guard=NonFiniteGuard(**job.run.nonfinite_loss),
                        profiler=StepProfiler(args.profile, job.output_dir / "profile"),
                        description=description, evaluate=evaluate_dev,
                        after_eval=lambda step, metrics: keep_if_best(job, step, metrics, outputs.pop(step)),
                        logger=log)
    loop.run({"step": 0})
    return job.best


def keep_if_best(job: Job, step: int, metrics: dict[str, float], logits: dict[str, np.ndarray]) -> None:
    """On a new best main metric (NaN counts as worst): keep the weights, export ``best/`` and results."""
    score = metrics[job.task.main_metric]
    score = score if math.isfinite(score) else -math.inf
    if job.best and score <= job.best["score"]:
        return
    state = {k: v.detach().cpu().clone() for k, v in job.engine.module.state_dict().items()}
    job.best = {"step": step, "score": score, "metrics": metrics, "state": state}
    full = gather_full_weights(job, state)
    if is_main_process():
        export_best(job, full, logits)
    if dist.is_initialized():
        dist.barrier()


def gather_full_weights(job: Job, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every expert (global indices) plus the shared weights, on rank 0 (None elsewhere)."""
    ep_size = job.run.moe.ep_size
    if ep_size == 1:
        return state
    rank, world = _rank_world()
    ep_rank = expert_parallel_rank(rank, world, ep_size,
                                   job.run.deepspeed.get("use_data_before_expert_parallelism", False))
    experts = to_global_experts({k: v for k, v in state.items() if is_expert_key(k)},
                                job.config.num_experts, ep_size, ep_rank)
    parts = [None] * world if rank == 0 else None
    dist.gather_object(experts, parts, dst=0)
    if rank != 0:
        return None
    full = {k: v for k, v in state.items() if not is_expert_key(k)}
    for part in parts:  # expert-data-parallel replicas hold equal copies
        full.update(part)
    return full


def export_best(job: Job, weights: dict[str, torch.Tensor], logits: dict[str, np.ndarray]) -> None:
    """``best/`` (an ep_size-1 Hugging Face folder, fp32, with the tokenizer), ``eval_results.json``
    and ``dev_predictions.json`` (rank 0)."""
    config = copy.deepcopy(job.config)
    config.moe = {**config.moe, "ep_size": 1}
    model = WideNetForSequenceClassification(config)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    with replace_folder(job.output_dir / "best") as folder:  # never half a model: a kill mid-write keeps the old
        model.save_pretrained(folder)
        job.tokenizer.save_pretrained(folder)
    results = {"task": job.task.name, "model": job.args.model_label or job.args.model_name_or_path,
               "seed": job.args.seed, "best_step": job.best["step"], **job.best["metrics"]}
    (job.output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    predictions = {split: {"idx": job.indices[split], "logits": values.tolist(),
                           "labels": [f["labels"] for f in job.features[split]]} for split, values in logits.items()}
    (job.output_dir / "dev_predictions.json").write_text(json.dumps(predictions))


def predict_test(job: Job) -> list[Path]:
    """GLUE submission files of the test (and MNLI's diagnostic) splits, from the best weights."""
    splits = [s.name for s in job.task.splits if s.submission_file and s.name in job.features]
    job.engine.module.load_state_dict(job.best["state"])
    files = []
    for split in splits:
        logits = predict(job, split)
        if is_main_process():
            files.append(write_split_submission(job.output_dir / "submission", job.task.name, split, logits,
                                                job.indices[split]))
    return files


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Setup, fit, test predictions; returns the best evaluation. Leaves the process group open, so
    that several runs can share it (``run`` closes it; re-creating a multi-rank group is racy)."""
    return fit_to_the_end(setup(args), fit, predict_test)


def fit_to_the_end(job, fit: Callable, after_fit: Callable | None = None) -> dict[str, Any]:
    """``fit(job)``, then ``after_fit(job)``; marks the run finished and releases its folder's lock (also
    on an error). Returns the best evaluation without its weights. The GLUE and SQuAD jobs end so."""
    try:
        best = fit(job)
        if after_fit is not None:
            after_fit(job)
        job.metrics.write_event({"event": "finished", "step": job.max_steps})
        job.metrics.close()
        mark_finished(job.output_dir)
    finally:
        if job.lock is not None:
            job.lock.release()
    return {k: v for k, v in best.items() if k != "state"}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """The whole job from the command line: parse, fine-tune, close."""
    args = build_parser().parse_args(argv)
    with distributed_run():
        return finetune(args)
