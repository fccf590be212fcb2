"""A run folder's records (``metrics.jsonl``, ``run.json``, ``model_config.json``, ``eval_results.json``)
as series and one summary row, for pretraining and fine-tuning runs alike.

``metrics.jsonl`` holds three kinds of line: training records (they carry ``lr``), evaluation records
(a ``step`` and the evaluation's values) and events (``{"event": ...}``: start, resume, warnings)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ReportError

METRICS = "metrics.jsonl"
# Evaluation values that are not a score (the report plots them apart from the scores).
STRUCTURE_KEYS = ("ln_gamma_divergence", "ln_beta_divergence", "ln_gamma_divergence_per_block",
                  "ln_beta_divergence_per_block", "block_cosine", "block_cosine_mean")


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, a list, 'nan' written as text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class Run:
    """One run folder's records."""

    path: Path
    name: str
    job: str  # "pretrain", "finetune_glue", ... (run.json), "" when unknown
    record: dict[str, Any] = field(default_factory=dict)  # run.json
    config: dict[str, Any] = field(default_factory=dict)  # model_config.json
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] | None = None  # eval_results.json of a fine-tuning run

    @property
    def preset(self) -> str:
        """The preset (with its ``--override`` fields) or the fine-tuned model's label."""
        args = self.record.get("args", {})
        name = str(args.get("preset") or args.get("model_label") or args.get("model_name_or_path") or "")
        overrides = args.get("override") or []
        return f"{name} ({', '.join(overrides)})" if overrides and args.get("preset") else name

    def series(self, key: str, rows: str = "train", x: str = "step") -> tuple[list[float], list[float]]:
        """(x, value) of every record of ``rows`` ("train" or "eval") where both are finite numbers."""
        xs, ys = [], []
        for row in getattr(self, rows):
            a, b = _number(row.get(x)), _number(row.get(key))
            if a is not None and b is not None:
                xs.append(a)
                ys.append(b)
        return xs, ys

    def last(self, key: str, rows: str = "train") -> Any:
        """The newest record's value of ``key`` among ``rows``, or None."""
        for row in reversed(getattr(self, rows)):
            if key in row:
                return row[key]
        return None

    def keys(self, rows: str) -> list[str]:
        """Numeric keys of ``rows`` in first-seen order (``step`` and ``time`` left out)."""
        seen: dict[str, None] = {}
        for row in getattr(self, rows):
            for key, value in row.items():
                if key not in ("step", "time", "tokens") and _number(value) is not None:
                    seen[key] = None
        return list(seen)

    def list_series(self, key: str, rows: str = "train") -> tuple[list[float], list[list[Any]]]:
        """(step, value) of the records whose ``key`` is a list (per-block values)."""
        steps, values = [], []
        for row in getattr(self, rows):
            if isinstance(row.get(key), list) and row[key] and _number(row.get("step")) is not None:
                steps.append(float(row["step"]))
                values.append(row[key])
        return steps, values


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: not readable JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line; a torn last line (a run killed mid-write, or one still writing) is skipped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(path: str | Path, name: str | None = None) -> Run:
    """The run in folder ``path``; raises ReportError when it holds no ``metrics.jsonl``."""
    path = Path(path)
    metrics = path / METRICS
    if not metrics.is_file():
        raise ReportError(f"{path}: no {METRICS} (give the output_dir of a pretraining or fine-tuning run)")
    record = _read_json(path / "run.json")
    run = Run(path=path, name=name or path.name, job=str(record.get("job", "")), record=record,
              config=_read_json(path / "model_config.json"))
    for row in _read_metrics(metrics):
        if "event" in row:
            run.events.append(row)
        elif "lr" in row:
            run.train.append(row)
        elif "step" in row:
            run.eval.append(row)
    if (path / "eval_results.json").is_file():
        run.results = _read_json(path / "eval_results.json")
    return run


def unique_names(paths: list[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell them apart; a run's export folder
    (``final``, ``best``) is named by its run."""
    paths = [p.resolve().parent if p.name in ("final", "best") else p.resolve() for p in paths]
    for depth in range(1, 8):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_runs(paths: list[str | Path]) -> list[Run]:
    paths = [Path(p) for p in paths]
    return [load_run(p, n) for p, n in zip(paths, unique_names(paths))]


def wall_time(run: Run) -> float | None:
    """Seconds of training: the newest training record's ``time``."""
    return _number(run.last("time"))


def tokens_seen(run: Run) -> float | None:
    return _number(run.last("tokens"))


def _median_after_first(values: list[float]) -> float | None:
    """Median of a rate over the records, the first (warm-up, compilation) left out when there are others."""
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else None


def _glue_metrics(run: Run) -> dict[str, float]:
    if not run.results:
        return {}
    skip = {"task", "model", "seed", "best_step"}
    return {f"{run.results.get('task', 'glue')} {k}": v for k, v in run.results.items()
            if k not in skip and _number(v) is not None}


def summarize(run: Run) -> dict[str, Any]:
    """One row of the summary table: what the run did and where it ended."""
    steps = _number(run.last("step"))
    time_s, tokens = wall_time(run), tokens_seen(run)
    row: dict[str, Any] = {"run": run.name, "job": run.job or "?", "model": run.preset,
                           "steps": int(steps) if steps is not None else None, "tokens": tokens, "wall time": time_s}
    rates = run.series("tokens_per_s")[1]
    row["tokens/s"] = tokens / time_s if tokens and time_s else _median_after_first(rates)
    row["model TFLOP/s"] = _median_after_first(run.series("model_tflop_per_s_per_gpu")[1])
    for key in ("loss", "mlm_loss", "sop_loss", "task_loss", "aux_loss"):
        row[f"train {key}"] = _number(run.last(key))
    for key in run.keys("eval"):
        if key not in STRUCTURE_KEYS:
            label = key if key.startswith("eval_") else f"eval {key}"
            row[label] = _number(run.last(key, "eval"))
    row.update(_glue_metrics(run))
    return row
