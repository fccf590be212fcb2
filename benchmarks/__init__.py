"""Benchmark scripts of widenet-ds, run as modules from the repository root:
``python -m benchmarks.bench_train --help`` (see benchmarks/README.md). Shared code is in common.py."""
