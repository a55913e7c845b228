"""Plots of evaluation results: the V-NIAH heat map (x frames, y depth, colour accuracy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_niah_heatmap(grid, path: str | Path, title: str = "V-NIAH", teacher_forced: bool = False) -> Path:
    """Write a PNG heat map of a NiahGrid (or its dict): one cell per (depth, frame count), the
    accuracy printed in each cell and the mean in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = grid if isinstance(grid, dict) else grid.to_dict()
    key = "accuracy_teacher_forced" if teacher_forced else "accuracy"
    acc = np.asarray(data[key], dtype=float)
    frames, depths = data["frame_counts"], data["depths"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(frames), 1.0 + 0.6 * len(depths)))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(frames)), [str(f) for f in frames])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("frames in the haystack")
    ax.set_ylabel("needle depth")
    for row in range(acc.shape[0]):
        for col in range(acc.shape[1]):
            ax.text(col, row, f"{acc[row, col]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title}: mean accuracy {acc.mean():.3f}")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
