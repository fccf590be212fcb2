"""The report's figures as PNG files (matplotlib, headless). Each function returns the file it wrote,
or None when no run has what it plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .layernorm import LayerNormStats  # noqa: E402
from .runs import STRUCTURE_KEYS, Run  # noqa: E402

DPI = 110
# At most this many moments of training in the expert-load figure
LOAD_SNAPSHOTS = 4


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _lines(ax, runs: list[Run], key: str, rows: str = "train", x: str = "step") -> int:
    """One line per run; returns how many runs had the key."""
    drawn = 0
    for run in runs:
        xs, ys = run.series(key, rows, x)
        if xs:
            ax.plot(xs, ys, label=run.name, marker="o" if len(xs) < 12 else None, markersize=3)
            drawn += 1
    return drawn


def loss_curves(runs: list[Run], path: Path, x: str = "step") -> Path | None:
    """Training loss (and MLM / SOP / task losses where recorded) of every run against steps or tokens."""
    keys = [k for k in ("loss", "mlm_loss", "sop_loss", "task_loss") if any(r.series(k, x=x)[0] for r in runs)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        _lines(ax, runs, key, x=x)
        ax.set(title=f"train {key}", xlabel="tokens seen" if x == "tokens" else "step", ylabel=key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def eval_curves(runs: list[Run], path: Path) -> Path | None:
    """Every evaluation score (losses, accuracies, GLUE metrics) against steps, one panel per score."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.keys("eval") if k not in keys and k not in STRUCTURE_KEYS]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _lines(ax, runs, key, rows="eval")
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def learning_rate(runs: list[Run], path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if not _lines(ax, runs, "lr"):
        plt.close(fig)
        return None
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def throughput(runs: list[Run], path: Path) -> Path | None:
    """Tokens per second and model TFLOP/s per GPU over training."""
    keys = [k for k in ("tokens_per_s", "model_tflop_per_s_per_gpu") if any(r.series(k)[0] for r in runs)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        _lines(ax, runs, key)
        ax.set(title=key.replace("_", " "), xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def expert_load(run: Run, path: Path) -> Path | None:
    """Share of the routes each expert received, per block (rows) and expert (columns), at up to
    ``LOAD_SNAPSHOTS`` moments of training (first, last and evenly between). 1/E everywhere is balanced."""
    steps, loads = run.list_series("expert_load")
    if not steps:
        return None
    picks = sorted(set(np.linspace(0, len(steps) - 1, min(LOAD_SNAPSHOTS, len(steps))).round().astype(int)))
    arrays = [np.asarray(loads[i], dtype=float) for i in picks]
    top = max(float(a.max()) for a in arrays)
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks) + 1, 0.25 * arrays[0].shape[0] + 2.6),
                             squeeze=False, layout="constrained")
    for ax, i, load in zip(axes[0], picks, arrays):
        image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        ax.set(title=f"step {int(steps[i])}", xlabel="expert", ylabel="block")
        ax.set_xticks(range(load.shape[1]))
        ax.set_yticks(range(load.shape[0]))
    fig.colorbar(image, ax=axes[0].tolist(), label=f"share of routes (balanced: {1 / arrays[0].shape[1]:.3f})")
    fig.suptitle(f"{run.name}: expert load per block")
    fig.savefig(path, dpi=DPI)  # constrained layout places the shared colour bar (tight_layout does not)
    plt.close(fig)
    return path


def dropped_fraction(run: Run, path: Path) -> Path | None:
    """Share of routes dropped by the capacity limit, per block (rows) over training (columns)."""
    steps, values = run.list_series("dropped_fraction")
    if not steps:
        return None
    grid = np.asarray(values, dtype=float).T  # (blocks, records)
    fig, ax = plt.subplots(figsize=(7, 0.25 * grid.shape[0] + 2.2))
    image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0,
                      extent=(steps[0], steps[-1], grid.shape[0] - 0.5, -0.5))
    ax.set(title=f"{run.name}: dropped fraction per block", xlabel="step", ylabel="block")
    fig.colorbar(image, ax=ax, label="dropped share of routes")
    return _save(fig, path)


def block_cosine(runs: list[Run], path: Path) -> Path | None:
    """The newest evaluation's cosine similarity of consecutive blocks' outputs, one line per run."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    drawn = 0
    for run in runs:
        steps, values = run.list_series("block_cosine", "eval")
        if steps:
            ax.plot(range(1, len(values[-1]) + 1), values[-1], marker="o", label=f"{run.name} (step {int(steps[-1])})")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="cosine similarity of consecutive blocks' outputs", xlabel="block pair (j, j+1), j =",
           ylabel="mean cosine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def layer_norm_over_training(runs: list[Run], path: Path) -> Path | None:
    """Mean LayerNorm divergence (gamma, beta) at every evaluation."""
    keys = ("ln_gamma_divergence", "ln_beta_divergence")
    if not any(r.series(k, "eval")[0] for r in runs for k in keys):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, keys):
        _lines(ax, runs, key, rows="eval")
        ax.set(title=f"mean {key.split('_')[1]} divergence", xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def layer_norm_distribution(stats: dict[str, LayerNormStats], path: Path) -> Path | None:
    """The distribution of the LayerNorm divergence per model, for gamma and for beta (violins; a model
    sharing one LayerNorm pair sits at 0)."""
    if not stats:
        return None
    labels = list(stats)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(labels) + 2), 4.2))
    for ax, kind in zip(axes, ("gamma", "beta")):
        data = [stats[label].values(kind).numpy() for label in labels]
        positions = list(range(1, len(labels) + 1))
        varied = [i for i, d in enumerate(data) if d.size and np.ptp(d) > 0]
        if varied:
            ax.violinplot([data[i] for i in varied], positions=[positions[i] for i in varied], showmedians=True)
        for i, d in enumerate(data):
            if d.size and i not in varied:  # a constant (a shared LayerNorm: all 0) has no violin
                ax.scatter([positions[i]], [float(d[0])], marker="_", s=400, color="black")
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set(title=f"LayerNorm {kind} divergence", ylabel="mean |distance| to other blocks' elements")
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
