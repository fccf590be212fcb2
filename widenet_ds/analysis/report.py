"""``report.md`` with its figures: a summary table of the runs, their curves side by side, per-run
expert load and dropped fraction, the block similarity and the LayerNorm divergence."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from . import figures
from .errors import ReportError
from .layernorm import LayerNormStats, layer_norm_stats
from .runs import Run, load_runs, summarize, unique_names, wall_time
from .weights import RUN_MODEL_FOLDERS, is_export, load_weights

log = logging.getLogger(__name__)

REPORT = "report.md"


def _format(value: Any, column: str) -> str:
    if value is None:
        return "–"
    if column == "wall time":
        return format_duration(value)
    if column == "tokens":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


RUN_COLUMNS = ("run", "job", "model", "steps", "tokens", "wall time", "tokens/s", "model TFLOP/s")


def _column_group(column: str) -> int:
    """Table order: what the run did, its training losses, its evaluation, then GLUE results."""
    if column in RUN_COLUMNS:
        return 0
    return 1 if column.startswith("train ") else 2 if column.startswith("eval") else 3


def summary_table(runs: list[Run]) -> str:
    """A Markdown table, one row per run; a column only where some run has a value."""
    rows = [summarize(run) for run in runs]
    columns: list[str] = []
    for row in rows:
        columns += [c for c, v in row.items() if c not in columns and (v is not None or c in ("run", "steps"))]
    columns.sort(key=_column_group)  # stable: first-seen order within a group
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(c), c) for c in columns) + " |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def default_layer_norm_sources(runs: list[Run]) -> dict[str, Path]:
    """The runs' own exports (``final/`` of a pretraining run, ``best/`` of a fine-tuning run)."""
    found = {}
    for run in runs:
        for name in RUN_MODEL_FOLDERS:
            if is_export(run.path / name):
                found[run.name] = run.path / name
                break
    return found


def layer_norm_sources_stats(sources: dict[str, Path]) -> dict[str, LayerNormStats]:
    """``LayerNormStats`` of every model named in ``sources`` (label -> export, checkpoint or run folder)."""
    stats = {}
    for label, source in sources.items():
        config, state = load_weights(source)
        try:
            stats[label] = layer_norm_stats(state, config.num_hidden_layers)
        except ValueError as err:
            raise ReportError(f"{source}: {err}") from None
    return stats


def _layer_norm_table(stats: dict[str, LayerNormStats]) -> str:
    lines = ["| model | blocks | LayerNorm | gamma mean | gamma median | beta mean | beta median |",
             "|---|---|---|---|---|---|---|"]
    for label, s in stats.items():
        g, b = s.values("gamma"), s.values("beta")
        lines.append(f"| {label} | {s.num_layers} | {'one shared pair' if s.shared else 'one pair per block'} | "
                     f"{g.mean():.4g} | {g.median():.4g} | {b.mean():.4g} | {b.median():.4g} |")
    return "\n".join(lines)


def _figure(lines: list[str], out_dir: Path, path: Path | None, caption: str) -> None:
    if path is not None:
        lines += [f"![{caption}]({path.relative_to(out_dir).as_posix()})", ""]


def write_report(runs: list[Run], out_dir: str | Path, layer_norm: dict[str, Path] | None = None,
                 title: str = "Run report") -> Path:
    """Figures under ``out_dir/figures`` and ``out_dir/report.md``; returns the report's path.
    ``layer_norm``: label -> model (export, checkpoint or run folder) whose LayerNorm divergence is shown."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    stats = layer_norm_sources_stats(layer_norm or {})
    lines = [f"# {title}", ""]
    if runs:
        lines += ["Runs: " + ", ".join(f"`{r.name}` ({r.path})" for r in runs), "", summary_table(runs), ""]
        lines += ["Wall time and tokens are the newest training record's `time` and `tokens`; tokens/s is their "
                  "ratio (the median of the records' `tokens_per_s` when a run lacks them); model TFLOP/s is the "
                  "median per GPU over the records after the first.", ""]
        lines += ["## Training", ""]
        _figure(lines, out_dir, figures.loss_curves(runs, fig_dir / "loss_vs_step.png"), "loss vs step")
        _figure(lines, out_dir, figures.loss_curves(runs, fig_dir / "loss_vs_tokens.png", x="tokens"),
                "loss vs tokens")
        _figure(lines, out_dir, figures.learning_rate(runs, fig_dir / "learning_rate.png"), "learning rate")
        _figure(lines, out_dir, figures.throughput(runs, fig_dir / "throughput.png"), "throughput")
        lines += ["## Evaluation", ""]
        _figure(lines, out_dir, figures.eval_curves(runs, fig_dir / "eval.png"), "evaluation")
        _figure(lines, out_dir, figures.block_cosine(runs, fig_dir / "block_cosine.png"), "block cosine")
        _figure(lines, out_dir, figures.layer_norm_over_training(runs, fig_dir / "layer_norm_over_training.png"),
                "LayerNorm divergence over training")
        routing = []
        for run in runs:
            slug = _slug(run.name)
            _figure(routing, out_dir, figures.expert_load(run, fig_dir / f"expert_load_{slug}.png"),
                    f"{run.name} expert load")
            _figure(routing, out_dir, figures.dropped_fraction(run, fig_dir / f"dropped_{slug}.png"),
                    f"{run.name} dropped fraction")
        if routing:
            lines += ["## Routing", "", "Expert load: each expert's share of the routes of a block (1/E is "
                      "balanced). Dropped fraction: the share of routes over an expert's capacity.", ""] + routing
    if stats:
        lines += ["## LayerNorm divergence", "",
                  "For element i of a block's LayerNorm gamma (beta), the mean absolute distance to every element "
                  "of the other blocks' gamma (beta) vectors, over both LayerNorms of the block. A model whose "
                  "blocks share one LayerNorm pair (ALBERT) has no other block's vector: 0 by construction.", "",
                  _layer_norm_table(stats), ""]
        _figure(lines, out_dir, figures.layer_norm_distribution(stats, fig_dir / "layer_norm_distribution.png"),
                "LayerNorm divergence distribution")
    if not runs and not stats:
        raise ReportError("nothing to report: give run folders and/or --ln models")
    report = out_dir / REPORT
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def report_runs(paths: list[str | Path], out_dir: str | Path, layer_norm: list[str | Path] | None = None,
                title: str = "Run report", with_layer_norm: bool = True) -> Path:
    """``launch/report.py``: the runs in ``paths``, and the LayerNorm divergence of ``layer_norm`` models
    (default: the runs' own exports; none without ``with_layer_norm``)."""
    runs = load_runs(list(paths))
    if layer_norm:
        sources = dict(zip(unique_names([Path(p) for p in layer_norm]), (Path(p) for p in layer_norm)))
    else:
        sources = default_layer_norm_sources(runs) if with_layer_norm else {}
    return write_report(runs, out_dir, sources, title)


def pretraining_summary(output_dir: Path, report: Path | None) -> list[str]:
    """The lines a pretraining job prints at its end: time, tokens, final losses and evaluation, where
    the report, metrics and TensorBoard are."""
    run = load_runs([output_dir])[0]
    row = summarize(run)
    time_s = wall_time(run)
    lines = [f"pretraining finished: {row['steps']} steps, "
             f"{_format(row['tokens'], 'tokens')} tokens in {format_duration(time_s) if time_s else '–'} "
             f"({_format(row['tokens/s'], 'tokens/s')} tokens/s)"]
    train = {k: row[k] for k in ("train loss", "train mlm_loss", "train sop_loss") if row.get(k) is not None}
    if train:
        lines.append("final train: " + ", ".join(f"{k.split(' ', 1)[1]} {v:.4f}" for k, v in train.items()))
    evals = {k: v for k, v in row.items() if k.startswith("eval") and v is not None}
    if evals:
        lines.append("final eval: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in evals.items()))
    if report is not None:
        lines.append(f"report: {report}")
    lines += [f"metrics: {output_dir / 'metrics.jsonl'}",
              f"TensorBoard: tensorboard --logdir {output_dir / 'tensorboard'}"]
    return lines


def finish_pretraining(output_dir: str | Path) -> list[str]:
    """At the end of a pretraining job (rank 0): the report into ``output_dir/report`` (with the LayerNorm
    divergence of ``final/`` when exported) and the summary lines, logged and returned. A report that
    cannot be written is a warning: the run and its records are already complete."""
    output_dir = Path(output_dir)
    report = None
    try:
        runs = load_runs([output_dir])
        report = write_report(runs, output_dir / "report", default_layer_norm_sources(runs),
                              title=f"Pretraining report: {output_dir.name}")
        lines = pretraining_summary(output_dir, report)
    except Exception as err:  # noqa: BLE001 - the training is done; a figure problem must not fail the job
        log.warning("the run report was not written: %s", err)
        return []
    for line in lines:
        log.info("%s", line)
    return lines
