"""A report of one or more runs (pretraining or fine-tuning): PNG figures and report.md with a summary table.

    python launch/report.py runs/albert runs/wn-e4 runs/wn-e16 --out runs/report
    python launch/report.py runs/wn-e4 --out runs/report --ln runs/wn-e4/final runs/albert/final
    python launch/report.py --ln runs/wn-e4/checkpoints/step_00001000 runs/bert --out runs/ln   # LayerNorm only

RUN_DIR is a job's output_dir (it holds metrics.jsonl). --ln takes exports, checkpoint step folders or run
folders (their final/ or best/ export, else their newest complete checkpoint); without --ln the runs' own
exports are used. Nothing is loaded in a way that could run code from the files.
"""

import argparse
from pathlib import Path

from widenet_ds.jobs.args import HelpFormatter
from widenet_ds.jobs.cli import main


def report(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="output folders of pretraining or "
                   "fine-tuning runs, compared side by side")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md and figures/")
    p.add_argument("--ln", nargs="+", type=Path, metavar="RUN_OR_EXPORT",
                   help="models whose LayerNorm divergence distribution is plotted (default: the runs' exports)")
    p.add_argument("--no_ln", action="store_true", help="no LayerNorm divergence (the runs' exports are not read)")
    p.add_argument("--title", default="Run report", help="the report's heading")
    args = p.parse_args(argv)
    if not args.runs and not args.ln:
        p.error("give at least one RUN_DIR or --ln model")
    if args.ln and args.no_ln:
        p.error("--ln and --no_ln exclude each other")
    from widenet_ds.analysis.report import report_runs

    path = report_runs(args.runs, args.out, args.ln, args.title, with_layer_norm=not args.no_ln)
    print(f"report written to {path}")
    return path


if __name__ == "__main__":
    main(report)
