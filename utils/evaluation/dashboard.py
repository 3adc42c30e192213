"""One evaluation in TensorBoard, the same for validation during training and for eval.py: the confusion matrix
(counts and row-normalised, class names on the axes), per-class precision-recall curves, the misclassified images
with their probabilities, and per-class accuracy (= recall) and precision.

eval.py --tensorboard logs each artifact as its own run under <log_dir>/eval/<report name>/ (custom, custom_onnx,
custom_onnx-int8, ...), so a checkpoint and its exported and quantized versions sit side by side in TensorBoard.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from utils.data.preprocess import Preprocess
from utils.evaluation.loop import EvalResult, per_class_accuracy, per_class_precision
from utils.evaluation.report import mistakes_figure
from utils.io import markdown_table
from utils.plots import confusion_matrix_figure
from utils.tensorboard import add_figure, add_markdown, open_writer

PR_THRESHOLDS = 127  # TensorBoard's default resolution for PR curves
MISTAKES_SHOWN = 32  # misclassified images per grid (4 rows of 8)


def tag_name(text: str) -> str:
    """A class name as one TensorBoard tag component ('/' would open a sub-group)."""
    return re.sub(r"[/\s]+", "_", text.strip()) or "_"


def detail_options() -> dict:
    """The evaluate() options that collect what evaluation_figures and log_evaluation show (PR counts, mistakes)."""
    return {"pr_thresholds": PR_THRESHOLDS, "keep_mistakes": MISTAKES_SHOWN}


def evaluation_figures(stats: EvalResult, classes: list[str], pre: Preprocess, title: str = "") -> dict:
    """The pictures of an evaluation, by name: the confusion matrix, and the misclassified grid when `stats` holds
    mistakes. Drawn once, for TensorBoard and the PNG files alike; the caller closes them."""
    figures = {"confusion_matrix": confusion_matrix_figure(np.asarray(stats.confusion_matrix), classes, title)}
    if stats.mistakes is not None:
        fig = mistakes_figure(stats.mistakes, classes, pre)
        if fig is not None:
            figures["misclassified"] = fig
    return figures


def log_evaluation(writer, stats: EvalResult, figures: dict, classes: list[str], step: int, prefix: str) -> None:
    """The figures as <prefix>/<name> images and, when `stats` has them, one PR curve per class (<prefix>_pr/<class>)."""
    for name, fig in figures.items():
        add_figure(writer, f"{prefix}/{name}", fig, step)
    curves = stats.pr_curves
    if curves is not None:
        for i, name in enumerate(classes):
            writer.add_pr_curve_raw(f"{prefix}_pr/{tag_name(name)}", curves.tp[i], curves.fp[i], curves.tn[i], curves.fn[i],
                                    curves.precision[i], curves.recall[i], global_step=step,
                                    num_thresholds=curves.num_thresholds)


def per_class_table(confusion, classes: list[str]) -> dict[str, dict[str, float]]:
    """{"accuracy": {class: value}, "precision": {...}}: accuracy of a class is its recall."""
    return {"accuracy": per_class_accuracy(confusion, classes), "precision": per_class_precision(confusion, classes)}


def log_per_class(writer, per_class: dict[str, dict[str, float]], step: int, prefix: str, table: bool = True) -> None:
    """<prefix>_per_class_accuracy/<class> and <prefix>_per_class_precision/<class> scalars, and (with `table`) the
    same as one markdown table in the Text dashboard."""
    for metric, values in per_class.items():
        for name, value in values.items():
            writer.add_scalar(f"{prefix}_per_class_{metric}/{tag_name(name)}", value, step)
    if not table:
        return
    names = list(per_class["accuracy"])
    rows = [[name, f"{per_class['accuracy'][name]:.4f}", f"{per_class['precision'][name]:.4f}"] for name in names]
    add_markdown(writer, f"{prefix}/per_class", markdown_table(("class", "accuracy (= recall)", "precision"), rows), step)


REPORT_SCALARS = ("acc1", "acc5", "loss", "latency_ms", "throughput_img_s", "size_mb")


def log_eval_report(log_dir: Path, report: dict, stats: EvalResult, figures: dict) -> Path:
    """eval.py --tensorboard: one evaluation as its own run (step 0), replacing an earlier evaluation logged there."""
    classes = report["classes"]
    writer = open_writer(log_dir, purge_step=0)
    try:
        for key in REPORT_SCALARS:
            if report.get(key) is not None:
                writer.add_scalar(f"eval/{key}", report[key], 0)
        log_evaluation(writer, stats, figures, classes, 0, "eval")
        log_per_class(writer, {"accuracy": report["per_class_recall"], "precision": report["per_class_precision"]}, 0, "eval")
        facts = [(key, report[key]) for key in ("model", "format", "engine", "precision", "compute", "weights", "dataset", "split",
                                                 "num_images", "tta", *REPORT_SCALARS, "device") if report.get(key) is not None]
        add_markdown(writer, "eval/report", markdown_table(("field", "value"), [[key, value] for key, value in facts],
                                                           lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)), 0)
    finally:
        writer.close()
    return Path(log_dir)
