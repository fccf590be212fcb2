"""DeepSpeed checkpoints that know when they are complete, resume exactly, and export to a
Hugging Face folder that loads without DeepSpeed.

Layout: ``<output_dir>/checkpoints/step_00000100/`` is one DeepSpeed tag directory holding
DeepSpeed's files (``mp_rank_00_model_states.pt``, ``layer_0_expert_<e>_mp_rank_00_model_states.pt``
per global expert, optimizer shards) and ours: ``config.json`` (the architecture and the MoE
settings in effect), ``run_config.json`` (the DeepSpeed JSON in effect), ``rng_rank<r>.pt`` and,
written last, ``complete.json`` with the step, the trainer state and every file's size and sha256.
A directory without a valid ``complete.json`` (a save that died half way) is never resumed from.

Checksums: the files are hashed after the save, on a thread of rank 0, while training goes on;
``complete.json`` is written when they are (``wait_for_pending_save`` waits for it). Before
anything is loaded from a checkpoint (resume, export, fine-tuning), ``verify_checkpoint`` checks
every file's size and sha256 and lists the globals of every pickle: a damaged file or one that
would run code is refused, naming the file. Every ``.pt`` file is read with
``widenet_ds.safe_io.load_pt`` (``weights_only`` with an allow-list), DeepSpeed's own reads
included (``widenet_ds.engine.build``).
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import WideNetConfig, WideNetVisionConfig
from ..modeling import WideNetForImageClassification, WideNetForPreTraining, image_processor_for
from ..modeling.deepspeed_moe import EXPERT_FILE_GLOB, is_expert_key
from ..safe_io import UnsafeFileError, load_pt, refuse_unsafe_globals, sha256_files

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
    """Every generator's state as tensors and plain values (loads with ``weights_only``)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                    gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save_failed(path: Path, err: Exception) -> CheckpointError:
    """Why a save failed, in the user's terms (full disk, no permission), and what is intact."""
    checkpoint_dir = path.parent
    complete = complete_checkpoints(checkpoint_dir)
    intact = (f"{path.name} has no {MARKER} and will not be resumed from; the newest complete checkpoint, "
              f"{complete[-1] if complete else 'none'}, is intact (--resume auto takes it)")
    code = getattr(err, "errno", None) or getattr(err.__cause__, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in str(err) \
            or "Read-only file system" in str(err):
        return CheckpointError(f"saving {path} failed: {checkpoint_dir} is not writable ({err}); make it writable "
                               f"or choose another --output_dir. {intact}")
    free = shutil.disk_usage(checkpoint_dir).free
    return CheckpointError(f"saving {path} failed ({err}); {free} bytes free on its filesystem: is the disk full? "
                           f"{intact}")


_pending: dict[str, Any] = {}  # the thread that hashes the newest save and writes its marker, and its error


def save_checkpoint(engine, checkpoint_dir: str | Path, step: int, trainer_state: dict[str, Any],
                    config: WideNetConfig, run_config: dict[str, Any], keep_last: int = 3) -> Path:
    """Save on every rank (collective). Once every rank has written its files, rank 0 hashes them and
    writes the marker on a thread of its own (training goes on); see ``wait_for_pending_save``."""
    wait_for_pending_save()
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag_for(step)
    path = checkpoint_dir / tag
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"widenet": trainer_state})
        torch.save(rng_state(), path / f"rng_rank{_rank()}.pt")
        if _rank() == 0:
            config.to_json_file(path / "config.json")
            (path / "run_config.json").write_text(json.dumps(run_config, indent=2))
    except (OSError, RuntimeError) as err:
        raise _save_failed(path, err) from err
    _barrier()
    if _rank() == 0:
        thread = threading.Thread(target=_finish_save, args=(path, step, trainer_state, keep_last),
                                  name=f"checkpoint-{tag}")
        _pending.update(thread=thread, error=None)
        thread.start()
    return path


def _finish_save(path: Path, step: int, trainer_state: dict[str, Any], keep_last: int) -> None:
    try:
        write_marker(path, step, trainer_state)
        prune_checkpoints(path.parent, keep_last)
    except Exception as err:  # noqa: BLE001 - raised again by wait_for_pending_save, in the training thread
        _pending["error"] = _save_failed(path, err) if isinstance(err, OSError) else err


def wait_for_pending_save() -> None:
    """Wait until the newest save is hashed and marked complete (rank 0; a no-op elsewhere); raise its error."""
    thread = _pending.pop("thread", None)
    if thread is not None:
        thread.join()
    error = _pending.pop("error", None)
    if error is not None:
        raise error


def write_marker(path: Path, step: int, trainer_state: dict[str, Any]) -> None:
    """Declare ``path`` complete: its files with their sizes and sha256, written atomically, last."""
    names = sorted(p for p in path.iterdir() if p.is_file() and p.name not in (MARKER, MARKER + ".tmp"))
    start = time.perf_counter()
    digests = sha256_files(names)
    seconds = time.perf_counter() - start
    files = {p.name: {"size": p.stat().st_size, "sha256": digests[p]} for p in names}
    marker = {"step": step, "trainer_state": trainer_state, "files": files,
              "hashed": {"bytes": sum(f["size"] for f in files.values()), "seconds": round(seconds, 3)}}
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    tmp.replace(path / MARKER)  # atomic: the marker exists whole or not at all
    log.debug("hashed %s: %d bytes in %.2f s", path.name, marker["hashed"]["bytes"], seconds)


def _expected(entry: Any) -> tuple[int, str | None]:
    """(size, sha256) of a marker's file entry; markers written before checksums hold the size only."""
    return (entry["size"], entry.get("sha256")) if isinstance(entry, dict) else (int(entry), None)


def read_marker(path: Path, checksums: bool = False) -> dict[str, Any]:
    """The completion marker of a checkpoint directory, after checking every file it lists: its size,
    and with ``checksums`` its sha256 (reads every file)."""
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{path} is incomplete: no {MARKER} (the save did not finish)")
    try:
        marker = json.loads(marker_path.read_text())
        expected = {name: _expected(entry) for name, entry in marker["files"].items()}
        marker["step"], marker["trainer_state"]  # noqa: B018 - present in every marker
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{marker_path} is corrupt (not the JSON a save writes)") from None
    for name, (size, _) in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: file {name} listed in {MARKER} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path}: file {name} is {file.stat().st_size} bytes, {size} when saved "
                                  "(truncated or overwritten)")
    if checksums:
        _check_digests(path, expected)
    return marker


def _check_digests(path: Path, expected: dict[str, tuple[int, str | None]]) -> None:
    hashed = {name: digest for name, (_, digest) in expected.items() if digest}
    if len(hashed) < len(expected):
        log.warning("%s was saved without checksums: only its file sizes are checked", path)
    found = sha256_files([path / name for name in sorted(hashed)])
    for name in sorted(hashed):
        if found[path / name] != hashed[name]:
            raise CheckpointError(f"{path}: file {name} is corrupt: its sha256 differs from the one recorded when "
                                  "it was saved (a changed byte, bad storage or a copy that went wrong)")


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Everything checked before a checkpoint is loaded: the marker, every file's size and sha256, and
    that no pickle in it names a global a checkpoint never holds. Returns the marker."""
    marker = read_marker(path, checksums=True)
    for file in sorted(path.glob("*.pt")):
        try:
            refuse_unsafe_globals(file)
        except UnsafeFileError as err:
            raise CheckpointError(str(err)) from None
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
    """``None``/``""``: fresh start; ``auto``: the newest complete checkpoint that passes
    ``verify_checkpoint`` (a damaged one is skipped with a warning naming the file), or a fresh start
    if none; else a path, which must pass ``verify_checkpoint``."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_dir)
        for path in reversed(found):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as err:
                log.warning("--resume auto skips %s: %s", path.name, err)
        if found:
            raise CheckpointError(f"every complete checkpoint in {checkpoint_dir} failed its checks (see the "
                                  "warnings above); none can be used. Restore one from a copy (or, to "
                                  "pretrain from scratch there, --overwrite_output_dir)")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    verify_checkpoint(path)
    return path


def check_architecture(path: Path, config: WideNetConfig) -> None:
    """Refuse a checkpoint whose architecture differs from the run's, naming the fields."""
    saved_path = path / "config.json"
    if not saved_path.is_file():
        raise CheckpointError(f"{path}: no config.json, not a widenet-ds checkpoint")
    saved = type(config).from_json_file(saved_path)
    # the fields of the config's class and of its WideNetConfig bases (a vision config adds its own)
    annotated = {name for cls in type(config).__mro__ if issubclass(cls, WideNetConfig)
                 for name in vars(cls).get("__annotations__", {})}
    fields = sorted(annotated - RUNTIME_FIELDS)
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
        except (ValueError, UnsafeFileError) as err:  # e.g. the optimizer state of another optimizer
            raise CheckpointError(f"{path}: {err}") from err
        set_rng_state(_load(path / f"rng_rank{_rank()}.pt"))
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
    state = {k: v for k, v in _load(main)["module"].items() if not is_expert_key(k)}
    for expert_file in sorted(path.glob(EXPERT_FILE_GLOB)):
        state.update(_load(expert_file))
    return state


def _load(file: Path) -> Any:
    """A checkpoint file through the safe loader; a refusal becomes a ``CheckpointError``."""
    try:
        return load_pt(file)
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None


def export_pretrained(path: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) from a complete checkpoint; for an image
    classifier's checkpoint, its image processor instead of a tokenizer.

    The export holds every expert, so its config records ep_size 1; the other MoE settings
    are the ones the run used.
    """
    from ..safe_io import replace_folder

    path, out_dir = Path(path), Path(out_dir)
    verify_checkpoint(path)
    vision = json.loads((path / "config.json").read_text()).get("model_type") == WideNetVisionConfig.model_type
    config = (WideNetVisionConfig if vision else WideNetConfig).from_json_file(path / "config.json")
    config.moe = {**config.moe, "ep_size": 1}
    model = WideNetForImageClassification(config) if vision else WideNetForPreTraining(config)
    load_full_weights(model, path)
    with replace_folder(out_dir) as folder:  # the old export or the new one, never half of one
        model.save_pretrained(folder)
        if vision:  # an image classifier's preprocessing travels with it
            image_processor_for(config).save_pretrained(folder)
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(folder)
    return out_dir


def _is_checkpoint_or_run(folder: Path) -> bool:
    """A DeepSpeed tag folder, a checkpoints folder, or a run's output folder (or inside one of those)."""
    for candidate in (folder, *folder.parents):
        if (candidate / MARKER).is_file() or (candidate / "mp_rank_00_model_states.pt").is_file() \
                or _TAG.fullmatch(candidate.name) or (candidate / "checkpoints").is_dir() \
                or (candidate / "run.json").is_file():
            return True
    return False


def check_export_destination(out_dir: Path, overwrite: bool) -> None:
    """Refuse a destination an export would damage: a file, a checkpoint or run folder, a folder with
    other contents, or an earlier export without ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file: give a folder to export into")
    if _is_checkpoint_or_run(out_dir):
        raise CheckpointError(f"{out_dir} is (or is inside) a checkpoint or a run's folder: exporting there would "
                              "overwrite its config.json and break it; give a new folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    is_export = (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))
    if not is_export:
        raise CheckpointError(f"{out_dir} is not empty and holds no model: give a new or empty folder")
    if not overwrite:
        raise CheckpointError(f"{out_dir} holds an earlier export: pass --overwrite to replace it, or give a new "
                              "folder")


def export_to_folder(source: Path, out_dir: Path, tokenizer_dir: Path | None = None,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """``launch/export.py``: ``source`` is a step folder, or a run's output folder (its newest checkpoint
    that passes the checks). The tokenizer defaults to the run's. Returns (checkpoint, out_dir)."""
    check_export_destination(out_dir, overwrite)
    if _TAG.fullmatch(source.name):
        path = source
    else:
        if not complete_checkpoints(source / "checkpoints"):
            raise CheckpointError(f"{source}: no complete checkpoint in {source / 'checkpoints'} (give a run's "
                                  "output folder or a step_XXXXXXXX folder)")
        path = resolve_resume("auto", source / "checkpoints")
    tokenizer = tokenizer_dir or path.parent.parent / "tokenizer"
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise CheckpointError(f"--tokenizer {tokenizer_dir}: no such folder")
    export_pretrained(path, out_dir, tokenizer_dir=tokenizer if tokenizer.is_dir() else None)
    return path, out_dir
