"""Pictures of the expert load for the run logger: a W&B histogram per MoE layer (bin ``i`` = expert
``i``) and a heatmap of the load ratio over recent steps."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MAX_HISTOGRAM_BINS = 512  # wandb.Histogram's limit


def expert_load_histogram(counts_E: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, bin_edges)`` with bin ``i`` = expert ``i`` (experts grouped when E > 512), for ``wandb.Histogram``."""
    counts = np.asarray(counts_E, dtype=np.float64).reshape(-1)
    num_experts = counts.size
    if num_experts <= MAX_HISTOGRAM_BINS:
        return counts, np.arange(num_experts + 1, dtype=np.float64)
    per_bin = math.ceil(num_experts / MAX_HISTOGRAM_BINS)
    padded = np.zeros(math.ceil(num_experts / per_bin) * per_bin)
    padded[:num_experts] = counts
    edges = np.minimum(np.arange(0, padded.size + 1, per_bin), num_experts).astype(np.float64)
    return padded.reshape(-1, per_bin).sum(1), edges


def render_load_heatmap(steps: list[int], load_SE: np.ndarray, title: str) -> Any:
    """A matplotlib figure of the load ratio (tokens / mean tokens) per step and expert; 1.0 = balanced.

    Built without pyplot (no global backend or figure registry is touched); ``fig.savefig`` renders
    with Agg.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    mean = load_SE.mean(axis=1, keepdims=True)
    ratio = np.divide(load_SE, mean, out=np.zeros_like(load_SE, dtype=np.float64), where=mean > 0)
    vmax = max(2.0, float(ratio.max()) if ratio.size else 2.0)
    num_steps, num_experts = ratio.shape
    fig = Figure(figsize=(min(12.0, 3.0 + 0.15 * num_experts), 4.0), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(
        ratio,
        aspect="auto",
        interpolation="nearest",
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax),
        extent=(-0.5, num_experts - 0.5, num_steps - 0.5, -0.5),
    )
    ticks = np.linspace(0, num_steps - 1, num=min(num_steps, 6)).round().astype(int)
    ax.set_yticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("expert")
    ax.set_ylabel("step")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="tokens / mean tokens")
    fig.tight_layout()
    return fig
