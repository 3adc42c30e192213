"""Deployment benchmark: trained checkpoints in every format (FP32 PyTorch, ONNX FP32/FP16/INT8, .pt2 FP32/FP16,
TorchScript) with predict.py start-up, and (--registry) every registry network through both ONNX exporters.

For each checkpoint: export ONNX, .pt2 and TorchScript, FP32 and FP16 (parity-checked, as export.py does), quantize
to INT8 with ONNX Runtime (static QDQ, per-channel) calibrated on training images, then evaluate every format
on the validation split the checkpoint was trained on: size (MB; weights as
stored for the checkpoint, file size for artifacts), acc@1, acc@5, batch-1 latency and batched
throughput. Then the whole-process wall time of one `predict.py` call on one real test image
(process start, imports, model load, preprocessing, inference, output) for the ONNX file, the .pt2, the
TorchScript file and the checkpoint: the median of --predict_runs.

--registry: each registry network, randomly initialised at --registry_size px (small-input stem), exported by the
torch.export-based ONNX exporter (the default) and the legacy TorchScript-based one: opset, parity max |diff| on
random batches, file size, export seconds, ONNX Runtime latency at batch 1 and 64 (--threads ORT threads).

Artifacts go to --workdir (a temporary folder by default), never into the checkpoint's folder.

Examples:
  python benchmarks/bench_deploy.py --weights weights/FashionMNIST/custom/best.pth
  python benchmarks/bench_deploy.py --weights runs/custom/best.pth runs/resnet18/best.pth --threads 1 --max_images 2000
  python benchmarks/bench_deploy.py --registry --threads 1
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
from models import MODEL_NAMES, build_model, model_kwargs  # noqa: E402
from utils import cli  # noqa: E402
from utils.checkpoint import build_from_checkpoint, load_checkpoint  # noqa: E402
from utils.data.datasets import val_folder  # noqa: E402
from utils.data.fashion_mnist import save_test_images  # noqa: E402
from utils.data.loaders import calibration_batches, data_spec, eval_loader  # noqa: E402
from utils.data.preprocess import Preprocess, list_images  # noqa: E402
from utils.deploy.artifacts import evaluate_loaded, load_for_eval  # noqa: E402
from utils.deploy.export import export_artifact  # noqa: E402
from utils.deploy.quantize import quantize_onnx_int8  # noqa: E402
from utils.deploy.runtime import OnnxModel  # noqa: E402
from utils.errors import InputError  # noqa: E402

FORMAT_COLUMNS = [("model", "model"), ("format", "format"), ("compute", "compute"), ("size_mb", "size (MB)"),
                  ("acc1_pct", "acc@1 (%)"), ("acc5_pct", "acc@5 (%)"), ("latency_ms", "latency (ms, batch 1)"),
                  ("throughput_img_s", "throughput (img/s)"), ("speed_batch_size", "batch")]
REGISTRY_COLUMNS = [("model", "model"), ("exporter", "exporter"), ("opset", "opset"), ("max_abs_diff", "parity max |diff|"),
                    ("file_mb", "file (MB)"), ("export_s", "export (s)"), ("latency_b1_ms", "ORT latency b1 (ms)"),
                    ("latency_b64_ms", "ORT latency b64 (ms)")]
PREDICT_COLUMNS = [("model", "model"), ("target", "command"), ("wall_s", "process wall time (s)"),
                   ("load_ms", "model load (ms)"), ("inference_ms", "inference (ms)")]


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--weights", nargs="+", default=[], metavar="CKPT", help="checkpoints written by train.py")
    p.add_argument("--registry", action="store_true", help="also export every registry network with both ONNX exporters")
    p.add_argument("--registry_size", type=cli.positive(), default=28, help="--registry: input size in px (random init)")
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
    pt2_path = export_artifact(model, info, weights, "pt2", work / f"{name}.pt2", log=quiet).path
    ts_path = export_artifact(model, info, weights, "torchscript", work / f"{name}.pt", log=quiet, note=quiet).path
    fp16 = [export_artifact(model, info, weights, engine, work / f"{name}_fp16{suffix}", half=True, log=quiet).path
            for engine, suffix in (("onnx", ".onnx"), ("pt2", ".pt2"))]
    batches = calibration_batches(spec, pre, args.calib_batches, args.batch_size)
    int8_path = quantize_onnx_int8(onnx_path, work / f"{name}_int8.onnx", batches, {"precision": "int8"})
    targets = [Path(weights), onnx_path, *fp16, int8_path, pt2_path, ts_path]

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
        ("predict.py --model <.pt2>", [py, "predict.py", "--model", str(pt2_path), "--image", str(image), "--json",
                                       "--device", "cpu"]),
        ("predict.py --model <.pt TorchScript>", [py, "predict.py", "--model", str(ts_path), "--image", str(image), "--json",
                                                  "--device", "cpu"]),
        ("predict.py --model <.pth>", [py, "predict.py", "--model", str(weights), "--image", str(image), "--json",
                                       "--device", "cpu"]),
    ):
        timing = time_predict(cmd, args.predict_runs)
        predict_rows.append({"model": name, "target": target, "image": str(image), **timing})
        print(f"  {target:<40} {timing['wall_s']:.2f} s per process", flush=True)
    return rows, predict_rows


def ort_latency_ms(session: OnnxModel, x, repeats: int) -> float:
    session(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_registry(args, work: Path) -> list[dict]:
    """Every registry network, random init, through both ONNX exporters: the numbers docs/deploy.md quotes."""
    import numpy as np

    rows = []
    size = args.registry_size
    source = work / "random_init.pth"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"random-init stand-in, only hashed into the metadata")
    for name in MODEL_NAMES:
        torch.manual_seed(0)
        model = build_model(name, 10, **model_kwargs(size)).eval()
        from utils.model_info import ModelInfo

        info = ModelInfo(name, [f"c{i}" for i in range(10)], Preprocess.for_size(size))
        x1, x64 = (np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32) for n in (1, 64))
        for exporter in ("dynamo", "legacy"):
            path = work / f"{name}_{exporter}.onnx"
            start = time.perf_counter()
            result = export_artifact(model, info, source, "onnx", path, exporter=exporter, log=lambda *_: None,
                                     note=lambda *_: None)
            export_s = time.perf_counter() - start
            session = OnnxModel(path, "cpu", threads=args.threads)
            row = {"model": name, "exporter": exporter, "opset": int(session.metadata["opset"]), "size_px": size,
                   "max_abs_diff": f"{result.parity.max_abs_diff:.2g}", "file_mb": result.size_mb, "export_s": export_s,
                   "latency_b1_ms": ort_latency_ms(session, x1, args.repeats),
                   "latency_b64_ms": ort_latency_ms(session, x64, max(3, args.repeats // 4))}
            rows.append(row)
            print(f"  {name:<20} {exporter:<7} export {export_s:.1f} s, b1 {row['latency_b1_ms']:.2f} ms, "
                  f"b64 {row['latency_b64_ms']:.1f} ms, max |diff| {row['max_abs_diff']}", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.weights and not args.registry:
        raise InputError("give --weights CKPT ... and/or --registry")
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
        registry = bench_registry(args, work / "registry") if args.registry else []
    info = machine_info(torch.device("cpu"))
    note = contention_note(meter, os.cpu_count() or 1)
    command = command_line("bench_deploy.py", argv)
    out = write_json(args.out, {"command": command, "machine": info, "contention": note, "threads": args.threads,
                                "formats": rows, "predict": predict_rows, "registry": registry})
    print(f"\n{command}\n")
    print(f"CPU: {info['cpu']}, {info['cores']} cores, torch threads {torch.get_num_threads()}"
          f"{', ONNX Runtime threads ' + str(args.threads) if args.threads else ''}"
          + (f"; {rows[0]['num_images']} validation images" if rows else "") + "\n")
    if rows:
        print(table(rows, FORMAT_COLUMNS))
        print()
        print(table(predict_rows, PREDICT_COLUMNS))
    if registry:
        print(f"\nregistry networks, random init at {args.registry_size} px:\n")
        print(table(registry, REGISTRY_COLUMNS))
    if note:
        print(f"\n{note}")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
