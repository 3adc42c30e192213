"""Deployment benchmark for trained checkpoints: FP32 PyTorch vs ONNX Runtime vs TorchScript vs INT8, and predict.py start-up.

For each checkpoint: export ONNX and TorchScript (parity-checked, as export.py does), quantize to INT8
with ONNX Runtime (static QDQ, per-channel) and PyTorch FX (x86/fbgemm), calibrated on training images,
then evaluate every format on the validation split the checkpoint was trained on: size (MB; weights as
stored for the checkpoint, file size for artifacts), acc@1, acc@5, batch-1 latency and batched
throughput. Then the whole-process wall time of one `predict.py` call on one real test image
(process start, imports, model load, preprocessing, inference, output) for the ONNX file, the
TorchScript file and, for reference, predict_ckpoint.py on the checkpoint: the median of --predict_runs.

Artifacts go to --workdir (a temporary folder by default), never into the checkpoint's folder.

Examples:
  python benchmarks/bench_deploy.py --weights weights/FashionMNIST/custom/best.pth
  python benchmarks/bench_deploy.py --weights runs/custom/best.pth runs/resnet18/best.pth --threads 1 --max_images 2000
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import ROOT, OtherLoad, command_line, contention_note, machine_info, table, write_json  # noqa: E402
from models import count_parameters  # noqa: E402
from utils import cli  # noqa: E402
from utils.checkpoint import build_from_checkpoint, load_checkpoint  # noqa: E402
from utils.data.datasets import val_folder  # noqa: E402
from utils.data.fashion_mnist import save_test_images  # noqa: E402
from utils.data.loaders import calibration_batches, data_spec, eval_loader
from utils.data.preprocess import list_images  # noqa: E402
from utils.deploy.artifacts import evaluate_loaded, load_for_eval  # noqa: E402
from utils.deploy.export import export_artifact  # noqa: E402
from utils.deploy.quantize import quantize_fx_int8, quantize_onnx_int8, save_quantized_torchscript
from utils.errors import InputError  # noqa: E402

FORMAT_COLUMNS = [("model", "model"), ("format", "format"), ("compute", "compute"), ("size_mb", "size (MB)"),
                  ("acc1_pct", "acc@1 (%)"), ("acc5_pct", "acc@5 (%)"), ("latency_ms", "latency (ms, batch 1)"),
                  ("throughput_img_s", "throughput (img/s)"), ("speed_batch_size", "batch")]
PREDICT_COLUMNS = [("model", "model"), ("target", "command"), ("wall_s", "process wall time (s)"),
                   ("load_ms", "model load (ms)"), ("inference_ms", "inference (ms)")]


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--weights", nargs="+", required=True, metavar="CKPT", help="checkpoints written by train.py")
    cli.add_data_args(p, batch_size=64, num_workers=0, from_checkpoint=True)
    p.add_argument("--max_images", type=cli.positive(), default=None, help="evaluate on the first N validation images")
    p.add_argument("--calib_batches", type=cli.positive(), default=10, help="training batches calibrating INT8")
    p.add_argument("--repeats", type=cli.positive(), default=20, help="timed repeats for latency (half for throughput)")
    p.add_argument("--threads", type=cli.non_negative(), default=0,
                   help="torch and ONNX Runtime intra-op threads for the in-process rows (0 = library defaults)")
    p.add_argument("--predict_runs", type=cli.positive(), default=3, help="predict.py processes per target (median)")
    p.add_argument("--workdir", default=None, help="where artifacts are written (default: a temporary folder)")
    p.add_argument("--out", default="results/benchmarks/bench_deploy.json", help="JSON output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def test_image(spec, work: Path) -> Path:
    """One real validation image as a file: a Fashion-MNIST test PNG, or the folder's first val image."""
    if spec.dataset:
        val = val_folder(spec.dataset)
        images = list_images(val)
        if not images:
            raise InputError(f"no validation images in {val}")
        return images[0]
    return save_test_images(spec.data_root, work / "test_images", count=1)[0]


def time_predict(cmd: list[str], runs: int) -> dict:
    """Median wall time of whole processes, plus load/inference times the script reports in its JSON."""
    walls, doc = [], {}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        doc = json.loads(proc.stdout)["summary"]
    return {"wall_s": statistics.median(walls), "wall_s_all": walls, "load_ms": doc["load_ms"],
            "inference_ms": doc["median_inference_ms"]}


def bench_checkpoint(weights: str, args, work: Path) -> tuple[list[dict], list[dict]]:
    ckpt = load_checkpoint(weights)
    model, info = build_from_checkpoint(ckpt)
    name, pre = info.model_name, info.preprocess
    spec = data_spec(ckpt.get("args"), args.dataset, args.data_root)
    loader, classes = eval_loader(spec, pre, args.batch_size, args.max_images, args.num_workers)
    work = work / f"{name}_{Path(weights).parent.name}"
    quiet = lambda *_: None  # noqa: E731
    print(f"{name}: exporting and quantizing into {work}", flush=True)
    onnx_path = export_artifact(model, info, weights, "onnx", work / f"{name}.onnx", log=quiet).path
    ts_path = export_artifact(model, info, weights, "torchscript", work / f"{name}.pt", log=quiet).path
    batches = calibration_batches(spec, pre, args.calib_batches, args.batch_size)
    int8_path = quantize_onnx_int8(onnx_path, work / f"{name}_int8.onnx", batches, {"precision": "int8"})
    targets = [Path(weights), onnx_path, ts_path, int8_path]
    try:
        fx = quantize_fx_int8(model, batches)
        targets.append(save_quantized_torchscript(fx, work / f"{name}_int8_fx.pt", info, weights, "int8-fx", batches[0][:1],
                                                  "torch.ao FX static", count_parameters(model)))
    except InputError as e:
        print(f"note: {e}", file=sys.stderr)

    rows = []
    for path in targets:
        loaded = load_for_eval(path, torch.device("cpu"), ort_device="cpu", ort_threads=args.threads)
        stats = evaluate_loaded(loaded, loader, len(classes), args.repeats, not args.quiet)
        rows.append({"model": name, "format": loaded.format, "engine": loaded.engine, "compute": loaded.compute,
                     "path": str(path), "size_mb": loaded.size_mb, "file_mb": path.stat().st_size / 1e6,
                     "acc1": stats.acc1, "acc5": stats.acc5, "acc1_pct": 100 * stats.acc1,
                     "acc5_pct": 100 * stats.acc5, "num_images": stats.num_images, **stats.speed()})
        print(f"  {loaded.format:<20} acc@1 {100 * stats.acc1:.2f}%  {stats.throughput_img_s:.0f} img/s", flush=True)

    image = test_image(spec, work)
    py = sys.executable
    predict_rows = []
    for target, cmd in (
        ("predict.py --model <.onnx>", [py, "predict.py", "--model", str(onnx_path), "--image", str(image), "--json"]),
        ("predict.py --model <.pt TorchScript>", [py, "predict.py", "--model", str(ts_path), "--image", str(image), "--json",
                                                  "--device", "cpu"]),
        ("predict_ckpoint.py --weights <.pth>", [py, "predict_ckpoint.py", "--weights", str(weights), "--image", str(image),
                                                 "--json", "--device", "cpu"]),
    ):
        timing = time_predict(cmd, args.predict_runs)
        predict_rows.append({"model": name, "target": target, "image": str(image), **timing})
        print(f"  {target:<40} {timing['wall_s']:.2f} s per process", flush=True)
    return rows, predict_rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    meter = OtherLoad()
    rows, predict_rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        for weights in args.weights:
            r, p = bench_checkpoint(weights, args, work)
            rows += r
            predict_rows += p
    info = machine_info(torch.device("cpu"))
    note = contention_note(meter, os.cpu_count() or 1)
    command = command_line("bench_deploy.py", argv)
    out = write_json(args.out, {"command": command, "machine": info, "contention": note, "threads": args.threads,
                                "formats": rows, "predict": predict_rows})
    print(f"\n{command}\n")
    print(f"CPU: {info['cpu']}, {info['cores']} cores, torch threads {torch.get_num_threads()}"
          f"{', ONNX Runtime threads ' + str(args.threads) if args.threads else ''}; {rows[0]['num_images']} validation images\n")
    print(table(rows, FORMAT_COLUMNS))
    print()
    print(table(predict_rows, PREDICT_COLUMNS))
    if note:
        print(f"\n{note}")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
