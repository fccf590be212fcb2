"""Many GLUE fine-tuning runs (models x tasks x seeds) and the paper-style table of their dev results.

``run``: one fine-tuning run per (model, task, seed) into ``<output_dir>/<model>/<task>/seed<k>``
(each with the task's ``ds_configs/finetune_<task>.json`` unless ``--deepspeed_config`` is
passed on), then the table. ``collect``: only the table, from the ``eval_results.json`` files
found under the folders given. ``launch/glue_table.py`` calls ``main``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path
from typing import Any

from . import finetune
from .distributed import close_distributed
from .glue import get_task, results_table
from .metrics_log import is_main_process


def collect_results(folders: list[str | Path]) -> list[dict[str, Any]]:
    """``{model, task, seed, metrics}`` records from every ``eval_results.json`` under ``folders``."""
    records = []
    for folder in folders:
        files = sorted(Path(folder).rglob("eval_results.json"))
        if not files:
            raise FileNotFoundError(f"no eval_results.json under {folder}")
        for file in files:
            result = json.loads(file.read_text())
            keys = get_task(result["task"]).metric_keys
            records.append({"model": result["model"], "task": result["task"], "seed": result["seed"],
                            "metrics": {k: result[k] for k in keys if k in result}})
    return records


def run_grid(models: list[str], tasks: list[str], seeds: list[int], output_dir: str | Path,
             finetune_args: list[str]) -> list[Path]:
    """Fine-tune every model (``LABEL=PATH`` or ``PATH``) on every task with every seed; returns the run folders."""
    folders = []
    try:  # one process group for all runs
        for model, task, seed in itertools.product(models, tasks, seeds):
            label, _, path = model.partition("=") if "=" in model else (model, "", model)
            folder = Path(output_dir) / re.sub(r"[^\w.-]+", "_", label) / get_task(task).name / f"seed{seed}"
            finetune.finetune(finetune.build_parser().parse_args([
                "--task", task, "--model_name_or_path", path, "--model_label", label, "--seed", str(seed),
                "--output_dir", str(folder), *finetune_args]))
            folders.append(folder)
    finally:
        close_distributed()
    return folders


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GLUE dev results of several models as a paper-style table. "
                                "Arguments not listed here go to every fine-tuning run (see finetune_glue.py).")
    p.add_argument("mode", choices=("run", "collect"), help="run the fine-tuning grid, or only collect results")
    p.add_argument("folders", nargs="*", help="collect: folders searched for eval_results.json")
    p.add_argument("--models", nargs="+", default=[], help="run: LABEL=PATH (or PATH), PATH as --model_name_or_path")
    p.add_argument("--tasks", nargs="+", help="run: tasks; both modes: the table's columns (default: all present)")
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--output_dir", default="runs/glue")
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
