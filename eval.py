"""Evaluate a trained model into a JSON report (accuracy, per-class accuracy, confusion matrix, size, speed).

Examples:
  python eval.py --weights weights/FashionMNIST/custom/best.pth
  python eval.py --weights best.pth --dataset path/to/folder --save_examples

Model name, classes and preprocessing come from the checkpoint. Writes the JSON (default
results/<model>.json) and confusion_matrix.png beside it.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils import cli
from utils.checkpoint import atomic_write_text, build_from_checkpoint, load_checkpoint
from utils.data import DataSpec, build_eval_dataset
from utils.engine import evaluate, per_class_accuracy
from utils.plots import plot_confusion_matrix, plot_examples
from utils.preprocess import InputError
from utils.speed import latency_and_throughput


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--weights", required=True, metavar="CKPT", help="checkpoint written by train.py (best.pth / last.pth)")
    p.add_argument("-m", "--model", default=None, help="override the model name stored in the checkpoint")
    cli.add_data_args(p)
    p.add_argument("--split", default="val", help="folder split to evaluate (val falls back to test/); Fashion-MNIST: its test set")
    cli.add_device_arg(p)
    p.add_argument("--output", default=None, help="JSON report path (default results/<model>.json)")
    p.add_argument("--save_examples", action="store_true", help="also save misclassified_examples.png (a grid of wrong predictions)")
    p.add_argument("--speed_repeats", type=int, default=20, help="timed repeats for latency/throughput (0 = skip timing)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def model_size(model: torch.nn.Module) -> tuple[int, float]:
    """(parameter count, MB of parameters + buffers as stored)."""
    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return params, size / 1e6


def misclassified_grid(dataset, predictions: torch.Tensor, classes: list[str], path: Path, limit: int = 32) -> Path | None:
    """Draw up to `limit` wrongly classified images with true and predicted labels."""
    images, titles = [], []
    targets = [int(t) for t in getattr(dataset, "targets", [])] or [dataset[i][1] for i in range(len(dataset))]
    for i, (pred, true) in enumerate(zip(predictions.tolist(), targets)):
        if pred != true:
            img = dataset.samples[i][0] if hasattr(dataset, "samples") else dataset.data[i].numpy()
            if isinstance(img, str):
                from utils.preprocess import load_image

                img = np.asarray(load_image(img))
            images.append(np.asarray(img))
            titles.append(f"true {classes[true]}\npred {classes[pred]}")
            if len(images) == limit:
                break
    return plot_examples(images, titles, path) if images else None


def main(argv=None) -> int:
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    ckpt = load_checkpoint(args.weights)
    model, info = build_from_checkpoint(ckpt, args.model)
    model = model.to(device)
    pre, classes = info["preprocess"], info["classes"]
    spec = DataSpec(args.dataset, args.data_root)
    dataset, data_classes, split = build_eval_dataset(spec, pre, args.split)
    if data_classes != classes:
        raise InputError(f"the dataset's classes {data_classes[:5]}... differ from the checkpoint's {classes[:5]}...: "
                         "evaluate on the dataset the model was trained on")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    stats = evaluate(model, loader, device, len(classes), show_progress=not args.quiet, desc="eval",
                     return_predictions=args.save_examples)
    params, size_mb = model_size(model)
    report = {
        "model": info["model_name"], "format": "pytorch", "engine": "pytorch", "weights": str(args.weights),
        "dataset": spec.name, "split": split, "num_images": stats["num_images"],
        "loss": stats["loss"], "acc1": stats["acc1"], "acc5": stats["acc5"],
        "per_class_acc": per_class_accuracy(stats["confusion_matrix"], classes),
        "confusion_matrix": stats["confusion_matrix"].tolist(), "classes": classes,
        "params": params, "size_mb": size_mb, "img_size": pre.img_size,
    }
    if args.speed_repeats > 0:
        batch = next(iter(loader))[0].to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        with torch.inference_mode():
            report.update(latency_and_throughput(model, batch[:1], batch, repeats=args.speed_repeats, sync=sync))
    report.update(device=str(device), torch=str(torch.__version__), machine=platform.processor() or platform.machine())

    out = Path(args.output) if args.output else Path("results") / f"{info['model_name']}.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    cm_png = plot_confusion_matrix(np.array(report["confusion_matrix"]), classes, out.with_name("confusion_matrix.png"),
                                   title=info["model_name"])
    print(f"{info['model_name']} on {spec.name}/{split} ({stats['num_images']} images): "
          f"acc@1 {stats['acc1']:.4f}  acc@5 {stats['acc5']:.4f}  loss {stats['loss']:.4f}")
    print(f"params {params / 1e6:.3f} M  size {size_mb:.2f} MB"
          + (f"  latency {report['latency_ms']:.2f} ms (batch 1)  throughput {report['throughput_img_s']:.0f} img/s "
             f"(batch {report['speed_batch_size']}) on {device}" if "latency_ms" in report else ""))
    worst = sorted(report["per_class_acc"].items(), key=lambda kv: kv[1])[:3]
    print("lowest per-class acc@1: " + ", ".join(f"{c} {a:.3f}" for c, a in worst))
    if args.save_examples:
        grid = misclassified_grid(dataset, stats["predictions"], classes, out.with_name("misclassified_examples.png"))
        if grid:
            print(f"misclassified examples: {grid}")
    print(f"report: {out}\nconfusion matrix: {cm_png}")
    return 0


if __name__ == "__main__":
    cli.run(main)
