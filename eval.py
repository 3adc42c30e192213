"""Evaluate a trained model into a JSON report (accuracy, per-class precision/recall/F1 with their macro and weighted
averages, balanced accuracy, confusion matrix, size, speed).

Examples:
  python eval.py --weights weights/FashionMNIST/custom/best.pth
  python eval.py --weights best.pth --dataset path/to/folder --save_examples
  python eval.py --weights weights/FashionMNIST/custom/best.pth --tensorboard                # also logs/eval/custom/
  python eval.py --weights weights/FashionMNIST/custom/converted_models/custom.onnx     # ONNX Runtime
  python eval.py --weights weights/FashionMNIST/custom/converted_models/custom.pt2      # torch.export
  python eval.py --weights weights/FashionMNIST/custom/converted_models/custom.pt       # TorchScript (legacy)
  python eval.py --weights weights/FashionMNIST/custom/best_fp16.pth                   # FP16 checkpoint

--weights takes a checkpoint (FP32, or FP16 from quantize.py), an .onnx file (FP32, FP16 or INT8), a .pt2
(FP32 or FP16) or a TorchScript .pt (FP32, FP16 or an older PyTorch-quantized INT8). Model name, classes and preprocessing
come from the checkpoint or the artifact's metadata. Writes the JSON (default results/<model>.json
for checkpoints, results/<model>_<format>.json for other formats, with "format", "engine",
"precision" and "compute" fields) and a confusion-matrix PNG beside it, named after the report
(<report stem>_confusion_matrix.png), the reliability diagram (<report stem>_reliability.png: expected calibration error,
15 bins) and the most confused class pairs. --calibrate fits one temperature on the evaluated split and writes
<checkpoint stem>_calibrated.pth beside the checkpoint (eval.py, predict and export apply it: probabilities change,
predictions never do; docs/explain.md). FP16 checkpoints run in FP16 on CUDA; on CPU their weights are upcast to
FP32 (the report says which). --tensorboard logs the same evaluation (metrics, per-class accuracy and precision,
confusion matrix, PR curves, misclassified images) as the run <log_dir>/eval/<report name>/, so a checkpoint and its
ONNX, TorchScript and INT8 versions compare side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils import cli, progress
from utils.analysis.complexity_tools import registry_macs
from utils.data.datasets import DataSpec, build_eval_dataset
from utils.data.folders import check_same_classes
from utils.data.splits import relative, split_source
from utils.deploy.artifacts import evaluate_loaded, load_for_eval
from utils.errors import InputError
from utils.evaluation.calibration import (
    calibration,
    confused_pairs,
    fit_temperature,
    highest_loss_mistakes,
    reliability_figure,
    write_calibrated,
)
from utils.evaluation.dashboard import MISTAKES_SHOWN, PR_THRESHOLDS, evaluation_figures, log_eval_report
from utils.evaluation.loop import TTA_CHOICES, class_metrics
from utils.evaluation.report import class_metrics_fields, class_metrics_text, default_output
from utils.io import atomic_write_text, file_sha256
from utils.model_info import with_temperature
from utils.plots import close_figures, save_figure


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--weights", metavar="FILE",
                   help="checkpoint (best.pth / last.pth / *_fp16.pth), .onnx, .pt2 or TorchScript .pt to evaluate")
    cli.add_model_override_arg(p)
    cli.add_data_args(p)
    p.add_argument("--split", default="val",
                   help="folder split to evaluate (val falls back to test/; for a checkpoint whose run split a folder without "
                        "val/: exactly the held-out files it recorded, or its train files); Fashion-MNIST: its test set")
    cli.add_device_arg(p)
    p.add_argument("--output", default=None, help="JSON report path (default results/<model>.json)")
    p.add_argument("--tta", default="none", choices=TTA_CHOICES,
                   help="test-time augmentation: flip = average the logits of each image and its horizontal mirror "
                        "(twice the compute; the report's acc@1 is then the TTA accuracy)")
    p.add_argument("--save_examples", action="store_true",
                   help="also save misclassified_examples.png (the highest-loss mistakes as the model saw them)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on this split (LBFGS on NLL) and write <checkpoint>_calibrated.pth beside it")
    cli.add_tensorboard_args(p, "the evaluation", "eval/<report name>")
    p.add_argument("--speed_repeats", type=cli.non_negative(), default=20, help="timed repeats for latency/throughput (0 = skip timing)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def recorded_split(args, record: dict | None) -> dict | None:
    """The train/held-out split that the checkpoint's run made of a folder without val/ (utils.data.splits; `record`,
    None for other artifacts), when this evaluation is of that folder (no --dataset, or the same folder) and of its
    val or train side; else None."""
    if not record or args.split not in ("val", "train"):
        return None
    if args.dataset:
        source = split_source(args.dataset)
        if source is None or source.resolve() != Path(record["root"]).resolve():
            return None
    return record


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
    if not args.weights:
        raise InputError("give --weights FILE to evaluate (summarize_results.py merges existing reports)")
    device = cli.resolve_device(args.device)
    loaded = load_for_eval(args.weights, device, args.model, args.device)
    info = loaded.info
    temperature = info.temperature
    if args.calibrate and (loaded.format != "pytorch" or temperature != 1.0):
        raise InputError(f"--calibrate {args.weights}: " + ("give the FP32 checkpoint it came from (export it after "
                         "calibrating)" if loaded.format != "pytorch" else f"already calibrated (temperature "
                         f"{temperature:.4g}); calibrate the checkpoint it was made from"))
    if temperature != 1.0:  # a calibrated model: every probability of this evaluation is softmax(logits / T)
        loaded = replace(loaded, forward=with_temperature(loaded.forward, temperature))
    pre = info.preprocess
    if pre is None:
        raise InputError(f"{args.weights} stores no preprocessing metadata: re-export it with export.py")
    record = recorded_split(args, loaded.split)
    spec = DataSpec(args.dataset or (record["root"] if record else None), args.data_root, args.skip_bad_images,
                    split_record=record)
    dataset, data_classes, split = build_eval_dataset(spec, pre, args.split)
    if record is not None:
        print(f"evaluating the {args.split} files recorded in {args.weights} (the run split {record['root']} with "
              f"--val_fraction {record['val_fraction']}, --seed {record['seed']}): {len(dataset)} images")
    classes = info.classes or data_classes
    check_same_classes(classes, data_classes, f"model {args.weights}", f"dataset {spec.dataset or 'Fashion-MNIST'}",
                       "evaluate on the dataset the model was trained on (--dataset)")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        pin_memory=loaded.device.type == "cuda")
    details = {"pr_thresholds": PR_THRESHOLDS} if args.tensorboard else {}
    stats = evaluate_loaded(loaded, loader, len(classes), args.speed_repeats, not args.quiet, tta=args.tta, keep_logits=True,
                            **details)
    if args.tensorboard or args.save_examples:
        stats = replace(stats, mistakes=highest_loss_mistakes(stats.logits, stats.targets, dataset, MISTAKES_SHOWN))
    cal = calibration(stats.logits * temperature, stats.targets, temperature)
    fitted = raw = None
    if args.calibrate:
        raw = calibration(stats.logits, stats.targets)
        fitted = calibration(stats.logits, stats.targets, fit_temperature(stats.logits, stats.targets))
        cal = fitted
    name = info.model_name
    report = {
        "model": name, "format": loaded.format, "engine": loaded.engine, "precision": loaded.precision,
        "compute": loaded.compute, "weights": str(args.weights), "sha256": file_sha256(args.weights),
        "dataset": spec.name, "split": split, "num_images": stats.num_images, "tta": args.tta,
        "loss": stats.loss, "acc1": stats.acc1, "acc5": stats.acc5,
        # per_class_precision/recall/f1, support, their _macro and _weighted averages, balanced_accuracy
        **class_metrics_fields(class_metrics(stats, classes)),
        "confusion_matrix": stats.confusion_matrix.tolist(), "classes": classes,
        # calibration (utils.evaluation.calibration): ECE and NLL of the probabilities as served (divided by the
        # model's temperature, or by the one fitted here with --calibrate), 15 bins, and the most confused pairs
        "ece": cal.ece, "nll": cal.nll, "calibration": cal.to_dict(),
        "most_confused": confused_pairs(stats.confusion_matrix.numpy(), classes),
        **({"files": [relative(p, Path(record["root"])) for p, _ in dataset.samples]} if record is not None else {}),
        "params": loaded.params, "size_mb": loaded.size_mb, "img_size": pre.img_size, **loaded.extra,
        # MACs per image of the convolutions and matrix products (FlopCounterMode FLOPs / 2; FLOPs = 2 x MACs)
        "macs": registry_macs(name, len(classes), info.model_kwargs, pre.img_size, pre.channels),
    }
    report.update(stats.speed())
    report.update(device=str(loaded.device), torch=str(torch.__version__), machine=platform.processor() or platform.machine())

    # the metrics first: a report that cannot be written (disk full, read-only) does not lose them
    tta = f", {args.tta} TTA" if args.tta != "none" else ""
    print(f"{name} [{loaded.format}, {loaded.compute}{tta}] on {spec.name}/{split} ({stats.num_images} images): "
          f"acc@1 {stats.acc1:.4f}  acc@5 {stats.acc5:.4f}  loss {stats.loss:.4f}")
    params = f"params {loaded.params / 1e6:.3f} M  " if loaded.params else ""
    params += f"{report['macs'] / 1e6:.1f} MMACs/image  " if report["macs"] else ""
    print(f"{params}size {loaded.size_mb:.2f} MB"
          + (f"  latency {report['latency_ms']:.2f} ms (batch 1)  throughput {report['throughput_img_s']:.0f} img/s "
             f"(batch {report['speed_batch_size']}) on {loaded.device}" if "latency_ms" in report else ""))
    print(class_metrics_text(report, classes))
    if fitted is None:  # else the fit's line below says before and after
        print(f"calibration: ECE {cal.ece:.4f} (15 bins), NLL {cal.nll:.4f}"
              + (f", temperature {temperature:.4g} (the checkpoint's)" if temperature != 1.0 else ""))
    if report["most_confused"]:
        print("most confused (true -> predicted): " + ", ".join(
            f"{c['true']} -> {c['predicted']} {c['count']} ({c['rate']:.1%})" for c in report["most_confused"][:5]))
    if fitted is not None:
        saved = write_calibrated(Path(args.weights), report["sha256"], fitted, raw, spec.name, split, stats.num_images)
        report["temperature_fit"] = {"temperature": fitted.temperature, "ece_before": raw.ece, "ece_after": fitted.ece,
                                     "nll_before": raw.nll, "nll_after": fitted.nll, "checkpoint": str(saved)}
        print(f"temperature {fitted.temperature:.4f} fitted on {spec.name}/{split} ({stats.num_images} images): ECE "
              f"{raw.ece:.4f} -> {fitted.ece:.4f}, NLL {raw.nll:.4f} -> {fitted.nll:.4f}, acc@1 unchanged ({stats.acc1:.4f})"
              f"\ncalibrated checkpoint: {saved} (eval.py, predict_ckpoint.py, explain.py and export.py apply it)")
    out = Path(args.output) if args.output else default_output(name, loaded.format, report["weights"], report["sha256"])[0]
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    figures = evaluation_figures(stats, classes, pre, title=f"{name} ({loaded.format})")
    figures["reliability"] = reliability_figure(cal, name, before=raw if fitted else None)
    board = log_eval_report(Path(args.log_dir) / "eval" / out.stem, report, stats, figures) if args.tensorboard else None
    # figures named after their report: several reports in one folder never overwrite each other's
    cm_png = save_figure(figures.pop("confusion_matrix"), out.with_name(f"{out.stem}_confusion_matrix.png"))
    reliability_png = save_figure(figures.pop("reliability"), out.with_name(f"{out.stem}_reliability.png"))
    grid = None
    if args.save_examples and "misclassified" in figures:
        grid = save_figure(figures.pop("misclassified"), out.with_name(f"{out.stem}_misclassified_examples.png"))
    close_figures(*figures.values())
    if grid:
        print(f"misclassified examples: {grid}")
    print(f"report: {out}\nconfusion matrix: {cm_png}\nreliability diagram: {reliability_png}")
    if board:
        print(f"TensorBoard: {board}  (tensorboard --logdir {args.log_dir} --port 6006)")
    return 0


if __name__ == "__main__":
    cli.run(main)
