"""Training on photos: epoch images/s of the PIL pipeline vs the decode-once cache (cold: the build included; warm),
and the held-out accuracy both reach, in one run on one synthetic folder of photo-sized JPEGs.

The folder (made once under --workdir, reused while its parameters match): --images JPEGs of 500x375 px at quality
90 in 10 classes of visibly different content, all derived from the real pictures matplotlib ships as sample data
(a photograph, a terrain elevation model, a bathymetry grid, an MRI slice): crops at random positions and scales,
flips, colour shifts and noise of them, see CLASSES. --val_fraction of each class is held out.

At each crop size of --img_sizes and per model, the same network (same seed) is trained for --epochs epochs twice:
with per-image PIL transforms in --num_workers DataLoader workers (train.py --data_pipeline pil), and from the cache
(train.py --cache auto: the cache folder is emptied first, so epoch 1 includes decoding every image once; later epochs
read the warm cache). Rows:
PIL = mean images/s of epochs 2..E (epoch 1 when E = 1), cache cold = train images / (cache build + epoch 1), cache
warm = mean of epochs 2..E; x PIL = ratio to the PIL row of the same model. Accuracy: acc@1 on the held-out
split after the last epoch (eval transform; the cache's val crops are bit-identical to it). Models not in
--accuracy_models (ResNet18 by default: ~10 img/s on 2 cores, an epoch takes minutes) are timed over
--timed_batches batches per pipeline and their epoch time extrapolated. The "(data only)" rows iterate one epoch of
the train loader without a network: what the data path itself delivers. The "network only" row feeds the same
training loop one ready batch over and over: the ceiling no data pipeline can pass, so "x PIL" of that row is the
most any cache could gain for that model at that size.

Examples:
  python benchmarks/bench_photos.py
  python benchmarks/bench_photos.py --images 600 --epochs 2 --models custom --img_sizes 64
"""

from __future__ import annotations

import itertools
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.common import OtherLoad, Take, command_line, contention_note, machine_info, table, write_json  # noqa: E402
from benchmarks.photo_folder import CLASSES, JPEG_QUALITY, PHOTO_SIZE, make_photo_folder  # noqa: E402
from models import MODEL_NAMES, build_model, model_kwargs  # noqa: E402
from utils import cli  # noqa: E402
from utils.data.augment import resolve_augment  # noqa: E402
from utils.data.cache import cached_split  # noqa: E402
from utils.data.datasets import DataSpec, build_datasets  # noqa: E402
from utils.data.preprocess import Preprocess  # noqa: E402
from utils.data.tensor_pipeline import TensorEvalLoader, TensorTrainLoader  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.evaluation.loop import evaluate  # noqa: E402
from utils.precision import bf16_native  # noqa: E402
from utils.training.engine import TrainState, train_one_epoch  # noqa: E402
from utils.training.optim import build_optimizer  # noqa: E402
from utils.training.schedule import WarmupSchedule  # noqa: E402

COLUMNS = [("model", "model"), ("px", "px"), ("pipeline", "pipeline"), ("images_per_s", "train img/s"), ("vs_pil", "x PIL"),
           ("epoch_s", "epoch s"), ("build_s", "cache build s"), ("val_acc1", "held-out acc@1"), ("note", "note")]


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--images", type=cli.positive(), default=2000, help="JPEGs in the folder (train + held-out val)")
    p.add_argument("--epochs", type=cli.positive(), default=3, help="training epochs per model and pipeline (>= 2 for a warm row)")
    p.add_argument("--models", nargs="+", default=["custom", "resnet18"], choices=MODEL_NAMES,
                   help="networks (custom = FashionCNN)")
    p.add_argument("--img_sizes", type=cli.positive(), nargs="+", default=[224, 64],
                   help="crop sizes fed to the network, one table block each (224: the usual photo size, where the network "
                        "sets the pace on a CPU; 64: small crops, where decoding the photos does)")
    p.add_argument("--batch_size", type=cli.positive(), default=32, help="images per training step")
    p.add_argument("--num_workers", type=cli.non_negative(), default=2, help="DataLoader workers of the PIL pipeline (train.py's default)")
    p.add_argument("--val_fraction", type=cli.in_range(0, 1, low_open=True, high_open=True), default=0.15,
                   help="share of each class held out for the accuracy")
    p.add_argument("--base_lr", type=cli.positive(float), default=1e-3, help="AdamW learning rate (cosine decay over the epochs)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 = bfloat16 autocast (train.py --fp16 on CPU) for both pipelines; auto = bf16 where the CPU "
                        "(or GPU) has it natively, else fp32")
    p.add_argument("--memory_format", default="channels_last", choices=["channels_last", "nchw"],
                   help="channels_last = train.py --channels_last (faster convolutions with bf16), for both pipelines")
    p.add_argument("--accuracy_models", nargs="*", default=["custom"], choices=MODEL_NAMES,
                   help="models trained for --epochs full epochs per pipeline and evaluated on the held-out split")
    p.add_argument("--timed_batches", type=cli.positive(), default=10,
                   help="the other models: training batches timed per pipeline (after one untimed batch)")
    p.add_argument("--seed", type=cli.non_negative(), default=0, help="seed of the folder's content and of the training runs")
    p.add_argument("--workdir", default="results/benchmarks/photos", help="where the JPEG folder and the cache go")
    cli.add_device_arg(p)
    p.add_argument("--out", default="results/benchmarks/bench_photos.json", help="JSON file with every row and the machine")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.images < 2 * len(CLASSES):
        raise InputError(f"--images must be at least {2 * len(CLASSES)} (one train and one val image per class), got {args.images}")
    return args


# ----------------------------------------------------------------------------- one training run


def build_loaders(pipeline: str, args, root: Path, size: int, device: torch.device, fresh: bool = True):
    """(train loader, val loader, sampler, cache build seconds, number of classes) of one pipeline at `size` px; the
    cache pipeline starts from an empty cache folder when `fresh`, so its build is measured every time."""
    pre = Preprocess.for_size(size)
    augment = resolve_augment("auto", size)
    train_set, val_set, classes = build_datasets(DataSpec(str(root)), pre, verify=False, augment=augment)
    sampler = RandomSampler(train_set, generator=torch.Generator())
    if pipeline == "pil":
        train = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                           drop_last=True, pin_memory=device.type == "cuda")
        val = DataLoader(val_set, batch_size=2 * args.batch_size, num_workers=args.num_workers)
        return train, val, sampler, 0.0, len(classes)
    cache_dir = Path(args.workdir) / "cache"
    if fresh:
        shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    images, targets, _ = cached_split(train_set, pre, "train", cache_dir, not args.quiet)
    build_s = time.perf_counter() - start
    train = TensorTrainLoader(torch.from_numpy(images), torch.from_numpy(targets), pre, sampler, args.batch_size, device,
                              True, augment)
    val_images, val_targets, _ = cached_split(val_set, pre, "val", cache_dir, not args.quiet)
    val = TensorEvalLoader(torch.from_numpy(val_images), torch.from_numpy(val_targets), pre, 2 * args.batch_size, device)
    return train, val, sampler, build_s, len(classes)


def data_only(pipeline: str, args, root: Path, size: int, device: torch.device) -> dict:
    """One epoch of the train loader alone (decode/augment, no network): the data path's own images/s."""
    train, _, sampler, build_s, _ = build_loaders(pipeline, args, root, size, device)
    sampler.generator.manual_seed(args.seed)
    start = time.perf_counter()
    count = sum(len(targets) for _, targets in tqdm(train, desc=f"data only ({pipeline}, {size} px)", disable=args.quiet,
                                                    leave=False))
    return {"seconds": time.perf_counter() - start, "images": count, "build_s": build_s}


def trainer(model_name: str, args, size: int, num_classes: int, steps_per_epoch: int, epochs: int,
            device: torch.device) -> tuple[nn.Module, TrainState]:
    """The network (seeded) and the loop state every row of one model trains with: AdamW, cosine decay, the
    benchmark's precision and memory format."""
    torch.manual_seed(args.seed)
    model = build_model(model_name, num_classes, **model_kwargs(size)).to(device)
    channels_last = args.memory_format == "channels_last"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, "adamw", lr=args.base_lr, weight_decay=0.05, momentum=0.9)
    schedule = WarmupSchedule(optimizer, steps_per_epoch=steps_per_epoch, max_epoch=epochs, wp_epoch=0, base_lr=args.base_lr,
                              min_lr=args.base_lr / 100)
    bf16 = args.precision == "bf16"
    state = TrainState(optimizer=optimizer, scheduler=schedule, amp=bf16, amp_dtype="bfloat16" if bf16 else "auto",
                       channels_last=channels_last)
    return model, state


def train_run(model_name: str, pipeline: str, args, root: Path, size: int, device: torch.device) -> dict:
    """One model on one pipeline from the same seed: --epochs full epochs and the held-out acc@1 (models in
    --accuracy_models), or --timed_batches batches after one untimed batch (the others: too slow for full epochs
    on a few cores; their epoch time is extrapolated from the measured rate)."""
    train, val, sampler, build_s, num_classes = build_loaders(pipeline, args, root, size, device)
    full = model_name in args.accuracy_models
    epochs = args.epochs if full else 1
    model, state = trainer(model_name, args, size, num_classes, len(train), epochs, device)
    criterion = nn.CrossEntropyLoss()
    epoch_s, timed = [], []
    for epoch in range(epochs):
        sampler.generator.manual_seed(args.seed + epoch)
        torch.manual_seed(args.seed + 1000 + epoch)
        if full:
            start = time.perf_counter()
            train_one_epoch(model, train, criterion, state, device, epoch + 1, not args.quiet)
            epoch_s.append(time.perf_counter() - start)
        else:
            batches, n = iter(train), max(1, min(args.timed_batches, len(train) - 1))
            train_one_epoch(model, Take(batches, 1), criterion, state, device, 0, False)  # untimed: first-call costs
            start = time.perf_counter()
            train_one_epoch(model, Take(batches, n), criterion, state, device, 0, not args.quiet)
            timed = [time.perf_counter() - start, n * args.batch_size]
            del batches  # shuts the PIL workers down
    out = {"epoch_s": epoch_s, "images": len(train) * args.batch_size, "build_s": build_s, "full_epochs": full}
    if timed:
        out["timed_s"], out["timed_images"] = timed
        out["epoch_s"] = [out["images"] / (timed[1] / timed[0])] * 2  # extrapolated: epoch 1 (cold) and a later one
    if full:
        result = evaluate(model, val, device, num_classes, amp=state.amp, amp_dtype=state.amp_dtype,
                          channels_last=state.channels_last, show_progress=False)
        out["val_acc1"], out["val_images"] = result.acc1, len(val.dataset) if hasattr(val, "dataset") else len(val.targets)
    return out


def network_only(model_name: str, args, root: Path, size: int, device: torch.device) -> dict:
    """The ceiling of any data pipeline: the same training loop fed one ready batch over and over (no decoding, no
    augmentation), after one untimed batch: as many batches as an epoch for --accuracy_models, else --timed_batches."""
    train, _, sampler, _, num_classes = build_loaders("cache", args, root, size, device, fresh=False)  # any batch will do
    sampler.generator.manual_seed(args.seed)
    batch = next(iter(train))
    n = max(1, len(train) - 1 if model_name in args.accuracy_models else min(args.timed_batches, len(train) - 1))
    model, state = trainer(model_name, args, size, num_classes, n + 1, 1, device)
    criterion = nn.CrossEntropyLoss()
    repeated = itertools.repeat(batch)
    train_one_epoch(model, Take(repeated, 1), criterion, state, device, 0, False)
    start = time.perf_counter()
    train_one_epoch(model, Take(repeated, n), criterion, state, device, 0, False)
    return {"timed_s": time.perf_counter() - start, "timed_images": n * len(batch[1])}


def rows_for(model_name: str, size: int, pil: dict, cache: dict, ceiling: dict) -> list[dict]:
    """Network-only, PIL, cache cold and cache warm rows of one model at one size (steady state = epochs 2..E when
    there are two or more)."""

    def steady(run: dict) -> float:
        seconds = run["epoch_s"][1:] or run["epoch_s"]
        return sum(seconds) / len(seconds)

    n = pil["images"]
    pil_rate = n / steady(pil)
    ceiling_rate = ceiling["timed_images"] / ceiling["timed_s"]
    cold_s = cache["build_s"] + cache["epoch_s"][0]
    how = "" if pil["full_epochs"] else f"epoch extrapolated from {pil['timed_images']} images"
    rows = [
        {"model": model_name, "px": size, "pipeline": "network only", "images_per_s": ceiling_rate,
         "vs_pil": ceiling_rate / pil_rate, "epoch_s": n / ceiling_rate,
         "note": f"one ready batch repeated: the ceiling of any data path ({ceiling['timed_images']} images)"},
        {"model": model_name, "px": size, "pipeline": "PIL (workers)", "images_per_s": pil_rate, "vs_pil": 1.0,
         "epoch_s": steady(pil), "val_acc1": pil.get("val_acc1"), "note": how},
        {"model": model_name, "px": size, "pipeline": "cache cold", "images_per_s": n / cold_s, "vs_pil": n / cold_s / pil_rate,
         "epoch_s": cold_s, "build_s": cache["build_s"],
         "note": "epoch 1 incl. decoding every image once" + (f"; {how}" if how else "")},
    ]
    if len(cache["epoch_s"]) > 1:
        rows.append({"model": model_name, "px": size, "pipeline": "cache warm", "images_per_s": n / steady(cache),
                     "vs_pil": n / steady(cache) / pil_rate, "epoch_s": steady(cache), "val_acc1": cache.get("val_acc1"),
                     "note": how})
    else:
        rows[2]["val_acc1"] = cache.get("val_acc1")
    return rows


def size_rows(args, root: Path, size: int, device: torch.device) -> tuple[list[dict], dict, dict]:
    """Every row at one crop size: the data path alone, then each model (network only, PIL, cache cold, warm)."""
    data = {pipeline: data_only(pipeline, args, root, size, device) for pipeline in ("pil", "cache")}
    pil_rate = data["pil"]["images"] / data["pil"]["seconds"]
    cache_rate = data["cache"]["images"] / data["cache"]["seconds"]
    rows = [{"model": "(data only)", "px": size, "pipeline": "PIL (workers)", "images_per_s": pil_rate, "vs_pil": 1.0,
             "epoch_s": data["pil"]["seconds"], "note": "decode + augment, no network"},
            {"model": "(data only)", "px": size, "pipeline": "cache warm", "images_per_s": cache_rate,
             "vs_pil": cache_rate / pil_rate, "epoch_s": data["cache"]["seconds"], "build_s": data["cache"]["build_s"],
             "note": "read + augment, no network"}]
    runs = {}
    for model_name in args.models:
        ceiling = network_only(model_name, args, root, size, device)
        runs[model_name] = {pipeline: train_run(model_name, pipeline, args, root, size, device) for pipeline in ("pil", "cache")}
        runs[model_name]["network_only"] = ceiling
        rows += rows_for(model_name, size, runs[model_name]["pil"], runs[model_name]["cache"], ceiling)
        if not sys.stderr.isatty():
            print(f"[{model_name} at {size} px] done", file=sys.stderr, flush=True)
    return rows, runs, data


def main(argv=None) -> int:
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    if args.precision == "auto":
        args.precision = "bf16" if bf16_native(device) else "fp32"
    meter = OtherLoad()
    machine = machine_info(device)
    root = Path(args.workdir) / "folder"
    start = time.perf_counter()
    folder = make_photo_folder(root, args.images, args.val_fraction, args.seed, not args.quiet)
    make_s = time.perf_counter() - start
    rows, runs, data = [], {}, {}
    for size in args.img_sizes:
        size_table, runs[size], data[size] = size_rows(args, root, size, device)
        rows += size_table
    note = contention_note(meter, machine["cores"])
    command = command_line("bench_photos.py", argv)
    evaluated = [run for by_model in runs.values() for model_runs in by_model.values() for run in model_runs.values()
                 if "val_acc1" in run]
    n_val = evaluated[0]["val_images"] if evaluated else 0
    noise = max((math.sqrt(2 * r["val_acc1"] * (1 - r["val_acc1"]) / n_val) for r in evaluated), default=None)
    print(f"## Training on photos: PIL pipeline vs decode-once cache ({machine['cpu']}, {machine['cores']} cores, "
          f"bf16 native: {'yes' if machine['bf16_native'] else 'no'}, torch {machine['torch']}, device {device}, "
          f"{machine['time']})\n")
    print(table(rows, COLUMNS))
    print(f"\n{args.images} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} px (quality {JPEG_QUALITY}, {len(CLASSES)} classes, "
          f"made from {', '.join(s.split(': ')[1] for s in folder['sources'])} of matplotlib's sample data), "
          f"{data[args.img_sizes[0]]['pil']['images']} trained per epoch, {n_val} held out; "
          f"crops of {', '.join(map(str, args.img_sizes))} px, batch {args.batch_size}, "
          f"{args.precision}, {args.memory_format}, PIL with {args.num_workers} workers. Steady state = mean of epochs 2..{args.epochs} "
          f"({', '.join(args.accuracy_models) or 'no model'}: --epochs {args.epochs} full epochs, then held-out acc@1"
          + (f"; two runs' difference has a standard deviation of about {noise:.3f}, binomial over {n_val} images" if noise
             else "") + f"); other models: {args.timed_batches} timed batches per pipeline, epoch time extrapolated.")
    if note:
        print(f"\n{note}")
    print(f"\nreproduce: {command}")
    payload = {"rows": rows, "runs": runs, "machine": machine, "command": command, "folder": folder,
               "folder_seconds": round(make_s, 1), "accuracy_noise_sd": noise, "contention": note,
               "data_only": data, "precision": args.precision}
    write_json(args.out, payload)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
