"""Headless plots (matplotlib Agg): training curves, confusion matrices and example grids. Each picture is built
once as a matplotlib figure, then written atomically as PNG and/or logged to TensorBoard (utils.tensorboard)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from utils.io import atomic_path  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def close_figures(*figures) -> None:
    for fig in figures:
        plt.close(fig)


def plot_results(rows: list[dict], path: str | Path) -> Path:
    """Ultralytics-style results.png: loss, acc@1, acc@5 and LR per epoch, train and val."""
    epochs = [r["epoch"] for r in rows]

    def series(key):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, title, keys in (
        (axes[0], "loss", ("train_loss", "val_loss")),
        (axes[1], "acc@1", ("train_acc1", "val_acc1")),
        (axes[2], "acc@5", ("val_acc5",)),
        (axes[3], "learning rate", ("lr",)),
    ):
        for key in keys:
            x, y = series(key)
            if x:
                ax.plot(x, y, marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.2, max(epochs) + 0.2)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def confusion_matrix_figure(cm: np.ndarray, classes: list[str], title: str = ""):
    """Counts on the left, row-normalised (recall per true class) on the right; class names on both axes.
    One figure for the PNG and for TensorBoard."""
    cm = np.asarray(cm)
    norm = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
    n = len(classes)
    size = max(5.0, 0.45 * n + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, data, fmt, name in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "normalised by true class")):
        ax.imshow(data, cmap="Blues")
        ax.set_title(f"{title} {name}".strip())
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 30:
            peak = data.max() if data.size else 1
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=6,
                            color="white" if data[i, j] > peak / 2 else "black")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> Path:
    return save_figure(confusion_matrix_figure(cm, classes, title), path)


def examples_figure(images: list[np.ndarray], titles: list[str], cols: int = 8):
    """A grid of HWC (or HW) uint8 images with a title each, pixels drawn as they are (no smoothing)."""
    cols = max(1, min(cols, len(images)))
    rows = max(1, (len(images) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 2.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img.squeeze(), cmap="gray" if img.ndim == 2 or img.shape[-1] == 1 else None, vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def plot_examples(images: list[np.ndarray], titles: list[str], path: str | Path, cols: int = 8) -> Path:
    """The examples grid as a PNG (misclassified examples)."""
    return save_figure(examples_figure(images, titles, cols), path)
