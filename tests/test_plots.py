"""The PNGs people look at: results.png after training, eval's confusion matrix and misclassified-examples grid.
Each must be a valid, non-blank PNG of a sensible shape, and every plot replaces its file atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.checkpoint import save_checkpoint
from utils.plots import plot_confusion_matrix, plot_examples, plot_results


def check_png(path: Path, min_size: tuple[int, int], aspect: tuple[float, float]) -> tuple[int, int]:
    """PIL verifies the file; the picture has at least min_size pixels, width/height within `aspect`, and content."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert w >= min_size[0] and h >= min_size[1], (path.name, w, h)
    assert aspect[0] <= w / h <= aspect[1], (path.name, w, h)
    assert colours is None or len(colours) > 50, f"{path.name} looks blank: {len(colours)} colours"
    return w, h


def test_training_writes_results_png(trained_run):
    check_png(trained_run / "results.png", min_size=(1000, 250), aspect=(2.5, 8.0))  # four panels side by side


@pytest.fixture()
def biased_ckpt(trained_ckpt, tmp_path) -> Path:
    """The trained checkpoint with its last bias pushed to class 0: most test images become misclassified."""
    ckpt = torch.load(trained_ckpt, weights_only=True)
    biases = [k for k, v in ckpt["model"].items() if k.endswith(".bias") and tuple(v.shape) == (ckpt["num_classes"],)]
    ckpt["model"][biases[-1]][0] += 1000.0
    save_checkpoint(ckpt, tmp_path / "biased.pth")
    return tmp_path / "biased.pth"


def test_eval_writes_confusion_matrix_and_misclassified_grid(biased_ckpt, fashion_root, tmp_path):
    import eval as eval_script

    out = tmp_path / "report" / "custom.json"
    code = eval_script.main(["--weights", str(biased_ckpt), "--data_root", str(fashion_root), "--output", str(out),
                             "--save_examples", "--speed_repeats", "0", "--num_workers", "0", "--device", "cpu", "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    cm = np.array(report["confusion_matrix"])
    assert cm.sum() == report["num_images"] and cm[:, 0].sum() == report["num_images"]  # everything predicted class 0
    # Counts and normalised panels side by side: about twice as wide as tall.
    check_png(out.with_name("custom_confusion_matrix.png"), min_size=(800, 400), aspect=(1.5, 3.0))
    # 32 wrong predictions (the grid's limit) in 4 rows of 8.
    check_png(out.with_name("custom_misclassified_examples.png"), min_size=(800, 400), aspect=(1.2, 2.6))


def plot_calls(tmp_path: Path):
    rows = [{"epoch": e, "lr": 1e-3 / e, "train_loss": 2 / e, "train_acc1": 0.3 * e, "val_loss": 1.8 / e,
             "val_acc1": 0.35 * e, "val_acc5": 0.9} for e in (1, 2)]
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(28, 28), dtype=np.uint8) for _ in range(5)]
    return [
        ("results.png", lambda scale: plot_results([{**r, "train_loss": r["train_loss"] * scale} for r in rows], tmp_path / "results.png")),
        ("confusion_matrix.png", lambda scale: plot_confusion_matrix(cm * scale, ["a", "b", "c"], tmp_path / "confusion_matrix.png")),
        ("examples.png", lambda scale: plot_examples([i // scale for i in images], ["x"] * 5, tmp_path / "examples.png")),
    ]


def test_plots_replace_their_file_atomically(tmp_path):
    """A second plot is written elsewhere and renamed over the first: a reader holding the old file keeps a
    complete old PNG (a new inode, never rewritten in place), and no temporary file is left behind."""
    for name, plot in plot_calls(tmp_path):
        path = tmp_path / name
        assert plot(1) == path
        old_bytes, old_inode = path.read_bytes(), path.stat().st_ino
        reader = tmp_path / f"reader-{name}"
        os.link(path, reader)  # like an open file handle: points at the old inode
        plot(3)
        assert path.stat().st_ino != old_inode, f"{name} was rewritten in place"
        assert reader.read_bytes() == old_bytes and path.read_bytes() != old_bytes
        with Image.open(path) as im:
            im.verify()
        reader.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, _ in plot_calls(tmp_path))
