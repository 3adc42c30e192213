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


FULL_MATRIX_CLASSES = 30  # up to this many classes the confusion matrix is drawn whole, every cell numbered
LABEL_CHARS = 24  # class names are shortened to this in figures (the JSON reports and tables keep them whole)
GRID_LABEL_CHARS = 20  # ... and to this under the images of a grid (a 1.8-inch cell holds about 30 characters)


def short_label(name: str, limit: int = LABEL_CHARS) -> str:
    """`name` cut to `limit` characters by an ellipsis in the middle (the start and the end, where names that share
    a prefix differ, stay): long class names (species, product titles) would otherwise widen every figure they
    label, and with 1,000 of them no figure stays a readable size."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "\u2026" + name[len(name) - (limit - 1 - head):]


def most_confused(cm: np.ndarray, k: int) -> np.ndarray:
    """The indices (ascending) of the `k` classes involved in the most off-diagonal mistakes, as the true or the
    predicted class; ties keep class order. Linear extra memory on top of the matrix itself."""
    mistakes = cm.sum(1) + cm.sum(0) - 2 * np.diagonal(cm)
    return np.sort(np.argsort(-mistakes, kind="stable")[:k])


def confusion_matrix_figure(cm: np.ndarray, classes: list[str], title: str = ""):
    """Counts on the left, row-normalised (recall per true class) on the right; class names on both axes.
    One figure for the PNG and for TensorBoard.

    Above FULL_MATRIX_CLASSES classes the figure shows the matrix restricted to the FULL_MATRIX_CLASSES classes in
    the most mistakes (titled so; rows still normalised by all images of the class): the figure's size, and with it
    its memory, would otherwise grow with classes^2 (210 classes drew 21,000 x 10,600 pixels and ran out of memory)."""
    cm = np.asarray(cm)
    n = len(classes)
    shown = np.arange(n) if n <= FULL_MATRIX_CLASSES else most_confused(cm, FULL_MATRIX_CLASSES)
    counts = cm[np.ix_(shown, shown)]
    norm = counts / np.clip(cm.sum(1)[shown, None], 1, None)
    names = [short_label(classes[i]) for i in shown]
    k = len(shown)
    size = max(5.0, 0.45 * k + 2)
    subset = "" if k == n else f"\nthe {k} of {n} classes in the most mistakes (as true or predicted class)"
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, data, fmt, name in ((axes[0], counts, "d", "counts"), (axes[1], norm, ".2f", "normalised by true class")):
        ax.imshow(data, cmap="Blues")
        ax.set_title(f"{title} {name}".strip() + subset)
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        peak = data.max() if data.size else 1
        for i, j in (np.argwhere(counts) if k < n else np.ndindex(k, k)):  # a part of many classes: zeros left blank
            ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=6,
                    color="white" if data[i, j] > peak / 2 else "black")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> Path:
    return save_figure(confusion_matrix_figure(cm, classes, title), path)


def examples_figure(images: list[np.ndarray], titles: list[str], cols: int = 8):
    """A grid of HWC (or HW) uint8 images, each under its title, pixels drawn as they are (no smoothing), in
    cells of 1.8 x 2.0 inches. One mosaic in one axes: a few hundred milliseconds where 32 subplots take seconds."""
    cols = max(1, min(cols, len(images)))
    rows = max(1, (len(images) + cols - 1) // cols)
    height = max(img.shape[0] for img in images) if images else 1
    width = max(img.shape[1] for img in images) if images else 1
    pad = max(1, width // 28)
    cell_w = width + 2 * pad
    cell_h = round(cell_w * 2.0 / 1.8)  # image + title band, in image pixels
    mosaic = np.full((rows * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        img = img if img.ndim == 3 else img[..., None]
        rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
        top = (k // cols) * cell_h + cell_h - pad - height + (height - img.shape[0]) // 2
        left = (k % cols) * cell_w + pad + (width - img.shape[1]) // 2
        mosaic[top:top + img.shape[0], left:left + img.shape[1]] = rgb
    fig = plt.figure(figsize=(cols * 1.8, rows * 2.0))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.axis("off")
    for k, title in enumerate(titles[:len(images)]):
        ax.text((k % cols + 0.5) * cell_w - 0.5, (k // cols) * cell_h + (cell_h - height - pad) / 2 - 0.5, title,
                ha="center", va="center", fontsize=7)
    return fig


def plot_examples(images: list[np.ndarray], titles: list[str], path: str | Path, cols: int = 8) -> Path:
    """The examples grid as a PNG (misclassified examples)."""
    return save_figure(examples_figure(images, titles, cols), path)
