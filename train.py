"""Train an image classifier on Fashion-MNIST or an image folder.

Examples:
  python train.py --model custom --img_size 28 --max_epoch 5 --batch_size 128
  python train.py --model resnet18 --dataset path/to/folder --pretrained --fp16 --ema --tensorboard
  torchrun --nproc_per_node=2 train.py --model custom --img_size 28

Writes <path_to_save>/<dataset>/<model>/ with best.pth, last.pth, classes.txt, args.json,
results.csv and results.png; TensorBoard logs under logs/<dataset>/<model>/<time>/.
"""

from __future__ import annotations

import csv
import io
import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from models import MODEL_NAMES, build_model, model_kwargs
from models.norm import NORM_TYPES
from utils import cli
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.data.augment import AUGMENT_CHOICES, resolve_augment
from utils.data.datasets import DataSpec, build_datasets
from utils.data.preprocess import Preprocess
from utils.data.samplers import ShardSampler
from utils.data.tensor_pipeline import build_tensor_loaders, choose_pipeline
from utils.distributed import barrier, cleanup, init_distributed, is_main_process
from utils.ema import ModelEMA, unwrap
from utils.engine import TrainState, evaluate, train_one_epoch
from utils.errors import InputError
from utils.io import atomic_write_text
from utils.plots import plot_results
from utils.schedule import WarmupCosine
from utils.training.rng import rng_state, set_rng_state

CSV_COLUMNS = ["epoch", "lr", "train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5", "seconds"]


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("-m", "--model", default="custom", choices=MODEL_NAMES, help="network to train")
    p.add_argument("-p", "--pretrained", action="store_true",
                   help="start from torchvision's ImageNet weights (head replaced; nothing frozen)")
    p.add_argument("--freeze_backbone", action="store_true", help="train only the classification head")
    p.add_argument("--norm_type", default="BN", choices=NORM_TYPES, help="normalisation layers: BatchNorm, GroupNorm or none")
    p.add_argument("--img_size", type=cli.positive(), default=224,
                   help="crop size fed to the network; eval resizes to img_size*256/224 then centre-crops")
    p.add_argument("--small_input", default="auto", choices=["auto", "on", "off"],
                   help="stride-1 stem (ResNet: 3x3 conv, no max-pool) for small images; auto = on when img_size <= 64")
    p.add_argument("--augment", default="auto", choices=AUGMENT_CHOICES,
                   help="training augmentation: seed = RandomResizedCrop(scale 0.8-1) + RandomRotation(15) + flip (the "
                        "seed's recipe); light = flip only; none; auto = seed above 64 px, light at native sizes <= 64 px")
    p.add_argument("--random_erasing", type=float, default=0.0, metavar="P",
                   help="RandomErasing probability added to the policy (timm's --reprob; 0 = off)")
    cli.add_data_args(p)
    p.add_argument("--wp_epoch", type=int, default=1, help="warm-up epochs (LR rises linearly per iteration)")
    p.add_argument("--start_epoch", type=int, default=None,
                   help="epoch to start at (default: 0, or the one after the checkpoint's with --resume)")
    p.add_argument("--max_epoch", type=cli.positive(), default=10, help="total number of epochs")
    p.add_argument("--eval_epoch", type=cli.positive(), default=1, help="validate every N epochs (and after the last)")
    p.add_argument("--optimizer", default="adamw", choices=["sgd", "adam", "adamw"], help="optimizer")
    p.add_argument("--base_lr", type=cli.positive(float), default=3e-3,
                   help="peak learning rate after warm-up (3e-3 suits AdamW at batch 64-256; for SGD try 0.1)")
    p.add_argument("--min_lr", type=float, default=1e-6, help="learning rate at the end of the cosine decay")
    p.add_argument("--weight_decay", type=float, default=5e-2, help="weight decay (not applied to biases and norm layers)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (beta1 for Adam/AdamW)")
    p.add_argument("--accumulation", type=cli.positive(), default=1,
                   help="micro-batches per optimizer step (effective batch = batch_size * accumulation)")
    p.add_argument("--label_smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--clip_grad", type=float, default=0.0, help="clip the gradient norm to this value (0 = off)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights; validation and best.pth use it")
    p.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (warmed up as decay*(1-exp(-step/2000)))")
    p.add_argument("--fp16", action="store_true",
                   help="mixed precision: float16 autocast + GradScaler on CUDA; bfloat16 autocast on CPU")
    p.add_argument("--amp_dtype", default="auto", choices=["auto", "float16", "bfloat16"],
                   help="autocast dtype with --fp16 (auto = float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--channels_last", action="store_true", help="NHWC memory format (faster convolutions on AMX CPUs and tensor cores)")
    p.add_argument("--data_pipeline", default="auto", choices=["auto", "pil", "tensor"],
                   help="tensor = dataset held as one uint8 tensor, augmented in batches on --device (same recipe, much "
                        "faster on CPUs); pil = per-image PIL transforms in DataLoader workers; auto = tensor when the "
                        "images share one size and fit in memory (Fashion-MNIST always)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (first epoch pays minutes of compilation; see benchmarks/README.md)")
    p.add_argument("--cuda", action="store_true", help="require CUDA (error if there is no GPU)")
    cli.add_device_arg(p)
    p.add_argument("--seed", type=int, default=42, help="random seed (each epoch is seeded from it, so resumed runs repeat exactly)")
    p.add_argument("-r", "--resume", default=None, metavar="CKPT", help="continue from a last.pth (model, optimizer, EMA, RNG, epoch)")
    p.add_argument("--path_to_save", default="weights", help="runs go to <path_to_save>/<dataset>/<model>/")
    p.add_argument("--tensorboard", action="store_true", help="write TensorBoard logs under --log_dir")
    p.add_argument("--log_dir", default="logs", help="TensorBoard root: logs go to <log_dir>/<dataset>/<model>/<time>/")
    p.add_argument("--log_every", type=cli.positive(), default=50, help="training iterations per TensorBoard step point")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.base_lr, momentum=args.momentum, nesterov=args.momentum > 0)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=args.base_lr, betas=(args.momentum, 0.999))


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def main(argv=None) -> int:
    args = parse_args(argv)
    device = cli.resolve_device(args.device, require_cuda=args.cuda)
    rank, world, local_rank = init_distributed(device.type)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    main_proc = is_main_process()
    seed_everything(args.seed + rank)

    spec = DataSpec(args.dataset, args.data_root)
    pre = Preprocess.for_size(args.img_size)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None and ckpt["model_name"] != args.model:
        raise InputError(f"--resume checkpoint was trained as {ckpt['model_name']!r} but --model is {args.model!r}")
    augment = resolve_augment(args.augment, args.img_size, args.random_erasing)
    train_set, val_set, classes = build_datasets(spec, pre, augment=augment)
    num_classes = len(classes)

    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        per_rank = len(sampler)
    else:
        generator = torch.Generator()
        sampler = RandomSampler(train_set, generator=generator)
        per_rank = len(train_set)
    pin = device.type == "cuda"
    pipeline, pipeline_reason = choose_pipeline(args.data_pipeline, train_set, val_set, pre)
    if pipeline == "tensor":
        train_loader, val_loader = build_tensor_loaders(train_set, val_set, pre, sampler, batch_size=args.batch_size,
                                                        eval_batch_size=args.batch_size * 2, device=device,
                                                        drop_last=per_rank > args.batch_size,
                                                        val_indices=ShardSampler(len(val_set), rank, world), augment=augment)
    else:
        train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                                  pin_memory=pin, drop_last=per_rank > args.batch_size,
                                  persistent_workers=False)
        val_loader = DataLoader(val_set, batch_size=args.batch_size * 2, sampler=ShardSampler(len(val_set), rank, world),
                                num_workers=args.num_workers, pin_memory=pin)

    kwargs = model_kwargs(args.img_size, args.norm_type, pre.channels, args.small_input)
    model = build_model(args.model, num_classes, pretrained=args.pretrained and ckpt is None,
                        freeze_backbone=args.freeze_backbone, **kwargs).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    steps_per_epoch = (len(train_loader) + args.accumulation - 1) // args.accumulation
    schedule = WarmupCosine(optimizer, steps_per_epoch, args.max_epoch, args.wp_epoch, args.base_lr, args.min_lr)
    scaler = torch.amp.GradScaler("cuda") if args.fp16 and device.type == "cuda" and args.amp_dtype != "bfloat16" else None
    ema = ModelEMA(model, decay=args.ema_decay) if args.ema else None

    start_epoch, best_acc1, history, step = 0, 0.0, [], 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        start_epoch, best_acc1 = ckpt["epoch"] + 1, ckpt["best_acc1"]
        history, step = list(ckpt.get("history", [])), ckpt.get("step", 0)
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"])
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
        step = start_epoch * steps_per_epoch

    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    run_dir = Path(args.path_to_save) / spec.name / args.model
    writer = None
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "classes.txt", "\n".join(classes) + "\n")
        atomic_write_text(run_dir / "args.json", json.dumps(vars(args), indent=2) + "\n")
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = Path(args.log_dir) / spec.name / args.model / time.strftime("%Y%m%d-%H%M%S")
            writer = SummaryWriter(str(log_dir))
            print(f"TensorBoard logs: {log_dir}  (tensorboard --logdir {args.log_dir} --bind_all --port 6006)")

    def on_log(global_step: int, values: dict) -> None:
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(f"train_step/{key}", value, global_step)

    state = TrainState(optimizer, schedule, scaler, ema, step, args.accumulation, args.clip_grad, args.fp16,
                       args.amp_dtype, args.channels_last, args.log_every, on_log)

    def checkpoint(epoch: int) -> dict:
        return {
            "model_name": args.model, "num_classes": num_classes, "classes": classes,
            "preprocess": pre.to_dict(), "model_kwargs": kwargs, "augment": augment.to_dict(), "epoch": epoch,
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None, "best_acc1": best_acc1,
            "step": state.step, "history": history, "args": vars(args), "rng": rng_state(),
            "torch_version": str(torch.__version__),
        }

    if main_proc:
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
              f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes, device {device}"
              + (f", {world} processes" if world > 1 else "") + f"\ndata pipeline: {pipeline} ({pipeline_reason})"
              f"\naugmentation: {augment.describe()}")

    if main_proc and start_epoch >= args.max_epoch:
        print(f"nothing to train: the run already finished epoch {start_epoch} of --max_epoch {args.max_epoch}; "
              "raise --max_epoch to train longer")
    epoch = start_epoch
    finished = start_epoch - 1  # the last epoch whose end-of-epoch last.pth is on disk
    # SIGTERM (docker stop, kill, job schedulers) behaves like Ctrl-C: save last.pth, then exit. Its own handler, not
    # a copy of SIGINT's: a shell starts background jobs with SIGINT ignored, and copying that would ignore SIGTERM too.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        for epoch in range(start_epoch, args.max_epoch):
            seed_everything(args.seed + 1000 * epoch + rank)  # each epoch's randomness depends only on (seed, epoch)
            if world > 1:
                sampler.set_epoch(epoch)
            else:
                generator.manual_seed(args.seed + epoch)
            train_stats = train_one_epoch(model, train_loader, criterion, state, device, epoch + 1, not args.quiet)
            row = {"epoch": epoch + 1, "lr": train_stats["lr"], "train_loss": train_stats["train_loss"],
                   "train_acc1": train_stats["train_acc1"], "seconds": round(train_stats["seconds"], 2)}
            if (epoch + 1) % args.eval_epoch == 0 or epoch + 1 == args.max_epoch:
                eval_model = ema.module if ema is not None else model
                val = evaluate(eval_model, val_loader, device, num_classes, criterion, args.fp16, args.amp_dtype,
                               args.channels_last, not args.quiet)
                row.update(val_loss=val["loss"], val_acc1=val["acc1"], val_acc5=val["acc5"])
                if ema is not None and writer is not None:
                    raw = evaluate(model, val_loader, device, num_classes, criterion, args.fp16, args.amp_dtype,
                                   args.channels_last, not args.quiet)
                    for key in ("loss", "acc1", "acc5"):
                        writer.add_scalar(f"val_no_ema/{key}", raw[key], epoch + 1)
            history.append(row)
            is_best = row.get("val_acc1") is not None and row["val_acc1"] > best_acc1
            if is_best:
                best_acc1 = row["val_acc1"]
            if main_proc:
                ckpt_state = checkpoint(epoch)
                save_checkpoint(ckpt_state, run_dir / "last.pth")
                finished = epoch
                if is_best:
                    save_checkpoint(ckpt_state, run_dir / "best.pth")
                write_csv(run_dir / "results.csv", history)
                if writer is not None:
                    for key in ("train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5"):
                        if row.get(key) is not None:
                            split, metric = key.split("_", 1)
                            writer.add_scalar(f"{split}/{metric}", row[key], epoch + 1)
                    writer.add_scalar("lr", row["lr"], epoch + 1)
                    writer.flush()
                val_text = (f"val loss {row['val_loss']:.4f} acc@1 {row['val_acc1']:.4f} acc@5 {row['val_acc5']:.4f}"
                            if "val_acc1" in row else "no validation")
                print(f"epoch {epoch + 1}/{args.max_epoch}  train loss {row['train_loss']:.4f} acc@1 "
                      f"{row['train_acc1']:.4f}  {val_text}  lr {row['lr']:.2e}  {row['seconds']:.1f}s "
                      f"({train_stats['images_per_s']:.0f} img/s)", flush=True)
            barrier()
    except KeyboardInterrupt:
        if main_proc:
            # label the save with the last finished epoch and drop later rows, so --resume repeats the rest once
            history[:] = [r for r in history if r["epoch"] <= finished + 1]
            save_checkpoint(checkpoint(finished), run_dir / "last.pth")
            print(f"\ninterrupted in epoch {epoch + 1}: saved {run_dir / 'last.pth'}; continue with --resume", flush=True)
        cleanup()
        return 130
    finally:
        if writer is not None:
            writer.close()

    if main_proc:
        if history:
            plot_results(history, run_dir / "results.png")
        print(f"best val acc@1 {best_acc1:.4f}\nresults saved to {run_dir}/ (best.pth, last.pth, results.csv, results.png)")
    cleanup()
    return 0


if __name__ == "__main__":
    cli.run(main)
