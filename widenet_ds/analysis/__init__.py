"""Looking at runs: metrics of finished or running jobs, figures, the report, and two statistics of a
model's blocks (the per-block LayerNorm divergence and the similarity of consecutive blocks' outputs)."""

from .errors import ReportError
from .layernorm import LayerNormStats, block_layer_norms, layer_norm_divergence, layer_norm_stats
from .runs import Run, load_run, load_runs, summarize
from .similarity import block_output_cosine

__all__ = ["LayerNormStats", "ReportError", "Run", "block_layer_norms", "block_output_cosine",
           "layer_norm_divergence", "layer_norm_stats", "load_run", "load_runs", "summarize"]
