"""Inference speed on the CPU: batch-1 latency and batched throughput per engine, as a share of the compute bound.

Engines: PyTorch eager (fp32, NCHW), eager with channels_last + bfloat16 autocast, TorchScript (the
artifact export.py writes), ONNX Runtime FP32 (export.py's ONNX) and ONNX Runtime INT8 (quantize.py's
static QDQ quantization, per-channel int8 weights, calibrated here on random normalised batches: speed
does not depend on the calibration data). Models have random weights: speed does not depend on them either.

The compute bound: each model's MACs per image from torch.utils.flop_counter.FlopCounterMode (FLOPs of
convolutions and matrix products; MACs = FLOPs / 2) and this machine's measured peak, the median speed of a
large matrix product or a large 3x3 convolution, whichever is faster (fp32, bf16; int8 -> int32 via
torch._int_mm). "% of peak" = achieved FLOP/s
(throughput x FLOPs per image) / the peak of the engine's compute type.

Examples:
  python benchmarks/bench_infer.py
  python benchmarks/bench_infer.py --models custom --img_sizes 28 --engines eager onnx_fp32 onnx_int8
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.common import OtherLoad, command_line, contention_note, machine_info, table, write_json  # noqa: E402
from models import MODEL_NAMES, build_model, model_kwargs  # noqa: E402
from utils import cli  # noqa: E402
from utils.analysis.complexity_tools import run_flop_counter  # noqa: E402
from utils.data.preprocess import Preprocess  # noqa: E402
from utils.precision import bf16_native  # noqa: E402
from utils.timing import latency_and_throughput, median_seconds  # noqa: E402

ENGINES = ("eager", "eager_bf16_cl", "torchscript", "onnx_fp32", "onnx_int8")
COMPUTE_TYPE = {"eager": "fp32", "eager_bf16_cl": "bf16", "torchscript": "fp32", "onnx_fp32": "fp32", "onnx_int8": "int8"}
ENGINE_LABEL = {"eager": "PyTorch eager", "eager_bf16_cl": "eager channels_last + bf16", "torchscript": "TorchScript",
                "onnx_fp32": "ONNX Runtime FP32", "onnx_int8": "ONNX Runtime INT8 (QDQ)"}
COLUMNS = [("model", "model"), ("img_size", "img px"), ("engine_label", "engine"), ("compute", "compute"),
           ("mmacs_per_image", "MMACs/img"), ("latency_ms", "batch-1 ms"), ("throughput_img_s", "img/s"),
           ("speed_batch_size", "batch"), ("achieved_gflops", "achieved GFLOP/s"), ("peak_gflops", "peak GFLOP/s"),
           ("percent_of_peak", "% of peak")]


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--models", nargs="+", default=["custom", "resnet18"], choices=MODEL_NAMES, help="networks to time")
    p.add_argument("--img_sizes", nargs="+", type=cli.positive(), default=[224, 28],
                   help="input sizes; 28 = native Fashion-MNIST (small-input stem for ResNet/MobileNet at <= 64)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES, help="inference engines to time")
    p.add_argument("--batch_size", type=cli.positive(), default=32, help="batch size of the throughput measurement")
    p.add_argument("--warmup", type=cli.non_negative(), default=3, help="untimed calls before timing")
    p.add_argument("--repeats", type=cli.positive(), default=10, help="timed calls (median; half as many for the big batch)")
    p.add_argument("--calibration_batches", type=cli.positive(), default=4, help="random batches calibrating INT8 ranges")
    p.add_argument("--peak_size", type=cli.positive(), default=2048, help="side of the square matrices timing the peak")
    p.add_argument("--threads", type=cli.non_negative(), default=0, help="torch and ONNX Runtime intra-op threads (0 = torch's default)")
    p.add_argument("--workdir", default=None, help="where exported artifacts go (default: a temporary folder, deleted)")
    p.add_argument("--out", default="results/benchmarks/bench_infer.json", help="JSON file with every row and the machine")
    return p.parse_args(argv)


def measured_peaks(n: int, warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) per compute type: the faster of an n x n x n matrix product and a large 3x3
    convolution in channels_last (oneDNN). Both count, because on some CPUs one library reaches the FMA peak
    and the other does not (MKL's fp32 GEMM runs at about half of oneDNN's convolutions on AMD Zen 5)."""
    peaks = {}
    channels = max(16, min(256, n // 8))
    conv_flops = 2 * 8 * 56 * 56 * channels * channels * 9
    for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        mm = 2 * n ** 3 / median_seconds(lambda a=a, b=b: torch.mm(a, b), warmup, repeats) / 1e9
        x = torch.randn(8, channels, 56, 56).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            conv = conv_flops / median_seconds(lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1), warmup, repeats) / 1e9
        peaks[kind] = max(mm, conv)
    a, b = (torch.randint(-128, 127, (n, n), dtype=torch.int8) for _ in range(2))
    try:
        peaks["int8"] = 2 * n ** 3 / median_seconds(lambda: torch._int_mm(a, b), warmup, repeats) / 1e9
    except RuntimeError:  # builds without a CPU int8 GEMM
        peaks["int8"] = None
    return peaks


def torch_engine(model: torch.nn.Module, engine: str, pre: Preprocess, workdir: Path, name: str):
    """A forward taking a torch batch, for the PyTorch-side engines."""
    if engine == "eager":
        def forward(x):
            with torch.inference_mode():
                return model(x)
        return forward
    if engine == "eager_bf16_cl":
        fast = copy.deepcopy(model).to(memory_format=torch.channels_last)

        def forward(x):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return fast(x.contiguous(memory_format=torch.channels_last))
        return forward
    from utils.deploy.artifacts import load_torchscript
    from utils.deploy.export import write_torchscript

    path = workdir / f"{name}_{pre.img_size}.pt"
    write_torchscript(copy.deepcopy(model), path, pre, {"model_name": name}, half=False)
    program, _ = load_torchscript(path)

    def forward(x):
        with torch.inference_mode():
            return program(x)
    return forward


def onnx_engine(model: torch.nn.Module, engine: str, pre: Preprocess, workdir: Path, name: str, args, threads: int):
    """A forward taking a numpy batch, for ONNX Runtime FP32 / INT8 (CPU execution provider)."""
    from utils.deploy.export import write_onnx
    from utils.deploy.runtime import OnnxModel

    fp32 = workdir / f"{name}_{pre.img_size}.onnx"
    if not fp32.is_file():
        meta = {"model_name": name, "source_checkpoint": "random weights (benchmark)"}
        write_onnx(copy.deepcopy(model), fp32, pre, meta, opset=17, dynamic_size=False, half=False, exporter="legacy")
    path = fp32
    if engine == "onnx_int8":
        from utils.deploy.quantize import quantize_onnx_int8

        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(2, pre.channels, pre.img_size, pre.img_size, generator=generator)
                   for _ in range(args.calibration_batches)]
        path = quantize_onnx_int8(fp32, workdir / f"{name}_{pre.img_size}_int8.onnx", batches, {"precision": "int8"})
    return OnnxModel(path, device="cpu", threads=threads).raw


def bench_model(name: str, size: int, args, workdir: Path, threads: int) -> list[dict]:
    pre = Preprocess.for_size(size)
    model = build_model(name, 10, **model_kwargs(size)).eval()
    macs = run_flop_counter(model, (pre.channels, size, size)).macs
    rng = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, pre.channels, size, size, generator=rng)
    xn = torch.randn(args.batch_size, pre.channels, size, size, generator=rng)
    rows = []
    for engine in args.engines:
        if engine.startswith("onnx"):
            forward = onnx_engine(model, engine, pre, workdir, name, args, threads)
            speed = latency_and_throughput(forward, x1.numpy(), xn.numpy(), args.warmup, args.repeats)
        else:
            forward = torch_engine(model, engine, pre, workdir, name)
            speed = latency_and_throughput(forward, x1, xn, args.warmup, args.repeats)
        compute = COMPUTE_TYPE[engine]
        achieved = speed["throughput_img_s"] * 2 * macs / 1e9
        rows.append({"model": name, "img_size": size, "engine": engine, "engine_label": ENGINE_LABEL[engine],
                     "compute": compute, "macs_per_image": macs, "flops_per_image": 2 * macs,
                     "mmacs_per_image": macs / 1e6, **speed, "achieved_gflops": achieved})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device("cpu")
    meter = OtherLoad()
    machine = machine_info(device)
    peaks = measured_peaks(args.peak_size)  # measured again at the end: on a shared CPU the faster of the two counts
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        jobs = [(m, s) for m in args.models for s in args.img_sizes]
        for name, size in tqdm(jobs, desc="bench_infer", disable=not sys.stderr.isatty()):
            rows.extend(bench_model(name, size, args, workdir, threads))
    again = measured_peaks(args.peak_size)
    peaks = {k: max(v, again[k]) if v and again[k] else v or again[k] for k, v in peaks.items()}
    for r in rows:
        r["peak_gflops"] = peaks.get(r["compute"])
        r["percent_of_peak"] = 100 * r["achieved_gflops"] / r["peak_gflops"] if r["peak_gflops"] else None
    note = contention_note(meter, machine["cores"])
    command = command_line("bench_infer.py", argv)
    peak_text = ", ".join(f"{k} {v:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in peaks.items() if v)
    print(f"## Inference speed ({machine['cpu']}, {machine['cores']} cores, {threads} threads, torch {machine['torch']})\n")
    print(table(rows, COLUMNS))
    print(f"\nMeasured peak (faster of a {args.peak_size}^3 matrix product and a large 3x3 convolution; int8: matrix "
          f"product; best of a run before and after): {peak_text}"
          + ("" if bf16_native(device) else " (bf16 emulated on this CPU)")
          + f". MACs: FlopCounterMode (convolutions and matrix products; MACs = FLOPs / 2). img/s at batch "
          f"{args.batch_size}; batch-1 latency = median of {args.repeats} calls after {args.warmup} warm-up calls. "
          "Over 100% means the engine does fewer multiplications than the direct count (e.g. Winograd 3x3 "
          "convolutions) or ran while the shared CPU was less busy than during the peak measurement.")
    if note:
        print(note)
    print(f"command: {command}")
    out = write_json(args.out, {"benchmark": "infer", "command": command, "machine": machine, "other_processes_cores": meter.cores(),
                                "contention": note, "peaks_gflops": peaks, "settings": vars(args), "rows": rows})
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
