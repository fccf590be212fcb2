"""DeepSpeed checkpoints that know when they are complete, resume exactly, and export to a
Hugging Face folder that loads without DeepSpeed.

Layout: ``<output_dir>/checkpoints/step_00000100/`` is one DeepSpeed tag directory holding
DeepSpeed's files (``mp_rank_00_model_states.pt``, ``layer_0_expert_<e>_mp_rank_00_model_states.pt``
per global expert, optimizer shards) and ours: ``config.json`` (the architecture and the MoE
settings in effect), ``run_config.json`` (the DeepSpeed JSON in effect), ``rng_rank<r>.pt`` and,
written last, ``complete.json`` with the step, the trainer state and every file's size. A
directory without a valid ``complete.json`` (a save that died half way, a truncated file) is
never resumed from.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import WideNetConfig
from .modeling import WideNetForPreTraining

log = logging.getLogger(__name__)

MARKER = "complete.json"
_TAG = re.compile(r"step_(\d{8})")
# Fields a checkpoint may differ in from the run that loads it (run-time, not architecture).
RUNTIME_FIELDS = {"moe", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, checkpoint_dir: str | Path, step: int, trainer_state: dict[str, Any],
                    config: WideNetConfig, run_config: dict[str, Any], keep_last: int = 3) -> Path:
    """Save on every rank (collective); mark complete only after every rank finished writing."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag_for(step)
    path = checkpoint_dir / tag
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"widenet": trainer_state})
        torch.save(rng_state(), path / f"rng_rank{_rank()}.pt")
    except (OSError, RuntimeError) as err:
        free = shutil.disk_usage(checkpoint_dir).free
        complete = complete_checkpoints(checkpoint_dir)
        raise CheckpointError(
            f"saving {path} failed ({err}); {free} bytes free on its filesystem: is the disk full? "
            f"{path.name} has no {MARKER} and will not be resumed from; the newest complete checkpoint, "
            f"{complete[-1] if complete else 'none'}, is intact (--resume auto takes it)") from err
    if _rank() == 0:
        config.to_json_file(path / "config.json")
        (path / "run_config.json").write_text(json.dumps(run_config, indent=2))
    _barrier()
    if _rank() == 0:
        write_marker(path, step, trainer_state)
        prune_checkpoints(checkpoint_dir, keep_last)
    _barrier()
    return path


def write_marker(path: Path, step: int, trainer_state: dict[str, Any]) -> None:
    """Declare ``path`` complete: its files and their sizes, written atomically, last."""
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != MARKER}
    marker = {"step": step, "trainer_state": trainer_state, "files": files}
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    tmp.replace(path / MARKER)  # atomic: the marker exists whole or not at all


def read_marker(path: Path) -> dict[str, Any]:
    """The completion marker of a checkpoint directory, after checking every file it lists."""
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{path} is incomplete: no {MARKER} (the save did not finish)")
    try:
        marker = json.loads(marker_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{marker_path} is corrupt (not valid JSON)") from None
    for name, size in marker["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: file {name} listed in {MARKER} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path}: file {name} is {file.stat().st_size} bytes, {size} when saved "
                                  "(truncated or overwritten)")
    return marker


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete or damaged ones are skipped)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in sorted(checkpoint_dir.iterdir()):
        if _TAG.fullmatch(path.name):
            try:
                read_marker(path)
                found.append(path)
            except CheckpointError:
                continue
    return found


def prune_checkpoints(checkpoint_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than those."""
    complete = complete_checkpoints(checkpoint_dir)
    if keep_last <= 0 or not complete:
        return
    kept = {p.name for p in complete[-keep_last:]}
    oldest_kept = complete[-keep_last:][0].name
    for path in checkpoint_dir.iterdir():
        if _TAG.fullmatch(path.name) and path.name not in kept and path.name < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume: str | None, checkpoint_dir: str | Path) -> Path | None:
    """``None``/``""``: fresh start; ``auto``: newest complete checkpoint (or fresh); else a path."""
    if not resume:
        return None
    if resume == "auto":
        complete = complete_checkpoints(checkpoint_dir)
        return complete[-1] if complete else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    read_marker(path)
    return path


def check_architecture(path: Path, config: WideNetConfig) -> None:
    """Refuse a checkpoint whose architecture differs from the run's, naming the fields."""
    saved_path = path / "config.json"
    if not saved_path.is_file():
        raise CheckpointError(f"{path}: no config.json, not a widenet-ds checkpoint")
    saved = WideNetConfig.from_json_file(saved_path)
    fields = sorted(set(WideNetConfig.__annotations__) - RUNTIME_FIELDS)
    diffs = [f"{k}: checkpoint {getattr(saved, k)!r} vs this run {getattr(config, k)!r}"
             for k in fields if getattr(saved, k) != getattr(config, k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is of another architecture:\n  " + "\n  ".join(diffs))


def _saved_layout(path: Path) -> tuple[int, int]:
    """(ep_size, world_size) the checkpoint was saved with."""
    saved = json.loads((path / "run_config.json").read_text()) if (path / "run_config.json").is_file() else {}
    world = len(list(path.glob("rng_rank*.pt"))) or 1
    return saved.get("moe", {}).get("ep_size", 1), world


def load_checkpoint(engine, path: Path, config: WideNetConfig) -> dict[str, Any]:
    """Load a complete checkpoint into the engine; returns the trainer state.

    Saved with this run's ep_size and world size: everything resumes exactly (weights,
    optimizer, scheduler, each rank's RNG). Saved with another ep_size or world size: the
    weights are resharded (experts gathered from their files and re-split for this run's
    expert-parallel ranks) and the learning-rate schedule continues, but the optimizer
    state starts fresh, since DeepSpeed cannot reshard it; a warning says so.
    """
    marker = read_marker(path)
    check_architecture(path, config)
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_ep, saved_world = _saved_layout(path)
    if (saved_ep, saved_world) == (config.moe_settings.ep_size, world):
        try:
            engine.load_checkpoint(str(path.parent), tag=path.name)
        except ValueError as err:  # e.g. the optimizer state of another optimizer (widenet_ds.optim.Lamb)
            raise CheckpointError(f"{path}: {err}") from err
        set_rng_state(torch.load(path / f"rng_rank{_rank()}.pt", weights_only=False))
        return marker["trainer_state"]
    log.warning("checkpoint %s was saved with ep_size %d on %d rank(s); this run has ep_size %d on %d: loading "
                "the weights only (experts resharded); the optimizer state starts fresh", path, saved_ep,
                saved_world, config.moe_settings.ep_size, world)
    # DeepSpeed loads each global expert's file for this rank's experts and refreshes ZeRO's fp32 copies.
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    step = marker["trainer_state"]["step"]
    if engine.lr_scheduler is not None and step > 0:
        engine.lr_scheduler.step(step - 1)  # the schedule continues where it was
    return marker["trainer_state"]


def load_full_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint's weights, every expert, into a bare ep_size-1 model (no engine)."""
    state = full_state_dict(path)
    tied = "predictions.decoder.weight"
    if tied not in state and "widenet.embeddings.word_embeddings.weight" in state:
        state[tied] = state["widenet.embeddings.word_embeddings.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def full_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights from a DeepSpeed tag directory, experts gathered from every
    expert file under their global indices (whatever ep_size saved them)."""
    main = path / "mp_rank_00_model_states.pt"
    if not main.is_file():
        raise CheckpointError(f"{path}: no mp_rank_00_model_states.pt, not a DeepSpeed checkpoint")
    state = {k: v for k, v in torch.load(main, map_location="cpu", weights_only=False)["module"].items()
             if "deepspeed_experts" not in k}
    for expert_file in sorted(path.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(torch.load(expert_file, map_location="cpu", weights_only=False))
    return state


def export_pretrained(path: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) from a complete checkpoint.

    The export holds every expert, so its config records ep_size 1; the other MoE settings
    are the ones the run used.
    """
    path, out_dir = Path(path), Path(out_dir)
    read_marker(path)
    config = WideNetConfig.from_json_file(path / "config.json")
    config.moe = {**config.moe, "ep_size": 1}
    model = WideNetForPreTraining(config)
    load_full_weights(model, path)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir
