"""Where a fine-tuning run starts (``--model_name_or_path``), read into one form.

- ``preset:NAME``: a named preset, randomly initialised (baselines, tests).
- an export of ``launch/pretrain.py`` (a Hugging Face folder of model type ``widenet``);
- a DeepSpeed checkpoint of pretraining (``<out>/checkpoints/step_XXXXXXXX`` with its
  ``complete.json``, or the ``checkpoints`` folder: its newest complete one); experts are
  gathered from every expert file, whatever ep_size saved them;
- a Hugging Face ALBERT folder (``AlbertModel``, ``AlbertForPreTraining`` or
  ``AlbertForSequenceClassification`` saved with ``save_pretrained``), sparsely upcycled
  (see ``upcycling.py``).

Each becomes a ``Start``: the architecture, and the full weights (every expert under its
global index) in ``WideNetForSequenceClassification``'s names. Pretraining heads and a SQuAD
span head are dropped; the classifier (and, when upcycling, the router) start fresh.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import PRESETS, ConfigError, WideNetConfig
from ..engine.checkpointing import (
    MARKER,
    RUNTIME_FIELDS,
    CheckpointError,
    complete_checkpoints,
    full_state_dict,
    resolve_resume,
    verify_checkpoint,
)
from ..safe_io import UnsafeFileError, load_pt
from .upcycling import (
    UPCYCLE_FIELDS,
    upcycle_albert_weights,
    widenet_config_from_albert,
)

PRESET_PREFIX = "preset:"
# heads of other tasks, never part of this run's model: the pretraining heads, and the span head of a
# SQuAD fine-tuned folder (which thus starts GLUE fine-tuning with a fresh classifier)
_HEADS = ("predictions.", "sop_classifier.", "qa_outputs.")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt")
_FIELDS = frozenset(f.name for f in dataclasses.fields(WideNetConfig))


@dataclass
class Start:
    """A starting point for fine-tuning."""

    kind: str  # "preset", "export", "deepspeed" or "albert"
    source: str  # what --model_name_or_path named (a checkpoints folder resolved to its newest step)
    config: WideNetConfig  # architecture, num_labels and overrides applied; MoE settings not yet
    weights: dict[str, Tensor]  # full weights, every expert under its global index; empty for a preset
    fresh: tuple[str, ...]  # substrings of the parameter names that may be missing (initialised anew)


def tokenizer_dir_for(name_or_path: str) -> Path | None:
    """The tokenizer that came with a model: in its folder, else the pretraining run's ``<out>/tokenizer``
    (next to ``<out>/final`` or ``<out>/checkpoints``, two levels up from a checkpoint's step folder)."""
    if name_or_path.startswith(PRESET_PREFIX):
        return None
    path = Path(name_or_path)
    run_dir = path.parent.parent if _is_deepspeed_tag(path) else path.parent
    for folder in (path, run_dir / "tokenizer"):
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return folder
    return None


def load_start(name_or_path: str, num_labels: int, overrides: dict[str, Any], vocab_size: int) -> Start:
    """Read a starting point; ``vocab_size`` is the tokenizer's, which the embeddings must match."""
    if "moe" in overrides:
        raise ConfigError("command line", ["--override moe=...: the MoE's run-time settings come from the "
                                           "DeepSpeed JSON's moe block (--deepspeed_config)"])
    if name_or_path.startswith(PRESET_PREFIX):
        start = _preset(name_or_path, num_labels, overrides, vocab_size)
    else:
        start = _checkpoint(Path(name_or_path), num_labels, overrides)
    if start.config.vocab_size != vocab_size:
        raise ConfigError(f"model {start.source}", [
            f"the tokenizer has {vocab_size} tokens but the model's embeddings have {start.config.vocab_size} "
            "(vocab_size): use the tokenizer the model was trained with (--tokenizer)"])
    return start


def load_weights(model: nn.Module, start: Start) -> None:
    """Load ``start.weights`` (already sliced to this rank's experts) into ``model``; every parameter
    must be covered except the fresh ones, and every weight must be used."""
    if not start.weights:
        return
    own = model.state_dict()
    is_fresh = lambda key: any(part in key for part in start.fresh)  # noqa: E731
    weights = {k: v for k, v in start.weights.items() if not (is_fresh(k) and k in own and own[k].shape != v.shape)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not is_fresh(k)]
    if missing or unexpected:
        raise CheckpointError(f"the weights of {start.source} do not fit its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def _preset(name_or_path: str, num_labels: int, overrides: dict[str, Any], vocab_size: int) -> Start:
    if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
        raise ConfigError("command line", [f"--override vocab_size={overrides['vocab_size']} does not match the "
                                           f"tokenizer's {vocab_size} tokens"])
    config = WideNetConfig.from_preset(name_or_path.removeprefix(PRESET_PREFIX),
                                       **{**overrides, "vocab_size": vocab_size, "num_labels": num_labels})
    return Start("preset", name_or_path, config, {}, ("",))


def _checkpoint(path: Path, num_labels: int, overrides: dict[str, Any]) -> Start:
    """An export, a DeepSpeed checkpoint or an ALBERT folder, told apart by their files."""
    if not path.is_dir():
        raise CheckpointError(f"--model_name_or_path {path}: no such folder; expected preset:NAME (known: "
                              f"{', '.join(PRESETS)}), a pretraining export, a DeepSpeed checkpoint or an "
                              "ALBERT folder")
    if _is_deepspeed_tag(path):
        return _deepspeed(path, num_labels, overrides)
    if complete_checkpoints(path):  # a checkpoints folder: its newest checkpoint that passes the checks
        newest = resolve_resume("auto", path)
        if newest is None:
            raise CheckpointError(f"{path}: every complete checkpoint in it failed its checks (see the warnings)")
        return _deepspeed(newest, num_labels, overrides)
    config_file = path / "config.json"
    model_type = _read_json(config_file).get("model_type") if config_file.is_file() else None
    readers = {"widenet": _export, "albert": _albert}
    if model_type not in readers:
        raise CheckpointError(f"{path}: not a model folder this job reads (config.json model_type {model_type!r}); "
                              "expected a widenet export, a DeepSpeed checkpoint (with complete.json) or an "
                              "ALBERT folder")
    return readers[model_type](path, num_labels, overrides)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        found = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); the model folder is damaged") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{file}: a model config must be a JSON object")
    return found


def _export(path: Path, num_labels: int, overrides: dict[str, Any]) -> Start:
    """A Hugging Face folder of a WideNet (a pretraining export, or a fine-tuned ``best/``: its
    classifier is kept when the label count matches)."""
    config = _with_overrides(WideNetConfig.from_json_file(path / "config.json"), overrides, RUNTIME_FIELDS, path,
                             num_labels)
    weights = {k: v for k, v in _read_weights(path).items() if not k.startswith(_HEADS)}
    return Start("export", str(path), config, weights, ("classifier.",))


def _albert(path: Path, num_labels: int, overrides: dict[str, Any]) -> Start:
    """A Hugging Face ALBERT folder, sparsely upcycled."""
    from transformers import AlbertConfig

    albert = AlbertConfig.from_pretrained(path, local_files_only=True)
    shape = {k: overrides[k] for k in ("num_experts", "top_k") if k in overrides}
    config = _with_overrides(widenet_config_from_albert(albert, **shape), overrides, UPCYCLE_FIELDS, path,
                             num_labels)
    return Start("albert", str(path), config, upcycle_albert_weights(_read_weights(path), config),
                 ("classifier.", "widenet.pooler.", ".gate.wg."))


def _is_deepspeed_tag(path: Path) -> bool:
    return (path / MARKER).is_file() or (path / "mp_rank_00_model_states.pt").is_file()


def _deepspeed(tag: Path, num_labels: int, overrides: dict[str, Any]) -> Start:
    verify_checkpoint(tag)  # refuses a save that did not finish, a damaged file, a pickle that runs code
    config = WideNetConfig.from_json_file(tag / "config.json")
    config.moe = {**config.moe, "ep_size": 1}  # the weights are gathered; the run's JSON sets its own ep_size
    weights = {k: v for k, v in full_state_dict(tag).items() if not k.startswith(_HEADS)}
    return Start("deepspeed", str(tag), _with_overrides(config, overrides, RUNTIME_FIELDS, tag, num_labels),
                 weights, ("classifier.",))


def _with_overrides(config: WideNetConfig, overrides: dict[str, Any], changeable: frozenset[str] | set[str],
                    source: Path, num_labels: int) -> WideNetConfig:
    """Apply overrides that do not change what the checkpoint fixed; name each one that would."""
    problems = []
    for key, value in overrides.items():
        if key not in _FIELDS:
            problems.append(f"--override {key}: unknown field")
        elif key not in changeable and getattr(config, key) != value:
            problems.append(f"--override {key}={value!r}: the checkpoint has {key}={getattr(config, key)!r}; "
                            f"starting from a checkpoint only {', '.join(sorted(changeable - {'moe'}))} can change")
    if problems:
        raise ConfigError(f"overrides of {source}", problems)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.num_labels = num_labels
    config.check()
    return config


def _read_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face folder (safetensors, one file or shards; else pytorch_model*.bin)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        try:
            return {k: v for file in files for k, v in load_file(file).items()}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise CheckpointError(f"{folder}: cannot read its safetensors weights ({err}); the model folder is "
                                  "damaged or incomplete") from None
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")
    try:
        return {k: v for file in files for k, v in load_pt(file).items()}
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None
