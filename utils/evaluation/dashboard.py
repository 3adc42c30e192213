"""One evaluation in TensorBoard, the same for validation during training and for eval.py: the confusion matrix
(counts and row-normalised, class names on the axes), per-class precision-recall curves, the misclassified images
with their probabilities, and per-class accuracy (= recall) and precision.

Sized for 1,000 classes: above 30 classes the confusion matrix shows the 30 classes in the most mistakes
(utils.plots), and per-class scalars and PR curves go to the TAGGED_CLASSES lowest-F1 classes of each evaluation,
every class being in the per-class text table.

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
TAGGED_CLASSES = 20  # classes with their own per-class scalars and PR curves (the lowest F1); every class in the table


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


def tagged_classes(stats: EvalResult, limit: int = TAGGED_CLASSES) -> list[int]:
    """The classes (indices, ascending) that get their own TensorBoard tags: all of them up to `limit`, else the
    `limit` lowest F1 (ties: class order). TensorBoard lists every tag and holds every point in memory, so 1,000
    classes x 3 tags per evaluation would bury the dashboard and grow its event files with classes x evaluations."""
    f1 = stats.f1.tolist()
    if len(f1) <= limit:
        return list(range(len(f1)))
    return sorted(sorted(range(len(f1)), key=lambda i: (f1[i], i))[:limit])


def log_evaluation(writer, stats: EvalResult, figures: dict, classes: list[str], step: int, prefix: str) -> None:
    """The figures as <prefix>/<name> images and, when `stats` has them, one PR curve per tagged class
    (<prefix>_pr/<class>, see tagged_classes)."""
    for name, fig in figures.items():
        add_figure(writer, f"{prefix}/{name}", fig, step)
    curves = stats.pr_curves
    if curves is not None:
        for i in tagged_classes(stats):
            writer.add_pr_curve_raw(f"{prefix}_pr/{tag_name(classes[i])}", curves.tp[i], curves.fp[i], curves.tn[i], curves.fn[i],
                                    curves.precision[i], curves.recall[i], global_step=step,
                                    num_thresholds=curves.num_thresholds)


def log_per_class(writer, stats: EvalResult, classes: list[str], step: int, prefix: str, table: bool = True) -> None:
    """<prefix>_per_class_accuracy/<class> and <prefix>_per_class_precision/<class> scalars of the tagged classes
    (all of them, or the TAGGED_CLASSES lowest F1), and (with `table`) every class in one markdown table in the Text
    dashboard: in class order, or lowest F1 first under a note naming the cap when there are more classes."""
    accuracy = per_class_accuracy(stats.confusion_matrix, classes)
    precision = per_class_precision(stats.confusion_matrix, classes)
    tagged = tagged_classes(stats)
    for metric, values in (("accuracy", accuracy), ("precision", precision)):
        for i in tagged:
            writer.add_scalar(f"{prefix}_per_class_{metric}/{tag_name(classes[i])}", values[classes[i]], step)
    if not table:
        return
    f1 = stats.f1.tolist()
    capped = len(tagged) < len(classes)
    order = sorted(range(len(classes)), key=lambda i: (f1[i], i)) if capped else range(len(classes))
    rows = [[classes[i], f"{accuracy[classes[i]]:.4f}", f"{precision[classes[i]]:.4f}", f"{f1[i]:.4f}"] for i in order]
    note = (f"{len(classes)} classes: per-class scalars and PR curves for the {len(tagged)} lowest F1 only; every class "
            "below, lowest F1 first.\n\n" if capped else "")
    add_markdown(writer, f"{prefix}/per_class",
                 note + markdown_table(("class", "accuracy (= recall)", "precision", "F1"), rows), step)


REPORT_SCALARS = ("acc1", "acc5", "loss", "ece", "nll", "latency_ms", "throughput_img_s", "size_mb")


def log_eval_report(log_dir: Path, report: dict, stats: EvalResult, figures: dict) -> Path:
    """eval.py --tensorboard: one evaluation as its own run (step 0), replacing an earlier evaluation logged there."""
    classes = report["classes"]
    writer = open_writer(log_dir, purge_step=0)
    try:
        for key in REPORT_SCALARS:
            if report.get(key) is not None:
                writer.add_scalar(f"eval/{key}", report[key], 0)
        log_evaluation(writer, stats, figures, classes, 0, "eval")
        log_per_class(writer, stats, classes, 0, "eval")
        facts = [(key, report[key]) for key in ("model", "format", "engine", "precision", "compute", "weights", "dataset", "split",
                                                 "num_images", "tta", *REPORT_SCALARS, "device") if report.get(key) is not None]
        add_markdown(writer, "eval/report", markdown_table(("field", "value"), [[key, value] for key, value in facts],
                                                           lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)), 0)
    finally:
        writer.close()
    return Path(log_dir)
