"""One rank-aware logger, and metrics to the console, ``metrics.jsonl`` and TensorBoard (rank 0)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import is_main_process
from .console import write_line


class _TqdmAwareHandler(logging.StreamHandler):
    """Writes log lines through ``console.write_line`` so that they start on a line of their own, not
    glued to the end of a progress bar's line (on a terminal and in a log file alike)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class WarningRecorder(logging.Handler):
    """Keeps every warning the package logs, so that the run's ``metrics.jsonl`` records them
    (``MetricsWriter`` writes those from before it existed, then each new one)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[dict[str, Any]] = []
        self.writer: MetricsWriter | None = None

    def emit(self, record: logging.LogRecord) -> None:
        entry = {"event": "warning", "logger": record.name, "message": record.getMessage()}
        if self.writer is not None:
            self.writer.write_event(entry)
        else:
            self.records.append(entry)


_recorder = WarningRecorder()


def start_run_log() -> logging.Logger:
    """``get_logger()`` at the start of a job: the warnings kept for its metrics.jsonl start empty."""
    _recorder.records.clear()
    _recorder.writer = None
    return get_logger()


def get_logger(name: str = "widenet_ds") -> logging.Logger:
    """A logger under the package's own, which speaks on rank 0 only (warnings and errors from every
    rank); configuring the package logger once makes every ``widenet_ds.*`` module's log visible.
    Warnings are also kept for the run's ``metrics.jsonl`` (``WarningRecorder``)."""
    root = logging.getLogger("widenet_ds")
    if not any(isinstance(h, _TqdmAwareHandler) for h in root.handlers):
        handler = _TqdmAwareHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    if _recorder not in root.handlers:
        root.addHandler(_recorder)
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


def _last_time(path: Path) -> float:
    """The newest record's ``time`` in an existing ``metrics.jsonl`` (a resumed run goes on from it), else 0."""
    if not path.is_file():
        return 0.0
    last = 0.0
    for line in path.read_text(errors="replace").splitlines():
        try:
            value = json.loads(line).get("time")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            last = max(last, float(value))
    return last


def per_block_scalars(key: str, value: Any) -> list[tuple[str, float]]:
    """TensorBoard scalars of a per-block list: ``key/block_<j>`` for a list of numbers (dropped fraction,
    per-block statistics; ``block_cosine`` pairs as ``blocks_<j>_<j+1>``), ``key/block_<j>/expert_<k>`` for
    a list of lists (the expert load), plus ``expert_imbalance/block_<j>`` (largest share x E; 1 is balanced)."""
    if not isinstance(value, list) or not value:
        return []
    if all(isinstance(v, list) for v in value):
        scalars = [(f"{key}/block_{j:02d}/expert_{k:02d}", float(v)) for j, row in enumerate(value)
                   for k, v in enumerate(row) if isinstance(v, (int, float))]
        if key == "expert_load":
            scalars += [(f"expert_imbalance/block_{j:02d}", max(row) * len(row)) for j, row in enumerate(value) if row]
        return scalars
    name = (lambda j: f"blocks_{j:02d}_{j + 1:02d}") if key == "block_cosine" else (lambda j: f"block_{j:02d}")
    return [(f"{key}/{name(j)}", float(v)) for j, v in enumerate(value)
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard
    (per-block lists as one scalar per block, ``per_block_scalars``). Every record gets ``time``: seconds
    since the job started writing, continued from the file's newest ``time`` when a run resumes."""

    def __init__(self, output_dir: str | Path, enabled: bool | None = None):
        self.enabled = is_main_process() if enabled is None else enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard = None
        self.start = time.perf_counter() - (_last_time(self.path) if self.enabled else 0.0)
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            for entry in _recorder.records:  # the warnings of the run's setup
                self.write_event(entry)
            _recorder.records.clear()
            _recorder.writer = self

    def write_event(self, entry: dict[str, Any]) -> None:
        """One record that is not a step's metrics (``{"event": ...}``: a warning, a resume, a stop)."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({k: _plain(v) for k, v in entry.items()}) + "\n")

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {**{k: _plain(v) for k, v in record.items()}, "time": round(time.perf_counter() - self.start, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)
            for tag, scalar in per_block_scalars(key, value):
                self.tensorboard.add_scalar(f"{prefix}/{tag}", scalar, step)

    def close(self) -> None:
        if _recorder.writer is self:
            _recorder.writer = None
        if self.tensorboard is not None:
            self.tensorboard.close()
