"""Training throughput: images/s of full training steps (data loading + forward + backward + optimizer step).

Every combination of --models x --img_sizes x --precisions x --memory_formats x --pipelines (x --compile)
is timed with train.py's own loop (utils.training.engine.train_one_epoch) on Fashion-MNIST, and compared with
the seed's setup measured in the same run: per-image PIL transforms in DataLoader workers, 224 px,
fp32, NCHW ("seed baseline" row, one per model). Each row: warm-up steps (untimed; they include
torch.compile's compilation), then the median of --repeats timings of --steps steps.

How close to the machine: each row's achieved GFLOP/s = images/s x 3 x the forward FLOPs of one image (the toolkit's
own count: FlopCounterMode's conv + matmul FLOPs, 2 x MACs; backward ~ 2 x forward), and its share of the peak of
the same precision, measured in the same run by a large fp32 and bf16 matrix product on the same threads.

Examples:
  python benchmarks/bench_train.py --data_root /tmp/fm
  python benchmarks/bench_train.py --models custom --img_sizes 28 --precisions bf16 --memory_formats channels_last
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.common import OtherLoad, Take, command_line, contention_note, machine_info, matmul_peaks, table, write_json  # noqa: E402
from models import MODEL_NAMES, build_model, model_kwargs  # noqa: E402
from utils import cli  # noqa: E402
from utils.analysis.complexity_tools import registry_macs  # noqa: E402
from utils.data.datasets import build_transform  # noqa: E402
from utils.data.fashion_mnist import fashion_mnist  # noqa: E402
from utils.data.preprocess import Preprocess  # noqa: E402
from utils.data.tensor_pipeline import TensorTrainLoader, train_images_tensor  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.precision import bf16_native  # noqa: E402
from utils.training.engine import TrainState, train_one_epoch  # noqa: E402
from utils.training.optim import build_optimizer  # noqa: E402
from utils.training.schedule import WarmupSchedule  # noqa: E402

SEED = {"img_size": 224, "precision": "fp32", "memory_format": "nchw", "pipeline": "pil", "compile": "off"}
COLUMNS = [("model", "model"), ("img_size", "img px"), ("precision", "precision"), ("memory_format", "memory"),
           ("pipeline", "pipeline"), ("compile", "compile"), ("batch_size", "batch"), ("images_per_s", "train img/s"),
           ("vs_seed", "x seed"), ("gflops", "GFLOP/s"), ("percent_of_peak", "% peak"), ("warmup_s", "warm-up s"),
           ("note", "note")]


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--models", nargs="+", default=["custom", "resnet18"], choices=MODEL_NAMES, help="networks to time")
    p.add_argument("--img_sizes", nargs="+", type=cli.positive(), default=[224, 28],
                   help="crop sizes; 28 = native Fashion-MNIST (the ResNet/MobileNet small-input stem switches on at <= 64)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="bf16 = bfloat16 autocast (train.py --fp16 on CPU)")
    p.add_argument("--memory_formats", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"],
                   help="channels_last = train.py --channels_last")
    p.add_argument("--pipelines", nargs="+", default=["pil", "tensor"], choices=["pil", "tensor"],
                   help="train.py --data_pipeline: per-image PIL in DataLoader workers, or batched tensor augmentation")
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"], help="torch.compile the model (train.py --compile)")
    p.add_argument("--batch_size", nargs="+", type=cli.positive(), default=[64],
                   help="images per training step: one value, or one per --img_sizes (small images want big batches)")
    p.add_argument("--baseline_batch_size", type=cli.positive(), default=64, help="batch of the seed-baseline rows (the seed's 64)")
    p.add_argument("--steps", type=cli.positive(), default=10, help="timed training steps per repeat")
    p.add_argument("--warmup", type=cli.non_negative(), default=3, help="untimed steps first (they include torch.compile's compilation)")
    p.add_argument("--repeats", type=cli.positive(), default=3, help="timed repeats; the median is reported")
    p.add_argument("--num_workers", type=cli.non_negative(), default=2,
                   help="DataLoader workers of the PIL pipeline (the seed used workers)")
    p.add_argument("--threads", type=cli.non_negative(), default=0, help="torch intra-op threads in the main process (0 = torch's default)")
    p.add_argument("--peak_size", type=cli.non_negative(), default=2048,
                   help="n of the n x n x n fp32/bf16 matmuls measuring the machine's peak (0 = no peak column)")
    p.add_argument("--data_root", default="data", help="Fashion-MNIST location (<data_root>/FashionMNIST/raw/)")
    cli.add_device_arg(p)
    p.add_argument("--no_baseline", action="store_true", help="skip the seed-baseline rows (no 'x seed' column)")
    p.add_argument("--out", default="results/benchmarks/bench_train.json", help="JSON file with every row and the machine")
    return p.parse_args(argv)


def endless(loader):
    while True:
        yield from loader


def row_configs(args) -> list[dict]:
    """Seed baseline first (one per model), then the grid; the grid's copy of the baseline is not repeated."""
    rows = []
    for model in args.models:
        if not args.no_baseline:
            rows.append(dict(SEED, model=model, baseline=True, batch_size=args.baseline_batch_size))
        for size, precision, memory, pipeline, compiled in itertools.product(
                args.img_sizes, args.precisions, args.memory_formats, args.pipelines, args.compile):
            config = {"model": model, "img_size": size, "precision": precision, "memory_format": memory,
                      "pipeline": pipeline, "compile": compiled}
            batch = args.batch_size[0] if len(args.batch_size) == 1 else args.batch_size[args.img_sizes.index(size)]
            if args.no_baseline or any(config[k] != v for k, v in SEED.items()) or batch != args.baseline_batch_size:
                rows.append(dict(config, baseline=False, batch_size=batch))
    return rows


def build_loader(config: dict, args, device: torch.device, cache: dict):
    pre = Preprocess.for_size(config["img_size"])
    if config["pipeline"] == "pil":
        dataset = fashion_mnist(args.data_root, True, build_transform(pre, train=True))
        return DataLoader(dataset, batch_size=config["batch_size"], shuffle=True, num_workers=args.num_workers, drop_last=True,
                          pin_memory=device.type == "cuda")
    if "tensor" not in cache:
        cache["tensor"] = train_images_tensor(fashion_mnist(args.data_root, True), pre)
    images, targets = cache["tensor"]
    sampler = torch.utils.data.RandomSampler(range(len(targets)))
    return TensorTrainLoader(images, targets, pre, sampler, config["batch_size"], device, drop_last=True)


def measure(config: dict, args, device: torch.device, cache: dict) -> dict:
    """Warm-up, then the median images/s of `repeats` runs of `steps` full training steps."""
    size, bf16, channels_last = config["img_size"], config["precision"] == "bf16", config["memory_format"] == "channels_last"
    model = build_model(config["model"], 10, **model_kwargs(size)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config["compile"] == "on":
        model = torch.compile(model)
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, momentum=0.9)  # train.py's default optimizer
    schedule = WarmupSchedule(optimizer, steps_per_epoch=1, max_epoch=1, wp_epoch=0, base_lr=1e-3, min_lr=1e-3)  # constant LR
    state = TrainState(optimizer=optimizer, scheduler=schedule, amp=bf16, amp_dtype="bfloat16" if bf16 else "auto",
                       channels_last=channels_last)
    criterion = nn.CrossEntropyLoss()
    batches = endless(build_loader(config, args, device, cache))
    try:
        start = time.perf_counter()
        if args.warmup > 0:
            train_one_epoch(model, Take(batches, args.warmup), criterion, state, device, 0, False)
        warmup_s = time.perf_counter() - start
        rates = [train_one_epoch(model, Take(batches, args.steps), criterion, state, device, 0, False)["images_per_s"]
                 for _ in range(args.repeats)]
    finally:
        batches.close()  # shuts DataLoader workers down
    note = "bf16 emulated (no AVX-512 BF16/AMX)" if bf16 and not bf16_native(device) else ""
    return dict(config, images_per_s=statistics.median(rates), repeats_images_per_s=rates,
                warmup_s=round(warmup_s, 2), note=note)


def add_gflops(rows: list[dict], peaks: dict[str, float | None]) -> None:
    """Each row's forward MACs per image, achieved GFLOP/s of its training steps and % of its precision's peak."""
    macs: dict[tuple[str, int], float | None] = {}
    for r in rows:
        key = (r["model"], r["img_size"])
        if key not in macs:
            macs[key] = registry_macs(r["model"], 10, model_kwargs(r["img_size"]), r["img_size"])
        r["macs_per_image"] = macs[key]
        r["gflops"] = r["images_per_s"] * 3 * 2 * macs[key] / 1e9 if macs[key] else None
        peak = peaks.get(r["precision"])
        r["percent_of_peak"] = 100 * r["gflops"] / peak if r["gflops"] and peak else None


def main(argv=None) -> int:
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.warmup < 0 or args.num_workers < 0:
        raise InputError("--warmup and --num_workers must be >= 0")
    if len(args.batch_size) not in (1, len(args.img_sizes)):
        raise InputError(f"--batch_size: give one value or one per --img_sizes ({len(args.img_sizes)}), got {len(args.batch_size)}")
    fashion_mnist(args.data_root, True)  # fails early with a clear message when the data is missing
    meter = OtherLoad()
    machine = machine_info(device)
    configs = row_configs(args)
    rows, cache = [], {}
    for k, config in enumerate(tqdm(configs, desc="bench_train", disable=not sys.stderr.isatty())):
        rows.append(measure(config, args, device, cache))
        if not sys.stderr.isatty():  # a log file still shows progress
            print(f"[{k + 1}/{len(configs)}] {' '.join(str(config[key]) for key, _ in COLUMNS[:7])}: "
                  f"{rows[-1]['images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    peaks = matmul_peaks(args.peak_size, device) if args.peak_size else {}
    add_gflops(rows, peaks)
    baselines = {r["model"]: r["images_per_s"] for r in rows if r["baseline"]}
    for r in rows:
        r["vs_seed"] = r["images_per_s"] / baselines[r["model"]] if r["model"] in baselines else None
        if r["baseline"]:
            r["note"] = ("seed baseline; " + r["note"]).rstrip("; ")
    note = contention_note(meter, machine["cores"])
    command = command_line("bench_train.py", argv)
    print(f"## Training throughput ({machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
          f"torch {machine['torch']}, device {device})\n")
    print(table(rows, COLUMNS))
    print(f"\nimages/s = median of {args.repeats} x {args.steps} steps of the batch shown (data loading + forward + "
          f"backward + AdamW step); x seed = ratio to the seed baseline row of the same model.\n"
          f"GFLOP/s = train img/s x 3 x forward FLOPs per image (conv + matmul, 2 x MACs); % peak = of the "
          f"{args.peak_size} x {args.peak_size} matmul of the same precision in this run: "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" if v else f"{k} not native" for k, v in peaks.items()))
    if note:
        print(note)
    print(f"command: {command}")
    out = write_json(args.out, {"benchmark": "train", "command": command, "machine": machine, "other_processes_cores": meter.cores(),
                                "contention": note, "settings": vars(args), "peaks_gflops": peaks, "rows": rows})
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
