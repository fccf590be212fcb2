"""A model's weights and config from an export folder, a checkpoint or a run folder, read without
running code from the files: safetensors for exports, the project's checked loader for checkpoints."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..config import WideNetConfig
from .errors import ReportError

# Model folders a run writes, in the order a run folder is searched: the pretraining export, then
# the fine-tuning job's best model.
RUN_MODEL_FOLDERS = ("final", "best")


def is_export(folder: Path) -> bool:
    """A Hugging Face folder: config.json and safetensors weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def is_checkpoint(folder: Path) -> bool:
    return (folder / "mp_rank_00_model_states.pt").is_file()


def resolve_model_folder(path: str | Path) -> Path:
    """The export or checkpoint folder ``path`` names: itself, a run's ``final/`` or ``best/``, or
    a run's newest complete checkpoint that passes its checks."""
    from ..engine.checkpointing import CheckpointError, resolve_resume

    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: no such folder (give an export, a checkpoint step folder or a run's folder)")
    if is_export(path) or is_checkpoint(path):
        return path
    for name in RUN_MODEL_FOLDERS:
        if is_export(path / name):
            return path / name
    try:
        newest = resolve_resume("auto", path / "checkpoints")
    except CheckpointError as err:
        raise ReportError(str(err)) from None
    if newest is None:
        raise ReportError(f"{path} holds no model: no export (config.json + *.safetensors), no final/ or best/ "
                          "export and no complete checkpoint")
    return newest


def load_weights(path: str | Path) -> tuple[WideNetConfig, dict[str, Tensor]]:
    """The config and every weight (all experts) of the model ``path`` names (``resolve_model_folder``)."""
    from ..engine.checkpointing import CheckpointError, full_state_dict, verify_checkpoint

    folder = resolve_model_folder(path)
    try:
        config = WideNetConfig.from_json_file(folder / "config.json")
    except (OSError, ValueError) as err:
        raise ReportError(f"{folder / 'config.json'}: not a widenet-ds model config ({err})") from None
    if is_export(folder):
        from safetensors.torch import load_file

        state: dict[str, Tensor] = {}
        for file in sorted(folder.glob("*.safetensors")):
            try:
                state.update(load_file(str(file)))
            except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to replace
                raise ReportError(f"{file}: not readable safetensors ({err})") from None
        return config, state
    try:
        verify_checkpoint(folder)
        return config, full_state_dict(folder)
    except CheckpointError as err:
        raise ReportError(str(err)) from None
