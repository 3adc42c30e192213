"""Quantize a trained checkpoint (FP16, static INT8, dynamic INT8) and compare it with FP32: size, accuracy, speed.

Examples:
  python quantize.py --weights weights/FashionMNIST/custom/best.pth --mode int8                 # ONNX Runtime QDQ
  python quantize.py --weights best.pth --mode int8 --calib_batches 20
  python quantize.py --weights best.pth --mode fp16                                            # .pth, .onnx and .pt2
  python quantize.py --weights best.pth --mode dynamic                                         # INT8 Linear weights

Modes (--backend picks pytorch, onnx, pt2 or all):
  fp16     pytorch: <ckpt dir>/<ckpt name>_fp16.pth, a real half-precision checkpoint (about half the FP32
           weights; eval.py, predict.py and export.py load it). onnx: converted_models/<model>_fp16.onnx
           (float32 inputs/outputs). pt2: converted_models/<model>_fp16.pt2 (float16 network behind float32
           casts). Accuracy is measured in FP16 on CUDA; on a CPU the checkpoint's weights are upcast to FP32 and
           ONNX Runtime's CPU provider runs FP16 nodes through inserted casts, so a CPU run measures the effect of
           FP16 rounding of the weights, not FP16 arithmetic (the table says which).
  int8     ONNX Runtime static post-training quantization calibrated on --calib_batches batches of training
           images: quantize_static, QDQ format, per-channel int8 weights, uint8 activations, on the exported
           FP32 ONNX -> converted_models/<model>_int8.onnx.
  dynamic  ONNX Runtime quantize_dynamic of the MatMul/Gemm (nn.Linear) weights -> converted_models/<model>_int8_dynamic.onnx,
           with a warning when the model has nothing (or little) to quantize: CNN weights live in convolutions.

PyTorch INT8 (torch.ao FX and quantize_dynamic) is gone: torch.ao.quantization is deprecated, and torchao's CPU INT8
for convolutions needs torch.compile to be faster than FP32 (docs/deploy.md); --backend pytorch with int8/dynamic
says so in one line.

Every format is evaluated on the validation split the checkpoint was trained on (or --dataset/--data_root)
against the FP32 PyTorch model. Results: a table on stdout (format, size MB, acc@1, acc@5, latency ms at
batch 1, throughput img/s) and results/quantization/<model>.json (rows merged across modes and checkpoints, each keyed by the exact
file it measured: path + sha256; re-running a checkpoint replaces its rows, another checkpoint adds its own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from utils import cli, progress
from utils.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from utils.data.loaders import calibration_batches, data_spec, eval_loader
from utils.deploy.artifacts import evaluate_loaded, load_for_eval
from utils.deploy.export import export_artifact
from utils.deploy.quantize import dynamic_warning, fp16_checkpoint, quantize_onnx_dynamic, quantize_onnx_int8
from utils.deploy.runtime import OnnxModel
from utils.errors import InputError
from utils.io import atomic_write_text, file_sha256, markdown_table, merge_rows

TABLE_COLUMNS = ("format", "compute", "size (MB)", "acc@1 (%)", "acc@5 (%)", "Δacc@1 (points)", "latency (ms)", "throughput (img/s)")


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--weights", required=True, metavar="CKPT", help="FP32 checkpoint written by train.py")
    cli.add_model_override_arg(p)
    p.add_argument("--mode", required=True, choices=["fp16", "int8", "dynamic"], help="what to produce (see above)")
    p.add_argument("--backend", default="all", choices=["all", "onnx", "pt2", "pytorch"],
                   help="fp16: the .pth (pytorch), .onnx or .pt2, or all three; int8/dynamic: ONNX Runtime only")
    p.add_argument("--calib_batches", type=cli.positive(), default=10, help="int8: training batches used for calibration")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="path of the main artifact (fp16: the .pth, or the .onnx/.pt2 with --backend onnx/pt2; int8 and "
                        "dynamic: the .onnx)")
    cli.add_data_args(p, batch_size=32, num_workers=0, from_checkpoint=True)
    p.add_argument("--max_images", type=cli.positive(), default=None, help="evaluate on the first N validation images only")
    p.add_argument("--speed_repeats", type=cli.non_negative(), default=20, help="timed repeats for latency/throughput (0 = skip)")
    p.add_argument("--results", default=None, metavar="JSON", help="results file (default results/quantization/<model>.json)")
    cli.add_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def fresh_fp32_onnx(path: Path, weights: str, model, info, log) -> Path:
    """The exported FP32 ONNX of this checkpoint: reused when its metadata names the same checkpoint sha256."""
    if path.is_file():
        try:
            meta = OnnxModel(path, "cpu").metadata
        except InputError:
            meta = {}
        if meta.get("source_sha256") == file_sha256(weights) and meta.get("precision") == "fp32":
            log(f"reusing {path} (exported from this checkpoint)")
            return path
    log(f"exporting FP32 ONNX to {path}")
    export_artifact(model, info, weights, "onnx", path, log=lambda *_: None)
    return path


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.mode in ("int8", "dynamic") and args.backend in ("pytorch", "pt2"):
        raise InputError(f"--mode {args.mode} --backend {args.backend}: PyTorch INT8 was removed (torch.ao.quantization is "
                         "deprecated; torchao's CPU INT8 needs torch.compile, see docs/deploy.md): use --backend onnx, "
                         "ONNX Runtime's INT8")
    progress.set_quiet(args.quiet)
    device = cli.resolve_device(args.device)
    ckpt = load_checkpoint(args.weights)
    if ckpt.get("precision", "fp32") != "fp32":
        raise InputError(f"{args.weights} is already a {ckpt['precision']} checkpoint: quantize the FP32 checkpoint")
    model, info = build_from_checkpoint(ckpt, args.model, source=args.weights)
    name, pre = info.model_name, info.preprocess
    spec = data_spec(ckpt.get("args"), args.dataset, args.data_root, ckpt.get("split"))
    loader, data_classes = eval_loader(spec, pre, args.batch_size, args.max_images, args.num_workers)
    if data_classes != info.classes:
        raise InputError(f"the dataset's classes {data_classes[:5]}... differ from the checkpoint's {info.classes[:5]}...: "
                         "pass the --dataset/--data_root the model was trained on")
    weights = Path(args.weights)
    out_dir = weights.parent / "converted_models"
    onnx_on, torch_on, pt2_on = (args.backend in ("all", b) for b in ("onnx", "pytorch", "pt2"))
    rows: list[dict] = []
    weights_sha256 = file_sha256(weights)

    def measure(path: Path, note: str = "", eval_device: torch.device = device) -> dict:
        loaded = load_for_eval(path, eval_device, args.model, args.device)
        stats = evaluate_loaded(loaded, loader, len(data_classes), args.speed_repeats, not args.quiet)
        row = {"format": loaded.format, "engine": loaded.engine, "precision": loaded.precision, "compute": loaded.compute,
               "path": str(path), "real_path": os.path.realpath(path), "sha256": file_sha256(path),
               "checkpoint": str(weights), "checkpoint_sha256": weights_sha256,
               "size_mb": loaded.size_mb, "file_mb": path.stat().st_size / 1e6,
               "acc1": stats.acc1, "acc5": stats.acc5, "loss": stats.loss, "num_images": stats.num_images,
               "mode": args.mode, "note": note}
        row.update(stats.speed())
        rows.append(row)
        print(f"  {row['format']:<22} acc@1 {100 * row['acc1']:.2f}%  size {row['size_mb']:.2f} MB  ({path})", flush=True)
        return row

    print(f"{name}: evaluating on {spec.name} validation ({len(loader.dataset)} images) on {device}", flush=True)
    measure(weights, "FP32 baseline (checkpoint weights as stored, optimizer state excluded)")

    if args.mode == "fp16":
        if torch_on:
            path = Path(args.output) if args.output else weights.with_name(f"{weights.stem}_fp16.pth")
            save_checkpoint(fp16_checkpoint(ckpt, weights), path)
            row = measure(path, "half-precision checkpoint")
            print(f"FP16 checkpoint {path}: {path.stat().st_size / 1e6:.2f} MB on disk (FP32 weights {rows[0]['size_mb']:.2f} MB; "
                  f"training checkpoint {weights.stat().st_size / 1e6:.2f} MB incl. optimizer state); compute: {row['compute']}")
        if onnx_on:
            path = Path(args.output) if args.output and args.backend == "onnx" else out_dir / f"{name}_fp16.onnx"
            result = export_artifact(model, info, weights, "onnx", path, half=True, log=lambda *_: None)
            measure(path, f"FP16 ONNX (float32 I/O), parity max |diff| {result.parity.max_abs_diff:.3g} vs FP32 PyTorch")
        if pt2_on:
            path = Path(args.output) if args.output and args.backend == "pt2" else out_dir / f"{name}_fp16.pt2"
            result = export_artifact(model, info, weights, "pt2", path, half=True, log=lambda *_: None)
            measure(path, f"FP16 .pt2 (float32 I/O), parity max |diff| {result.parity.max_abs_diff:.3g} vs FP32 PyTorch")
    elif args.mode == "int8":
        print(f"calibrating on {args.calib_batches} batches of {args.batch_size} training images", flush=True)
        batches = calibration_batches(spec, pre, args.calib_batches, args.batch_size)
        fp32 = fresh_fp32_onnx(out_dir / f"{name}.onnx", args.weights, model, info, print)
        measure(fp32, "FP32 ONNX")
        path = Path(args.output) if args.output else out_dir / f"{name}_int8.onnx"
        note = f"onnxruntime quantize_static QDQ, per-channel int8 weights, uint8 activations, MinMax on {len(batches)} batches"
        quantize_onnx_int8(fp32, path, batches, {"precision": "int8", "quantization": note})
        measure(path, note)
    else:
        warning = dynamic_warning(model)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        fp32 = fresh_fp32_onnx(out_dir / f"{name}.onnx", args.weights, model, info, print)
        measure(fp32, "FP32 ONNX")
        path = Path(args.output) if args.output else out_dir / f"{name}_int8_dynamic.onnx"
        note = "onnxruntime quantize_dynamic of MatMul/Gemm (nn.Linear): int8 weights, activations quantized per batch"
        quantize_onnx_dynamic(fp32, path, {"precision": "int8-dynamic", "quantization": note})
        measure(path, note)

    base = rows[0]["acc1"]
    for row in rows:
        row["delta_acc1_points"] = 100 * (row["acc1"] - base)
    results = Path(args.results) if args.results else Path("results") / "quantization" / f"{name}.json"
    # rows of every checkpoint of this model quantized so far, keyed by the exact file (path + sha256)
    try:
        earlier = json.loads(results.read_text()).get("rows", []) if results.is_file() else []
    except (ValueError, AttributeError):
        raise InputError(f"{results} is not a quantization report (JSON with rows); fix: move it away or pass another "
                         "--results") from None
    doc = {"model": name, "weights": str(weights), "dataset": spec.name, "num_images": rows[0]["num_images"],
           "device": str(device), "torch": str(torch.__version__), "rows": merge_rows(earlier, rows)}
    atomic_write_text(results, json.dumps(doc, indent=2) + "\n")
    table = [[r["format"], r["compute"], f"{r['size_mb']:.2f}", f"{100 * r['acc1']:.2f}", f"{100 * r['acc5']:.2f}",
              f"{r['delta_acc1_points']:+.2f}", f"{r['latency_ms']:.2f}" if "latency_ms" in r else "",
              f"{r['throughput_img_s']:.0f}" if "throughput_img_s" in r else ""] for r in rows]
    print(f"\n{name} on {spec.name} ({rows[0]['num_images']} validation images); latency at batch 1, throughput at batch "
          f"{args.batch_size}; sizes: FP32 = weights as stored, others = file size\n")
    print(markdown_table(TABLE_COLUMNS, table))
    print(f"\nresults: {results}")
    return 0


if __name__ == "__main__":
    cli.run(main)
