"""Evaluation reports: the misclassified-examples figure, where eval.py's JSON goes, and the markdown summary that
merges every report (eval.py --summary, summarize_results.py).

Sizes are MB (10^6 bytes): weights as stored for checkpoints, file size for exported artifacts. MMACs: millions
of multiply-accumulates per image in convolutions and matrix products (FlopCounterMode; FLOPs = 2 x MACs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from utils.data.preprocess import Preprocess, denormalize
from utils.errors import InputError
from utils.io import atomic_write_text, markdown_table
from utils.plots import GRID_LABEL_CHARS, examples_figure, short_label

if TYPE_CHECKING:  # the eval loop imports torch; summarize_results.py needs only the tables
    from utils.evaluation.loop import Mistakes

EVAL_COLUMNS = ("model", "format", "compute", "dataset", "img", "params (M)", "MMACs", "size (MB)", "acc@1 (%)", "acc@5 (%)",
                "latency (ms, batch 1)", "throughput (img/s)", "device", "report")
QUANT_COLUMNS = ("model", "format", "compute", "size (MB)", "acc@1 (%)", "acc@5 (%)", "latency (ms, batch 1)",
                 "throughput (img/s)", "report")


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def load_reports(results_dir: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, dict]]]:
    """(eval reports, quantization reports); files that are not ours are skipped."""
    evals, quants = [], []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and {"model", "acc1", "acc5"} <= data.keys():
            evals.append((path, data))
    for path in sorted((results_dir / "quantization").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            quants.append((path, data))
    return evals, quants


def summary_markdown(results_dir: Path) -> str:
    evals, quants = load_reports(results_dir)
    if not evals and not quants:
        raise InputError(f"no reports in {results_dir}/ (run eval.py --weights ... or quantize.py first)")
    parts = [f"# Results summary ({results_dir}/)"]
    if evals:
        rows = []
        for path, r in sorted(evals, key=lambda pr: (pr[1]["model"], pr[1].get("format", "pytorch"))):
            rows.append([r["model"], r.get("format", "pytorch"), r.get("compute", ""), f"{r.get('dataset', '')}/{r.get('split', '')}",
                         r.get("img_size", ""), _num(r["params"] / 1e6 if r.get("params") else None, ".3f"),
                         _num(r["macs"] / 1e6 if r.get("macs") else None, ".1f"),
                         _num(r.get("size_mb"), ".2f"), _pct(r["acc1"]), _pct(r["acc5"]), _num(r.get("latency_ms"), ".2f"),
                         _num(r.get("throughput_img_s"), ".0f"), r.get("device", ""), path.name])
        parts += ["", "## Accuracy, size and speed per model and format (eval.py)", "", markdown_table(EVAL_COLUMNS, rows)]
    if quants:
        rows = []
        for path, q in quants:
            for r in q["rows"]:
                rows.append([q.get("model", ""), r.get("format", ""), r.get("compute", ""), _num(r.get("size_mb"), ".2f"),
                             _pct(r.get("acc1")), _pct(r.get("acc5")), _num(r.get("latency_ms"), ".2f"),
                             _num(r.get("throughput_img_s"), ".0f"), f"quantization/{path.name}"])
        parts += ["", "## Quantization (quantize.py)", "", markdown_table(QUANT_COLUMNS, rows)]
    return "\n".join(parts) + "\n"


def write_summary(results_dir: Path, output: Path | None = None) -> str:
    """Build the tables, write them to `output` (default <results_dir>/summary.md) and return the markdown."""
    text = summary_markdown(results_dir)
    atomic_write_text(output or results_dir / "summary.md", text)
    return text


def mistakes_figure(mistakes: Mistakes, classes: list[str], pre: Preprocess):
    """The misclassified images as the network saw them (de-normalised), titled with the true class, the predicted
    one and its probability; None when there is no mistake."""
    if len(mistakes.targets) == 0:
        return None
    images = [denormalize(image.numpy(), pre) for image in mistakes.images]
    titles = [f"true {short_label(classes[t], GRID_LABEL_CHARS)}\npred {short_label(classes[p], GRID_LABEL_CHARS)} {c:.0%}"
              for t, p, c in
              zip(mistakes.targets.tolist(), mistakes.predictions.tolist(), mistakes.confidence.tolist())]
    return examples_figure(images, titles)


def default_output(model_name: str, fmt: str, weights: str, sha256: str, results_dir: Path = Path("results")) -> tuple[Path, str]:
    """The report of one evaluated file, keyed by that exact file (path + sha256): results/<model>[_<format>].json,
    or <stem>-2.json, -3, ... when that name holds the report of another file (another checkpoint of the same model,
    or the same path with other bytes), so evaluating two checkpoints never replaces one's report by the other's;
    evaluating the same file again replaces its own. Returns the path and its numbering suffix ("" or "-N") for the
    report's figures."""
    stem = model_name if fmt == "pytorch" else f"{model_name}_{fmt}"
    n = 1
    while True:
        tag = "" if n == 1 else f"-{n}"
        path = results_dir / f"{stem}{tag}.json"
        if not path.exists():
            return path, tag
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict) and old.get("weights") == weights and old.get("sha256") == sha256:
            return path, tag
        n += 1


def class_metrics_fields(metrics: dict) -> dict:
    """The eval loop's class_metrics() as eval.py's JSON fields: per_class_precision / per_class_recall /
    per_class_f1 / support (class -> value), and the flat averages precision_macro, ..., f1_weighted and
    balanced_accuracy (the report's own "precision" field is the numeric format, fp32/fp16/int8)."""
    out = {f"per_class_{name}": metrics[name] for name in ("precision", "recall", "f1")}
    out["support"] = metrics["support"]
    out.update({f"{name}_{avg}": metrics[f"{name}_{avg}"] for name in ("precision", "recall", "f1")
                for avg in ("macro", "weighted")})
    out["balanced_accuracy"] = metrics["balanced_accuracy"]
    return out


def class_metrics_text(fields: dict, classes: list[str], max_rows: int = 20) -> str:
    """eval.py's compact per-class table (precision, recall, F1, support) and the averages, from
    class_metrics_fields() (or the JSON report holding them).

    With more than `max_rows` classes only the `max_rows` lowest-F1 classes are listed (the JSON has them all)."""
    order = list(classes)
    precision, recall, f1 = (fields[f"per_class_{name}"] for name in ("precision", "recall", "f1"))
    shown = order if len(order) <= max_rows else sorted(order, key=lambda c: f1[c])[:max_rows]
    width = max([len("weighted avg"), *(len(c) for c in shown)])  # the average rows line up too
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    lines += [f"{c:<{width}}  {precision[c]:9.4f}  {recall[c]:6.4f}  {f1[c]:6.4f}  "
              f"{fields['support'][c]:7d}" for c in shown]
    if len(shown) < len(order):
        lines.append(f"({len(order) - len(shown)} more classes in the JSON report; the {len(shown)} lowest F1 shown)")
    total = sum(fields["support"].values())
    for avg in ("macro", "weighted"):
        lines.append(f"{avg + ' avg':<{width}}  {fields[f'precision_{avg}']:9.4f}  {fields[f'recall_{avg}']:6.4f}  "
                     f"{fields[f'f1_{avg}']:6.4f}  {total:7d}")
    lines.append(f"balanced accuracy {fields['balanced_accuracy']:.4f} (mean recall over the classes with images)")
    return "\n".join(lines)
