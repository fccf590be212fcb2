"""Reading files a user was handed (checkpoints, model folders) without running code from them,
and checksums that catch a damaged file.

``torch.load`` unpickles: a ``.pt`` file can name any Python callable and have it called while it
loads (a ``__reduce__`` payload). Every ``.pt`` file this project reads goes through
:func:`load_pt`, which first lists the globals the file's pickle names (without unpickling it) and
refuses any outside :func:`allowed_globals`, the classes DeepSpeed checkpoints legitimately hold,
then loads with ``weights_only=True`` under that allow-list. DeepSpeed's own loads are routed here
too (``widenet_ds.engine.build``).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch

_CHUNK = 8 << 20  # bytes read per update of a hash


class UnsafeFileError(RuntimeError):
    """A file that would run code when loaded; the message names the file and the global."""


@cache
def allowed_globals() -> tuple[Any, ...]:
    """What a DeepSpeed checkpoint of this project may hold besides tensors and plain containers.

    ZeRO 1-2 optimizer files pickle DeepSpeed's loss scaler, stage enum and fragment addresses
    (plain records: loading them calls no method of theirs beyond ``__setstate__``); random-number
    states of older checkpoints hold numpy arrays, rebuilt by numpy's array constructor.
    """
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    # the same function, pickled under numpy 2's and numpy 1's module names
    numpy_globals = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64)),
                     (_reconstruct, "numpy._core.multiarray._reconstruct"),
                     (_reconstruct, "numpy.core.multiarray._reconstruct")]
    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, *numpy_globals)


def _names(allowed: tuple[Any, ...]) -> set[str]:
    names = set()
    for item in allowed:
        if isinstance(item, tuple):
            names.add(item[1])
        else:
            names.add(f"{item.__module__}.{item.__qualname__}")
    return names


def refuse_unsafe_globals(path: str | Path) -> None:
    """Raise ``UnsafeFileError`` if the pickle in ``path`` names a global outside the allow-list.

    Reads the pickle's opcodes only: nothing in the file runs. Files in torch's legacy (non-zip)
    format cannot be listed this way; ``load_pt`` still refuses them through ``weights_only``."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError):
        return  # not a zip checkpoint: weights_only loading below decides
    allowed = _names(allowed_globals())
    refused = sorted(g for g in found if g not in allowed)
    if refused:
        raise UnsafeFileError(f"{path}: refused to load: its pickle names {', '.join(refused)}, which no checkpoint "
                              "of this project holds (loading it would run that code). Use a checkpoint you trust")


def load_pt(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` that runs no code from the file: globals are checked first, then loaded with
    ``weights_only=True`` under ``allowed_globals()``."""
    refuse_unsafe_globals(path)
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        reason = f"its pickle names {named[1]}" if named else "its pickle uses what a weights-only load refuses"
        raise UnsafeFileError(f"{path}: refused to load: {reason}, which no checkpoint of this project holds "
                              "(loading it could run code). Use a checkpoint you trust") from None


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in chunks (hashlib releases the GIL: threads hash in parallel)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path], threads: int = 4) -> dict[Path, str]:
    """sha256 of several files, hashed on ``threads`` threads."""
    if len(paths) <= 1:
        return {p: sha256_file(p) for p in paths}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(paths, pool.map(sha256_file, paths)))


@contextmanager
def replace_folder(folder: Path) -> Iterator[Path]:
    """Write a folder's new contents into a temporary sibling, then swap it in: whoever reads ``folder``
    (or kills the writer) finds the old contents or the new ones, never a mix."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield building
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        building.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(building, ignore_errors=True)
