"""SQuAD v1.1 / v2.0 fine-tuning on DeepSpeed, from the same starting points as GLUE fine-tuning
(``model_sources``: presets, pretraining exports and checkpoints, upcycled ALBERT folders).

``setup`` checks everything a user can get wrong (the data files and every question, the window
lengths, tokenizer vs embeddings, overrides vs checkpoint, the DeepSpeed JSON, the output folder)
before any compute; ``fit`` trains with the MoE on (the JSON's ``moe`` block), evaluates dev every
``--eval_every`` steps (n-best span decoding over the windows, the official evaluation) and keeps
the best model by F1 (v1.1) or best_f1 (v2.0, F1 at the no-answer threshold chosen on dev).
``launch/finetune_squad.py`` only calls ``run``.

Outputs in ``--output_dir``: ``eval_results.json`` (``exact_match`` and ``f1``; v2.0 adds the
official ``HasAns_*``, ``NoAns_*``, ``best_exact``, ``best_f1`` and their thresholds),
``predictions.json`` (id -> answer text, the official format), ``nbest_predictions.json``,
``null_odds.json`` (v2.0: the no-answer score per question, the official script's na-prob file),
``best/`` (a Hugging Face folder of ``WideNetForQuestionAnswering`` with the tokenizer),
``metrics.jsonl`` / ``tensorboard/`` and the resolved configs with the git hash.

The GLUE job's pieces are reused (tokenizer, run length, expert gathering), and the shared
``TrainingLoop`` runs the steps; what is SQuAD's own is the data, the span head, the decoding and
the evaluation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from ..engine.ds_config import RunConfig
from ..engine.expert_sharding import expert_parallel_rank, to_local_experts
from ..modeling import WideNetForQuestionAnswering
from ..safe_io import replace_folder
from ..squad import (
    SquadExample,
    check_lengths,
    collate,
    encode_eval,
    encode_train,
    evaluate_v1,
    evaluate_v2,
    gold_answers,
    load_squad,
    postprocess_predictions,
)
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
from .finetune import (
    COMPILED_PAD_MULTIPLE,
    fit_to_the_end,
    gather_full_weights,
    keep_best_over_training,
    load_tokenizer,
    predict_in_shares,
    resolve_run,
)
from .metrics import MetricsWriter, start_run_log
from .run_dir import (
    REPO_ROOT,
    OutputDirLock,
    claim_output_dir,
    write_run_record,
)

log = logging.getLogger(__name__)
JOB = "finetune_squad"  # recorded in run.json: another job refuses this output folder
DEFAULT_MAX_SEQ_LENGTH = {"1.1": 384, "2.0": 512}
MAIN_METRIC = {"1.1": "f1", "2.0": "best_f1"}
SPAN_HEAD = "qa_outputs."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune WideNet / ALBERT / BERT on SQuAD v1.1 or v2.0 with DeepSpeed.",
                                formatter_class=HelpFormatter)
    data = p.add_argument_group("data (default: the hub's squad / squad_v2)")
    data.add_argument("--version", required=True, choices=("1.1", "2.0"),
                      help="SQuAD 1.1 (every question answerable) or 2.0 (with unanswerable questions)")
    data.add_argument("--train_file", help="the official train JSON, e.g. train-v1.1.json (default: none, the "
                      "hub's rajpurkar/squad or rajpurkar/squad_v2)")
    data.add_argument("--validation_file", help="the official dev JSON, e.g. dev-v1.1.json (default: none, as "
                      "--train_file)")
    data.add_argument("--strict_answers", action="store_true",
                      help="refuse a file with an answer whose text is not at its answer_start (default: count "
                           "and report them; such train questions are skipped, dev questions kept)")
    data.add_argument("--max_seq_length", type=at_least(8),
                      help="tokens per window, special tokens included (default: 384 for 1.1, 512 for 2.0)")
    data.add_argument("--doc_stride", type=at_least(0), default=128,
                      help="tokens shared by consecutive windows of a long context")
    data.add_argument("--max_query_length", type=at_least(1), default=64, help="questions are cut to this many tokens")
    data.add_argument("--n_best_size", type=at_least(1), default=20, help="start and end candidates per window")
    data.add_argument("--max_answer_length", type=at_least(1), default=30, help="longest answer, in tokens")
    data.add_argument("--null_score_diff_threshold", type=float, default=0.0,
                      help="v2.0: predict no answer when null score - best span score is above this (use a "
                           "finished run's best_f1_thresh for new data)")
    model = p.add_argument_group("model")
    model.add_argument("--model_name_or_path", required=True,
                       help="preset:NAME, a pretraining export, a DeepSpeed checkpoint, or an ALBERT folder")
    model.add_argument("--tokenizer", help="a tokenizer folder (default: the one saved with the model); it must "
                                           "track character offsets (a tokenizer.json)")
    model.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                       help="a model-config field, e.g. hidden_dropout_prob=0.1 or (upcycling) num_experts=8")
    model.add_argument("--model_label", help="the model's name in results (default: --model_name_or_path)")
    add_compile_argument(model, f"A compiled run pads each batch to a multiple of {COMPILED_PAD_MULTIPLE} tokens")
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", help="best model, results, predictions, metrics (default: runs/squad/v<version>)")
    add_output_arguments(run, resumable=False)
    run.add_argument("--max_steps", type=at_least(1), help="optimizer steps (default: the JSON's total_num_steps)")
    run.add_argument("--epochs", type=positive_float, help="train this many epochs (of windows) instead of "
                     "--max_steps (default: none, --max_steps decides)")
    run.add_argument("--seed", type=int, default=42, help="seeds the span head's initialisation and the data order")
    run.add_argument("--eval_every", type=at_least(0), default=1000,
                     help="steps between dev evaluations (0: only at the end)")
    run.add_argument("--eval_batch_size", type=at_least(1), help="default: the JSON's micro-batch size")
    run.add_argument("--log_every", type=at_least(1), default=10, help="steps between metric records")
    add_profile_argument(run)
    add_launcher_arguments(run, "ds_configs/finetune_squad_v1.json or _v2.json")
    return p


@dataclass
class Job:
    """Everything ``fit`` needs, built by ``setup``."""

    args: argparse.Namespace
    run: RunConfig
    config: WideNetConfig
    output_dir: Path
    tokenizer: Any
    max_steps: int
    dev: list[SquadExample]
    features: dict[str, list[dict[str, Any]]]  # train windows (with answer positions), dev windows (with offsets)
    engine: Any = None
    metrics: MetricsWriter | None = None
    best: dict[str, Any] = field(default_factory=dict)  # step, score, metrics, state (this rank's weights, CPU)
    lock: OutputDirLock | None = None


# --- setup ---------------------------------------------------------------------------------


def span_start(start: model_sources.Start) -> model_sources.Start:
    """A starting point for the span model: a GLUE classifier is dropped, the span head is fresh."""
    weights = {k: v for k, v in start.weights.items() if not k.startswith("classifier.")}
    return dataclasses.replace(start, weights=weights, fresh=(*start.fresh, SPAN_HEAD))


def build_model(start: model_sources.Start, config: WideNetConfig, run: RunConfig,
                seed: int) -> WideNetForQuestionAnswering:
    """The span model with this rank's slice of the starting weights (fresh parts seeded)."""
    torch.manual_seed(seed)
    model = WideNetForQuestionAnswering(config)
    ep_size = run.moe.ep_size
    if ep_size > 1:
        ep_rank = expert_parallel_rank(dist.get_rank(), dist.get_world_size(), ep_size,
                                       run.deepspeed.get("use_data_before_expert_parallelism", False))
        start = dataclasses.replace(start, weights=to_local_experts(start.weights, config.num_experts, ep_size,
                                                                    ep_rank))
    model_sources.load_weights(model, start)
    return model


def _check_window_settings(args: argparse.Namespace, max_positions: int | None) -> None:
    problems = check_lengths(args.max_seq_length, args.max_query_length, args.doc_stride)
    if max_positions is not None and args.max_seq_length > max_positions:
        problems.append(f"--max_seq_length {args.max_seq_length} is longer than the model's max_position_embeddings "
                        f"{max_positions}")
    if problems:
        raise ConfigError("command line", problems)


def setup(args: argparse.Namespace) -> Job:
    """Check the inputs, load and encode the data, build the model and the engine."""
    init_distributed()
    start_run_log()
    args.max_seq_length = args.max_seq_length or DEFAULT_MAX_SEQ_LENGTH[args.version]
    output_dir = Path(args.output_dir or f"runs/squad/v{args.version}")
    _check_window_settings(args, max_positions=None)  # again with the model's positions once it is read
    if (args.train_file is None) != (args.validation_file is None):
        raise ConfigError("command line", ["give both --train_file and --validation_file (the official JSON files), "
                                           "or neither (the hub's squad / squad_v2)"])
    train = load_squad(args.version, "train", args.train_file, strict=args.strict_answers)
    dev = load_squad(args.version, "dev", args.validation_file, strict=args.strict_answers)
    tokenizer = load_tokenizer(args)
    start = model_sources.load_start(args.model_name_or_path, 2, parse_overrides(args.override), len(tokenizer))
    _check_window_settings(args, start.config.max_position_embeddings)
    windows = dict(tokenizer=tokenizer, max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                   max_query_length=args.max_query_length)
    features = {"train": encode_train(train, **windows), "dev": encode_eval(dev, **windows)}
    ds_config = args.deepspeed_config or REPO_ROOT / "ds_configs" / f"finetune_squad_v{args.version[0]}.json"
    run, max_steps = resolve_run(ds_config, dist.get_world_size(), args.max_steps, args.epochs, len(features["train"]))
    for note in run.notes:
        log.warning("%s", note)
    check_cuda_graphs(args.compile, run)
    check_profile_steps(args.profile, max_steps)
    config = start.config.with_moe_settings(run.moe)
    lock = on_rank_zero(lambda: claim_output_dir(output_dir, JOB, resuming=False,
                                                 overwrite=args.overwrite_output_dir), share_result=False)
    try:
        return _build(args, run, max_steps, span_start(start), config, tokenizer, dev, features, output_dir, lock,
                      len(train))
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(args: argparse.Namespace, run: RunConfig, max_steps: int, start: model_sources.Start,
           config: WideNetConfig, tokenizer, dev: list[SquadExample], features: dict[str, list], output_dir: Path,
           lock: OutputDirLock | None, num_train: int) -> Job:
    """Build the model and the engine, open the metrics (the output folder is claimed)."""
    from transformers import set_seed

    from ..engine.build import initialize_engine

    set_seed(args.seed)
    job = Job(args, run, config, output_dir, tokenizer, max_steps, dev, features, lock=lock)
    model = compile_if_asked(build_model(start, config, run, args.seed), args.compile)
    job.engine, _, _ = initialize_engine(model, run)
    job.metrics = MetricsWriter(output_dir)
    job.metrics.write_event({"event": "start", "step": 0, "train_questions": num_train,
                             "train_windows": len(features["train"]), "dev_questions": len(dev),
                             "dev_windows": len(features["dev"])})
    write_run_record(output_dir, config, run, args, job=JOB)
    log.info("SQuAD %s: %d train questions (%d windows), %d dev questions (%d windows), %d steps of %d windows, "
             "from %s (%s)", args.version, num_train, len(features["train"]), len(dev), len(features["dev"]),
             max_steps, run.global_batch_size, start.source, start.kind)
    return job


# --- training and evaluation -----------------------------------------------------------------


def predict(job: Job) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits of every dev window (each as long as the window), the same on every rank."""
    features = job.features["dev"]

    def logits(batch: dict[str, Tensor], indices: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = job.engine(**batch)
        starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        lengths = [len(features[i]["input_ids"]) for i in indices]
        return [(starts[row, :n], ends[row, :n]) for row, n in enumerate(lengths)]

    ordered = predict_in_shares(job, features, logits, collate)
    return [s for s, _ in ordered], [e for _, e in ordered]


def evaluate(job: Job) -> tuple[dict[str, float], dict[str, Any]]:
    """The official metrics of the dev questions, and the decoded predictions (every rank)."""
    args = job.args
    starts, ends = predict(job)
    v2 = args.version == "2.0"
    predictions, nbest, null_odds = postprocess_predictions(
        job.dev, job.features["dev"], starts, ends, version_2_with_negative=v2, n_best_size=args.n_best_size,
        max_answer_length=args.max_answer_length, null_score_diff_threshold=args.null_score_diff_threshold)
    return squad_metrics(args.version, gold_answers(job.dev), predictions, null_odds,
                         args.null_score_diff_threshold), {"predictions": predictions, "nbest": nbest,
                                                            "null_odds": null_odds}


def squad_metrics(version: str, golds: dict[str, list[str]], predictions: dict[str, str],
                  null_odds: dict[str, float], threshold: float) -> dict[str, float]:
    """v1.1: exact_match and f1. v2.0: the official keys, with ``exact_match`` = ``exact``; the null odds
    above ``threshold`` are the questions predicted "" already, so exact and f1 score predictions.json
    as written, and best_* are the scores at the threshold chosen on this data."""
    if version == "1.1":
        return evaluate_v1(golds, predictions)
    metrics = evaluate_v2(golds, predictions, null_odds, na_prob_thresh=threshold)
    return {"exact_match": metrics.pop("exact"), **metrics}


def fit(job: Job) -> dict[str, Any]:
    """Train for ``max_steps``, evaluating every ``--eval_every`` steps and at the end; returns the best."""
    return keep_best_over_training(job, evaluate, keep_if_best, f"finetune squad v{job.args.version}", collate)


def keep_if_best(job: Job, step: int, metrics: dict[str, float], outputs: dict[str, Any]) -> None:
    """On a new best main metric: keep the weights, export ``best/``, the results and the predictions."""
    score = metrics[MAIN_METRIC[job.args.version]]
    if job.best and score <= job.best["score"]:
        return
    state = {k: v.detach().cpu().clone() for k, v in job.engine.module.state_dict().items()}
    job.best = {"step": step, "score": score, "metrics": metrics, "state": state}
    full = gather_full_weights(job, state)
    if is_main_process():
        export_best(job, full, outputs)
    if dist.is_initialized():
        dist.barrier()


def export_best(job: Job, weights: dict[str, torch.Tensor], outputs: dict[str, Any]) -> None:
    """``best/`` (an ep_size-1 Hugging Face folder, fp32, with the tokenizer), ``eval_results.json``,
    ``predictions.json``, ``nbest_predictions.json`` and, for v2.0, ``null_odds.json`` (rank 0)."""
    config = copy.deepcopy(job.config)
    config.moe = {**config.moe, "ep_size": 1}
    model = WideNetForQuestionAnswering(config)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    with replace_folder(job.output_dir / "best") as folder:  # never half a model: a kill mid-write keeps the old
        model.save_pretrained(folder)
        job.tokenizer.save_pretrained(folder)
    args = job.args
    results = {"task": f"squad_v{args.version}", "model": args.model_label or args.model_name_or_path,
               "seed": args.seed, "best_step": job.best["step"], **job.best["metrics"]}
    if args.version == "2.0":
        results["null_score_diff_threshold"] = args.null_score_diff_threshold
    files = {"eval_results.json": results, "predictions.json": outputs["predictions"],
             "nbest_predictions.json": outputs["nbest"]}
    if args.version == "2.0":
        files["null_odds.json"] = outputs["null_odds"]
    for name, content in files.items():
        (job.output_dir / name).write_text(json.dumps(content, indent=2))


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Setup and fit; returns the best evaluation. Leaves the process group open (``run`` closes it)."""
    return fit_to_the_end(setup(args), fit)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """The whole job from the command line: parse, fine-tune, close."""
    args = build_parser().parse_args(argv)
    with distributed_run():
        return finetune(args)
