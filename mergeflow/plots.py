"""Pictures for run reports (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi, parent folders made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_bars(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str], path: Path,
                       title: str = "accuracy per task") -> Path:
    """Grouped bars: one group per task plus the average, one bar per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*tasks, "avg"]
    models = list(rows)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(models)) * 0.35), 4))
    for m, model in enumerate(models):
        values = [100 * rows[model][t] for t in tasks]
        values.append(sum(values) / len(values))
        ax.bar([g + (m - (len(models) - 1) / 2) * width for g in range(len(groups))], values, width, label=model)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
