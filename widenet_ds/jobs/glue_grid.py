"""Many GLUE fine-tuning runs (models x tasks x seeds) and the paper-style table of their dev results.

``run``: one fine-tuning run per (model, task, seed) into ``<output_dir>/<model>/<task>/seed<k>``
(each with the task's ``ds_configs/finetune_<task>.json`` unless ``--deepspeed_config`` is
passed on), then the table. ``collect``: only the table, from the ``eval_results.json`` files
found under the folders given; each file is checked (valid JSON, the keys the table needs) and
two runs of one cell (model, task, seed) are refused, naming both files, so the table never
mixes runs silently. ``launch/glue_table.py`` calls ``main``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

from ..distributed import close_distributed, is_main_process
from ..glue import (
    GlueDataError,
    TaskSpec,
    describe_task_columns,
    get_task,
    results_table,
)
from . import finetune
from .args import HelpFormatter
from .run_dir import is_finished

log = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"


def collect_results(folders: list[str | Path]) -> list[dict[str, Any]]:
    """``{model, task, seed, metrics}`` records from every ``eval_results.json`` under ``folders``.

    Raises GlueDataError naming the file(s) for a file the table cannot use, and for two files
    of the same cell (model label, task, seed): the table would keep one or mix them.
    """
    records, cells = [], {}
    for file in result_files(folders):
        record = read_result(file)
        cell = (record["model"], record["task"], record["seed"])
        if cell in cells:
            raise GlueDataError(f"two results for model {cell[0]!r}, task {cell[1]}, seed {cell[2]}: {cells[cell]} "
                                f"and {file}; keep one run per cell (move the other out of the folders collected, "
                                "or give the runs different --model_label)")
        cells[cell] = file
        records.append(record)
    return records


def result_files(folders: list[str | Path]) -> list[Path]:
    """Every ``eval_results.json`` under ``folders``, each once (folders may nest)."""
    files: dict[Path, Path] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise GlueDataError(f"collect: {folder} is not a folder; give the --output_dir of the runs")
        found = sorted(folder.rglob(RESULTS_FILE))
        if not found:
            raise GlueDataError(f"collect: no {RESULTS_FILE} under {folder}; a fine-tuning run writes it in its "
                                "--output_dir after its first evaluation")
        for file in found:
            files.setdefault(file.resolve(), file)
    return list(files.values())


def read_result(file: Path) -> dict[str, Any]:
    """One run's ``eval_results.json`` as a table record; GlueDataError naming the file when the
    table cannot use it (not JSON, no model / task / seed, a headline metric absent or not a number)."""
    try:
        result = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise GlueDataError(f"{file}, line {err.lineno}: not valid JSON ({err.msg}); rerun that fine-tuning run "
                            "or move the file away") from None
    except UnicodeDecodeError:
        raise GlueDataError(f"{file}: not UTF-8 text; rerun that fine-tuning run or move the file away") from None
    if not isinstance(result, dict):
        raise GlueDataError(f"{file}: expected a JSON object, got {type(result).__name__}; {RESULTS_FILE} "
                            "files are written by the fine-tuning job")
    task = _result_task(file, result)
    return {"model": result["model"], "task": task.name, "seed": result["seed"],
            "metrics": {k: result[k] for k in task.metric_keys if k in result}}


def _result_task(file: Path, result: dict[str, Any]) -> TaskSpec:
    """The task of a parsed result, after checking every key the table reads from it."""
    _require(file, result, ("model", "task", "seed"))
    if not isinstance(result["model"], str) or not result["model"]:
        raise GlueDataError(f"{file}: model must be the run's label (a non-empty string), got {result['model']!r}")
    if not isinstance(result["seed"], int) or isinstance(result["seed"], bool):
        raise GlueDataError(f"{file}: seed must be an integer, got {result['seed']!r}")
    try:
        task = get_task(result["task"])
    except GlueDataError as err:
        raise GlueDataError(f"{file}: {err}") from None
    _require(file, result, task.headline_metrics)
    bad = [f"{key}={result[key]!r}" for key in task.headline_metrics if not _is_number(result[key])]
    if bad:
        raise GlueDataError(f"{file}: {task.name} metrics must be numbers, got {', '.join(bad)}; rerun that "
                            "fine-tuning run or move the file away")
    return task


def _require(file: Path, result: dict[str, Any], keys: tuple[str, ...]) -> None:
    """GlueDataError naming the file and the absent keys, when some of ``keys`` are not in ``result``."""
    absent = [key for key in keys if key not in result]
    if absent:
        raise GlueDataError(f"{file}: no {', '.join(map(repr, absent))} (keys: {', '.join(result) or 'none'}); the "
                            "table needs model, task, seed and the task's headline metrics, as the fine-tuning job "
                            "writes them")


def _is_number(value: object) -> bool:
    """A JSON number; NaN included: the job writes it when a run's metric was undefined at every evaluation,
    and the table ranks it as the worst seed."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_grid(models: list[str], tasks: list[str], seeds: list[int], output_dir: str | Path,
             finetune_args: list[str]) -> list[Path]:
    """Fine-tune every model (``LABEL=PATH`` or ``PATH``) on every task with every seed; returns the run folders.

    A cell whose run finished before (its run.json says so) is kept and not run again, so an interrupted
    grid continues where it stopped; a cell with an unfinished run is refused by the fine-tuning job
    unless ``--overwrite_output_dir`` is passed on."""
    folders = []
    try:  # one process group for all runs
        for model, task, seed in itertools.product(models, tasks, seeds):
            label, _, path = model.partition("=") if "=" in model else (model, "", model)
            folder = Path(output_dir) / re.sub(r"[^\w.-]+", "_", label) / get_task(task).name / f"seed{seed}"
            folders.append(folder)
            if is_finished(folder):
                log.info("%s: finished before, kept", folder)
                continue
            finetune.finetune(finetune.build_parser().parse_args([
                "--task", task, "--model_name_or_path", path, "--model_label", label, "--seed", str(seed),
                "--output_dir", str(folder), *finetune_args]))
    finally:
        close_distributed()
    return folders


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GLUE dev results of several models as a paper-style table. "
                                "Arguments not listed here go to every fine-tuning run (see finetune_glue.py).",
                                formatter_class=HelpFormatter, epilog=describe_task_columns())
    p.add_argument("mode", choices=("run", "collect"), help="run the fine-tuning grid, or only collect results")
    p.add_argument("folders", nargs="*", help="collect: folders searched for eval_results.json (default: --output_dir)")
    p.add_argument("--models", nargs="+", default=[], help="run: LABEL=PATH (or PATH), PATH as --model_name_or_path")
    p.add_argument("--tasks", nargs="+", help="run: tasks; both modes: the table's columns (default: all present)")
    p.add_argument("--seeds", nargs="+", type=int, default=[42], help="run: one fine-tuning run per seed")
    p.add_argument("--output_dir", default="runs/glue",
                   help="run: <output_dir>/<model>/<task>/seed<k> per run; collect: searched when no folders are given")
    p.add_argument("--aggregate", choices=("median", "mean"), default="median", help="how seeds are combined")
    return p


def main(argv: list[str] | None = None) -> str:
    """Run or collect, print the table (rank 0) and return it."""
    args, finetune_args = build_parser().parse_known_args(argv)
    if args.mode == "run":
        if not args.models or not args.tasks:
            raise SystemExit("run needs --models and --tasks")
        folders = run_grid(args.models, args.tasks, args.seeds, args.output_dir, finetune_args)
    else:
        if finetune_args:
            raise SystemExit(f"collect takes no fine-tuning arguments, got {' '.join(finetune_args)}")
        folders = args.folders or [args.output_dir]
    table = results_table(collect_results(folders), aggregate=args.aggregate, tasks=args.tasks)
    if is_main_process():
        print(table, end="")
    return table
