"""One rank-aware logger, and metrics to the console, ``metrics.jsonl`` and TensorBoard (rank 0)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch


def is_main_process() -> bool:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def get_logger(name: str = "widenet_ds") -> logging.Logger:
    """A logger under the package's own, which speaks on rank 0 only (warnings and errors from every
    rank); configuring the package logger once makes every ``widenet_ds.*`` module's log visible."""
    root = logging.getLogger("widenet_ds")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    return logging.getLogger(name)


def _plain(value: Any) -> Any:
    """JSON-friendly: tensors to numbers or lists, non-finite floats to strings."""
    if torch.is_tensor(value):
        value = value.detach().cpu()
        value = value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, enabled: bool | None = None):
        self.enabled = is_main_process() if enabled is None else enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
