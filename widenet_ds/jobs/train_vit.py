"""Image classification (ImageNet-style) with ViT, WideNet or ViT-MoE on DeepSpeed.

``setup`` checks everything a user can get wrong (the JSON and its ``augmentation`` block, the image
files and class folders, the output folder, a checkpoint to resume) before any compute; ``fit`` trains
with mixup / cutmix and label smoothing, evaluates top-1 / top-5 on the validation split, saves
checkpoints (``--resume auto`` continues exactly); ``export_final`` writes ``final/``: a Hugging Face
folder (safetensors) with the image processor beside the model. ``launch/train_vit.py`` only calls ``run``.

The shared ``TrainingLoop`` runs the steps (metrics window, non-finite guard, stop signals, the evaluation
and checkpoint cadence), counting images where a text job counts tokens; what is this module's own is the
data (augmented, mixed into soft targets), the evaluation and the checkpoint's contents.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import VISION_PRESETS, ConfigError, WideNetVisionConfig
from ..data.augment import AugmentSettings, EvalTransform, Mixup
from ..data.images import (
    ImageData,
    ImageDataError,
    batches_per_epoch,
    eval_batches,
    find_validation_folder,
    load_hub_images,
    load_image_folders,
    train_batches,
)
from ..distributed import (
    distributed_run,
    init_distributed,
    is_main_process,
    on_rank_zero,
)
from ..engine import checkpointing
from ..engine.ds_config import RunConfig, load_run_config
from ..engine.guards import NonFiniteGuard
from ..modeling import WideNetForImageClassification
from .args import (
    HelpFormatter,
    add_launcher_arguments,
    add_output_arguments,
    at_least,
    parse_overrides,
)
from .loop import Schedule, TrainingLoop
from .metrics import MetricsWriter, start_run_log
from .run_dir import REPO_ROOT, OutputDirLock, claim_output_dir, write_run_record

DEFAULT_DS_CONFIG = REPO_ROOT / "ds_configs" / "vit_cpu_smoke.json"
JOB = "train_vit"  # recorded in run.json: another job refuses this output folder
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a ViT / WideNet / ViT-MoE image classifier on DeepSpeed.",
                                formatter_class=HelpFormatter)
    data = p.add_argument_group("data: an image folder (one sub-folder per class) or a hub dataset")
    data.add_argument("--data_dir", help="a folder with train/ and val/ (or validation/, test/) class folders")
    data.add_argument("--train_dir", help="the train split's class folders (instead of --data_dir)")
    data.add_argument("--validation_dir", help="the validation split's class folders (instead of --data_dir)")
    data.add_argument("--dataset", help="a datasets hub name instead of folders, e.g. cifar10 or imagenet-1k")
    data.add_argument("--dataset_config", help="the hub dataset's config")
    data.add_argument("--train_split", default="train", help="the hub dataset's train split")
    data.add_argument("--validation_split", help="the hub dataset's evaluation split (default: validation, else test)")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="skip (and count) image files that do not decode instead of refusing the data")
    data.add_argument("--image_check", choices=("decode", "open"), default="decode",
                      help="how image folders are checked before training: 'decode' every file fully (catches "
                           "truncated files; ImageNet takes minutes on 8 cores) or only 'open' its header (fast; a "
                           "file that fails later stops the run, naming it)")
    data.add_argument("--loader_workers", type=at_least(0), default=None,
                      help="DataLoader worker processes (default 8 with a GPU, 0 on CPU); batches do not depend on it")
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="debug", choices=sorted(VISION_PRESETS), help="the architecture")
    model.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                       help="change one model-config field, e.g. --override image_size=64 (repeatable)")
    model.add_argument("--activation_checkpointing", action="store_true", help="non-reentrant, per block")
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", default="runs/vit", help="checkpoints, metrics, final export")
    run.add_argument("--max_steps", type=at_least(1), help="optimizer steps (default: the JSON's total_num_steps)")
    run.add_argument("--resume", help="'auto' (newest complete checkpoint in output_dir, if any) or a path")
    add_output_arguments(run, resumable=True)
    run.add_argument("--seed", type=int, default=42, help="seeds the data order, augmentation and initialisation")
    run.add_argument("--log_every", type=at_least(1), default=10, help="steps between metric records")
    run.add_argument("--eval_every", type=at_least(0), default=500, help="steps between evaluations (0: at the end)")
    run.add_argument("--eval_images", type=at_least(1), help="validation images per evaluation (default: all)")
    run.add_argument("--eval_batch_size", type=at_least(1), help="default: the JSON's micro-batch size")
    run.add_argument("--save_every", type=at_least(0), default=1000, help="steps between checkpoints (0: never)")
    run.add_argument("--keep_last", type=at_least(0), default=3, help="complete checkpoints to keep (0: all)")
    add_launcher_arguments(run, "ds_configs/vit_cpu_smoke.json")
    return p


@dataclass
class Job:
    """Everything ``fit`` needs, built by ``setup``."""

    args: argparse.Namespace
    run: RunConfig
    augment: AugmentSettings
    config: WideNetVisionConfig
    output_dir: Path
    data: ImageData
    max_steps: int
    engine: Any = None
    metrics: MetricsWriter | None = None
    state: dict[str, Any] = field(default_factory=dict)  # step, batches (micro-batches this rank consumed)
    lock: OutputDirLock | None = None  # held by rank 0 while the job runs
    stopped_by: str = ""  # the signal that stopped the run early ("" if it ran to its end)


# --- setup ---------------------------------------------------------------------------------


def read_recipe(path: str | Path, max_steps: int | None) -> tuple[RunConfig, AugmentSettings, int]:
    """The checked DeepSpeed JSON, its ``augmentation`` block and the run's length: ``--max_steps``, else
    the scheduler's ``total_num_steps`` (the recipe's schedule is made for it)."""
    path = Path(path)
    world, cuda = dist.get_world_size(), torch.cuda.is_available()
    load_run_config(path, world, cuda, max_steps=max_steps or 1)  # refuses a missing or broken file first
    raw = json.loads(path.read_text())
    fixed = raw.get("scheduler", {}).get("params", {}).get("total_num_steps")
    steps = max_steps or (fixed if isinstance(fixed, int) else None)
    if steps is None:
        raise ConfigError(f"DeepSpeed config {path}", ["no run length: give --max_steps (the scheduler's "
                                                       "total_num_steps is \"auto\")"])
    if isinstance(fixed, int) and steps < fixed:
        log.warning("--max_steps %d stops the run before the end of %s's schedule (%d steps): the learning rate "
                    "will not have decayed", steps, path, fixed)
    return load_run_config(path, world, cuda, max_steps=steps), AugmentSettings.from_dict(raw.get("augmentation")), steps


def load_data(args: argparse.Namespace) -> ImageData:
    """The image folders or the hub dataset named on the command line (every file checked)."""
    if args.dataset:
        if args.data_dir or args.train_dir or args.validation_dir:
            raise ConfigError("command line", ["give --dataset or image folders (--data_dir / --train_dir), not both"])
        return load_hub_images(args.dataset, args.dataset_config, args.train_split, args.validation_split)
    if args.data_dir:
        if args.train_dir or args.validation_dir:
            raise ConfigError("command line", ["give --data_dir or --train_dir/--validation_dir, not both"])
        root = Path(args.data_dir)
        validation = find_validation_folder(root)
        if validation is None:
            raise ConfigError("command line", [f"--data_dir {root}: no val/, validation/, valid/ or test/ folder "
                                               "beside train/ (or give --validation_dir)"])
        return load_image_folders(root / "train", validation, args.skip_bad_images, args.image_check == "decode")
    if not (args.train_dir and args.validation_dir):
        raise ConfigError("command line", ["no data: give --data_dir, --train_dir and --validation_dir, or --dataset"])
    return load_image_folders(Path(args.train_dir), Path(args.validation_dir), args.skip_bad_images,
                              args.image_check == "decode")


def checked_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--override`` fields, refused (with the preset's own checks) before the data is read."""
    overrides = parse_overrides(args.override)
    if "moe" in overrides:
        raise ConfigError("command line", ["--override moe=...: the MoE's run-time settings come from the "
                                           "DeepSpeed JSON's moe block (--deepspeed_config)"])
    WideNetVisionConfig.from_preset(args.preset, **overrides)
    return overrides


def build_config(args: argparse.Namespace, data: ImageData, run: RunConfig) -> WideNetVisionConfig:
    config = WideNetVisionConfig.from_preset(args.preset, **checked_overrides(args), num_labels=data.num_labels)
    config.id2label = dict(enumerate(data.class_names))
    config.label2id = {name: i for i, name in enumerate(data.class_names)}
    return config.with_moe_settings(run.moe)


def setup(args: argparse.Namespace) -> Job:
    """Check the inputs, read the data, build the model and the engine, resume."""
    init_distributed()
    start_run_log()
    run, augment, max_steps = read_recipe(args.deepspeed_config or DEFAULT_DS_CONFIG, args.max_steps)
    for note in run.notes:
        log.warning("%s", note)
    if augment.mixes() and run.micro_batch_size % 2:
        raise ConfigError(f"DeepSpeed config {run.path}", [
            f"mixup / cutmix pair each image with the micro-batch reversed: train_micro_batch_size_per_gpu must be "
            f"even, got {run.micro_batch_size} (or set mixup_alpha and cutmix_alpha to 0)"])
    checked_overrides(args)  # fail before the file checks
    data = load_data(args) if dist.get_world_size() == 1 else _data_on_every_rank(args)
    if batches_per_epoch(len(data.train), run.micro_batch_size, dist.get_world_size()) == 0:
        raise ImageDataError(data.source, [f"the train split has {len(data.train)} images: fewer than one "
                                           f"micro-batch of {run.micro_batch_size} per rank on "
                                           f"{dist.get_world_size()} rank(s)"])
    config = build_config(args, data, run)
    output_dir = Path(args.output_dir)
    lock = on_rank_zero(lambda: claim_output_dir(output_dir, JOB, resuming=bool(args.resume),
                                                 overwrite=args.overwrite_output_dir, resume_hint=True),
                        share_result=False)
    try:
        resume_from = on_rank_zero(lambda: checkpointing.resolve_resume(args.resume, output_dir / "checkpoints"))
        return _build(Job(args, run, augment, config, output_dir, data, max_steps, lock=lock), resume_from)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _data_on_every_rank(args: argparse.Namespace) -> ImageData:
    """Rank 0 checks every file (and downloads a hub dataset) first; the others then read the same data:
    image folders as rank 0's checked lists, a hub dataset from the local cache rank 0 filled."""
    if not args.dataset:
        return on_rank_zero(lambda: load_data(args))
    found = on_rank_zero(lambda: load_data(args), share_result=False)
    return found if found is not None else load_data(args)


def _build(job: Job, resume_from: Path | None) -> Job:
    from ..engine.build import initialize_engine

    if resume_from is not None:
        checkpointing.check_architecture(resume_from, job.config)
    torch.manual_seed(job.args.seed)
    model = WideNetForImageClassification(job.config)
    if job.args.activation_checkpointing:
        model.set_activation_checkpointing(True)
    job.engine, _, _ = initialize_engine(model, job.run)
    job.state = {"step": 0, "batches": 0}
    if resume_from is not None:
        job.state = {**job.state, **checkpointing.load_checkpoint(job.engine, resume_from, job.config)}
        log.info("resumed from %s at step %d", resume_from, job.state["step"])
    job.metrics = MetricsWriter(job.output_dir)
    job.metrics.write_event({"event": "resume", "step": job.state["step"], "checkpoint": str(resume_from)}
                            if resume_from is not None else {"event": "start", "step": 0})
    for split in (job.data.train, job.data.validation):
        if split.skipped:
            job.metrics.write_event({"event": "skipped_files", "split": split.name, **split.skipped})
            log.warning("%s split: skipped %s", split.name, split.skipped)
    write_run_record(job.output_dir, job.config, job.run, job.args, job=JOB)
    if is_main_process():  # the recipe's data side beside the engine settings in effect
        record = job.output_dir / "ds_config.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "augmentation": vars(job.augment)}, indent=2))
    log.info("%d classes, %d train / %d validation images, %d steps of %d images", job.data.num_labels,
             len(job.data.train), len(job.data.validation), job.max_steps, job.run.global_batch_size)
    return job


# --- training and evaluation -----------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _workers(args: argparse.Namespace) -> int:
    return args.loader_workers if args.loader_workers is not None else (8 if torch.cuda.is_available() else 0)


def mixed_batches(job: Job):
    """Endless training micro-batches of this rank, augmented and mixed; labels are target distributions.
    The mix of the n-th micro-batch draws from a generator seeded by (seed, rank, n): resume-exact."""
    rank, world = _rank_world()
    transform = job.augment.train_transform(job.config.image_size)
    mixup: Mixup = job.augment.mixup(job.config.num_labels)
    batches = train_batches(job.data, transform, job.run.micro_batch_size, rank, world, job.args.seed,
                            start_batch=job.state["batches"], workers=_workers(job.args))
    for batch in batches:
        rng = np.random.default_rng((job.args.seed % 2**32, rank, job.state["batches"]))
        job.state["batches"] += 1
        images, targets = mixup(batch["pixel_values"], batch["labels"], rng)
        yield {"pixel_values": images, "labels": targets}


def evaluate(job: Job) -> dict[str, float]:
    """Top-1 / top-5 accuracy and cross-entropy over the validation split (or its first ``--eval_images``).
    Sums stay on the device; one all-reduce at the end."""
    engine, (rank, world) = job.engine, _rank_world()
    size = job.args.eval_batch_size or job.run.micro_batch_size
    k = min(5, job.config.num_labels)
    sums = torch.zeros(4, dtype=torch.float64, device=engine.device)  # top-1, top-k, loss sum, images
    engine.eval()
    with torch.no_grad():
        for batch, counted in eval_batches(job.data, EvalTransform(job.config.image_size), size, rank, world,
                                           job.args.eval_images, workers=_workers(job.args)):
            logits = engine(pixel_values=batch["pixel_values"].to(engine.device)).logits.float()
            labels, counted = batch["labels"].to(engine.device), counted.to(engine.device)
            top = logits.topk(k, dim=-1).indices
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            sums += torch.stack([((top[:, 0] == labels) & counted).sum(), ((top == labels[:, None]).any(-1)
                                 & counted).sum(), (loss * counted).sum(), counted.sum()]).double()
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    top1, topk, loss, images = sums.tolist()
    return {"eval_top1": top1 / max(images, 1), f"eval_top{k}": topk / max(images, 1),
            "eval_loss": loss / max(images, 1), "eval_images": int(images)}


def _save(job: Job) -> None:
    # what resume needs, as a copy: the marker is written on a thread while the next steps change job.state
    state = {"step": job.state["step"], "batches": job.state["batches"]}
    checkpointing.save_checkpoint(job.engine, job.output_dir / "checkpoints", job.state["step"], state,
                                  job.config, {**job.run.to_dict(), "augmentation": vars(job.augment)},
                                  keep_last=job.args.keep_last)


class ImageTrainingLoop(TrainingLoop):
    """The shared loop counting images: a record's ``tokens`` are the images seen, its rate ``images_per_s``."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["pixel_values"])

    def make_record(self, step: int) -> dict[str, Any]:
        record = super().make_record(step)
        record["images_per_s"] = record.pop("tokens_per_s")
        return record


def fit(job: Job) -> list[dict[str, Any]]:
    """Train to the run's length or until a stop signal (then save and return); returns the logged records."""
    args = job.args
    schedule = Schedule(max_steps=job.max_steps, log_every=args.log_every, eval_every=args.eval_every,
                        save_every=args.save_every, eval_at_end=True)
    loop = ImageTrainingLoop(job.engine, mixed_batches(job), schedule, grad_accum=job.run.grad_accum,
                             metrics=job.metrics, guard=NonFiniteGuard(**job.run.nonfinite_loss),
                             description="train_vit", preempt_grace=args.preempt_grace,
                             evaluate=lambda step: evaluate(job), save=lambda step: _save(job),
                             on_stop=lambda step, cause: _stop(job, cause),
                             finish=checkpointing.wait_for_pending_save, logger=log)
    return loop.run(job.state)


def _stop(job: Job, cause: str) -> None:
    """Save a checkpoint at this step (every rank) and record why the run stopped early."""
    _save(job)
    checkpointing.wait_for_pending_save()
    job.stopped_by = cause
    job.metrics.write_event({"event": "stopped", "step": job.state["step"], "signal": cause})
    log.warning("stopped by %s at step %d, checkpoint saved: continue with --resume auto", cause, job.state["step"])


# --- export ------------------------------------------------------------------------------------


def export_final(job: Job) -> Path | None:
    """Export the newest complete checkpoint to ``output_dir/final`` (rank 0 writes; every rank returns)."""
    def export() -> Path | None:
        checkpointing.wait_for_pending_save()
        saved = checkpointing.complete_checkpoints(job.output_dir / "checkpoints")
        if not saved:
            log.warning("no checkpoint in %s (--save_every 0): nothing exported", job.output_dir / "checkpoints")
            return None
        final = checkpointing.export_pretrained(saved[-1], job.output_dir / "final")
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
        finally:
            if job.lock is not None:
                job.lock.release()
        return records

