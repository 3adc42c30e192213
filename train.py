"""Train an image classifier on Fashion-MNIST or an image folder.

Examples:
  python train.py --model custom --img_size 28 --max_epoch 5 --batch_size 128
  python train.py --model resnet18 --dataset path/to/folder --pretrained --fp16 --ema --tensorboard
  torchrun --nproc_per_node=2 train.py --model custom --img_size 28

Writes <path_to_save>/<dataset>/<model>/ (or <model>-2, -3, ... when that exists: a run never overwrites another;
--name replaces <model>, --exist_ok reuses it) with best.pth, last.pth, classes.txt, args.json, results.csv and
results.png, prints it first and last as "run_dir: <path>" and links <model>-latest to it; with --tensorboard, the
run's dashboard under <log_dir>/<dataset>/<run dir name>/<time>/ (continued by --resume). An image folder without
val/ is split (split.json); with --skip_bad_images, the files left out are listed in skipped_images.txt.
--resume continues a run from its last.pth, in that checkpoint's directory: the network (model, img_size, norm_type,
small_input) and the augmentation come from the checkpoint, and a flag that contradicts them is an error; the
dataset's classes must be the checkpoint's. --init_from CKPT starts a new run from a checkpoint's weights
(fine-tuning, other classes allowed).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from models import MODEL_NAMES, build_model, count_parameters, min_img_size, model_kwargs, resolve_small_input
from models.norm import NORM_TYPES
from utils import cli
from utils.checkpoint import head_keys, inference_state, load_checkpoint, load_matching
from utils.data.augment import AUGMENT_CHOICES, AUTO_AUGMENT_CHOICES, batch_mixing, resolve_augment
from utils.data.datasets import DataSpec, build_datasets
from utils.data.folders import bad_images_report, check_same_classes
from utils.data.loaders import build_train_loaders
from utils.data.preprocess import Preprocess
from utils.data.samplers import CLASS_WEIGHTS, SAMPLERS, balanced_class_weights, class_counts, targets_of
from utils.data.splits import split_json
from utils.distributed import barrier, cleanup, init_distributed, is_distributed, is_main_process
from utils.errors import InputError
from utils.evaluation.loop import TTA_CHOICES, evaluate
from utils.precision import AMP_DTYPES, Precision, needs_grad_scaler, resolve_precision
from utils.training.checkpointer import CheckpointSaver, ResumePoint, restore
from utils.training.dashboard import TrainingDashboard, evaluation_details
from utils.training.ema import ModelEMA
from utils.training.engine import TrainState, train_one_epoch
from utils.training.length import TrainingLength
from utils.training.optim import OPTIMIZERS, build_optimizer
from utils.training.recorder import RunRecorder
from utils.training.resume import apply_checkpoint_args, check_resumable
from utils.training.rng import seed_everything
from utils.training.run_dir import RunDir, check_run_name, choose_run_dir
from utils.training.schedule import SCHEDULES, WarmupSchedule

# --resume takes these from the checkpoint: they define the network, its input and the augmentation it was trained with
NETWORK_FLAGS = ("model", "img_size", "norm_type", "small_input", "augment", "random_erasing", "random_crop_padding", "auto_augment")
INIT_FLAGS = ("model", "img_size", "norm_type", "small_input")  # --init_from's defaults (explicit flags win)


def get_args_parser():
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
                        "seed's recipe); light = flip only; none; auto = seed above 64 px, light at native sizes <= 64 px. "
                        "Horizontal flips are wrong for digits, text and anything with a handedness: use none there "
                        "(on a digits dataset flips cost 3.7 points of test acc@1); nothing is guessed from class names")
    p.add_argument("--random_erasing", type=cli.in_range(0, 1), default=0.0, metavar="P",
                   help="RandomErasing probability added to the policy (timm's --reprob; 0 = off)")
    p.add_argument("--random_crop_padding", type=cli.non_negative(), default=0, metavar="P",
                   help="CIFAR-style translation added to the policy: pad by P black pixels, crop img_size at a random "
                        "offset (RandomCrop(img_size, padding=P); 0 = off; 2-4 suits 28-32 px images)")
    p.add_argument("--auto_augment", default="none", choices=AUTO_AUGMENT_CHOICES,
                   help="torchvision policy applied to each image after the geometry: ra = RandAugment, ta_wide = "
                        "TrivialAugmentWide, augmix = AugMix, autoaugment = AutoAugment (ImageNet policy); each image draws "
                        "its own operations, in both data pipelines")
    p.add_argument("--mixup_alpha", type=cli.non_negative(float), default=0.0,
                   help="Mixup on batches with Beta(alpha, alpha) weights (0 = off; 0.2 is common)")
    p.add_argument("--cutmix_alpha", type=cli.non_negative(float), default=0.0,
                   help="CutMix on batches (0 = off; 1.0 is common); with --mixup_alpha too, each batch uses one of the two. "
                        "With either, the loss uses the mixed soft targets and train acc@1 counts predictions of the label "
                        "with the larger mixing weight")
    cli.add_data_args(p)
    p.add_argument("--wp_epoch", type=cli.non_negative(), default=1, help="warm-up epochs (LR rises linearly per iteration)")
    p.add_argument("--start_epoch", type=cli.non_negative(), default=None,
                   help="epoch to start at (default: 0, or the one after the checkpoint's with --resume)")
    p.add_argument("--max_epoch", type=cli.positive(), default=10,
                   help="total number of epochs (with --time_budget: the planned length until the first epoch is timed)")
    p.add_argument("--time_budget", type=cli.non_negative(float), default=0.0, metavar="MINUTES",
                   help="train for this wall-clock budget: after the first epoch the run fixes its number of epochs so it "
                        "ends inside the budget, and fits the LR schedule to them (0 = off: --max_epoch decides)")
    p.add_argument("--patience", type=cli.non_negative(), default=0, metavar="N",
                   help="stop when validation acc@1 has not improved for N evaluations (best.pth keeps the best; 0 = off)")
    p.add_argument("--eval_epoch", type=cli.positive(), default=1, help="validate every N epochs (and after the last)")
    p.add_argument("--tta", default="none", choices=TTA_CHOICES,
                   help="flip: after training, validate the final weights once more with the logits averaged over the "
                        "image and its horizontal mirror (shown, and added to the last results.csv row as *_tta)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer")
    p.add_argument("--base_lr", type=cli.positive(float), default=3e-3,
                   help="peak learning rate after warm-up (3e-3 suits AdamW at batch 64-256; for SGD try 0.1)")
    p.add_argument("--sched", default="cosine", choices=SCHEDULES,
                   help="LR schedule per step after the warm-up: cosine or linear decay to --min_lr; onecycle = the curve of "
                        "torch's OneCycleLR (rises from base_lr/25 over the --wp_epoch warm-up, falls to --min_lr)")
    p.add_argument("--min_lr", type=cli.non_negative(float), default=1e-6, help="learning rate at the end of the decay")
    p.add_argument("--weight_decay", type=cli.non_negative(float), default=5e-2,
                   help="weight decay (not applied to biases and norm layers)")
    p.add_argument("--momentum", type=cli.in_range(0, 1, high_open=True), default=0.9, help="SGD momentum (beta1 for Adam/AdamW)")
    p.add_argument("--accumulation", type=cli.positive(), default=1,
                   help="micro-batches per optimizer step (effective batch = batch_size * accumulation)")
    p.add_argument("--val_fraction", type=cli.in_range(0, 1, low_open=True, high_open=True), default=0.1,
                   help="a --dataset without val/ (or test/), i.e. only class folders or train/ only, is split per class "
                        "(stratified, fixed by --seed): this share of each class's images is held out for validation "
                        "(at least one per class on each side); the file lists go to split.json and the checkpoints")
    p.add_argument("--class_weights", default="none", choices=CLASS_WEIGHTS,
                   help="balanced: weight the training loss of each class by n_images / (n_classes * its count) "
                        "(scikit-learn's 'balanced'), for imbalanced folders; validation loss stays unweighted")
    p.add_argument("--sampler", default="random", choices=SAMPLERS,
                   help="balanced: draw training images with replacement so that every class is equally likely in each "
                        "epoch (WeightedRandomSampler, weights 1/class count; per process under torchrun); random: each "
                        "image once per epoch")
    p.add_argument("--label_smoothing", type=cli.in_range(0, 1, high_open=True), default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--clip_grad", type=cli.non_negative(float), default=0.0, help="clip the gradient norm to this value (0 = off)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights; validation and best.pth use it")
    p.add_argument("--ema_decay", type=cli.in_range(0, 1), default=0.9999, help="EMA decay (warmed up as decay*(1-exp(-step/2000)))")
    p.add_argument("--fp16", action="store_true",
                   help="mixed precision: float16 autocast + GradScaler on CUDA; bfloat16 autocast on CPUs with native bf16 "
                        "(AVX-512 BF16 or AMX); on other CPUs it falls back to float32 with a warning (emulated bf16 is "
                        "several times slower)")
    p.add_argument("--amp_dtype", default="auto", choices=AMP_DTYPES,
                   help="autocast dtype with --fp16 (auto = float16 on CUDA, bfloat16 on CPU); bfloat16 forces bf16 even "
                        "where the CPU emulates it")
    p.add_argument("--channels_last", action="store_true", help="NHWC memory format (faster convolutions on AMX CPUs and tensor cores)")
    p.add_argument("--data_pipeline", default="auto", choices=["auto", "pil", "tensor"],
                   help="tensor = dataset held as one uint8 tensor, augmented in batches on --device (same recipe, much "
                        "faster on CPUs); pil = per-image PIL transforms in DataLoader workers; auto = tensor when the "
                        "images share one size and fit in memory (Fashion-MNIST always) or an image folder goes through "
                        "the decode-once cache (--cache auto), else pil")
    cli.add_cache_args(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (first epoch pays minutes of compilation; see benchmarks/README.md)")
    p.add_argument("--cuda", action="store_true", help="require CUDA (error if there is no GPU)")
    cli.add_device_arg(p)
    p.add_argument("--seed", type=cli.non_negative(), default=42,
                   help="random seed (each epoch is seeded from it, so resumed runs repeat exactly)")
    p.add_argument("-r", "--resume", default=None, metavar="CKPT",
                   help="continue from a last.pth (model, optimizer, EMA, epoch; the network's flags come from it)")
    p.add_argument("--init_from", default=None, metavar="CKPT",
                   help="fine-tune: start a new run from a checkpoint's weights only (no optimizer, epoch or schedule); "
                        "every tensor whose name and shape fit is loaded, the classification head is new when the "
                        "dataset's classes differ from the checkpoint's; the network flags (model, img_size, norm_type, "
                        "small_input) default to the checkpoint's")
    p.add_argument("--path_to_save", default="weights",
                   help="runs go to <path_to_save>/<dataset>/<name>/, or <name>-2, -3, ... when that exists (a run never "
                        "overwrites another); the chosen directory is printed first and last as 'run_dir: <path>', and "
                        "<name>-latest links to the newest run with a checkpoint")
    p.add_argument("--name", type=check_run_name, default=None,
                   help="the run directory's name (default: the model name); numbered like the default when it exists")
    p.add_argument("--exist_ok", action="store_true",
                   help="reuse <path_to_save>/<dataset>/<name>/ even when an earlier run is there (its files are replaced "
                        "as this run writes its own, from the end of the first epoch on)")
    p.add_argument("--tensorboard", action="store_true",
                   help="log the run's dashboard (scalars, HParams, confusion matrix, mistakes, PR curves, graph) under --log_dir")
    p.add_argument("--log_dir", default="logs", help="TensorBoard root: logs go to <log_dir>/<dataset>/<run dir name>/<time>/")
    p.add_argument("--log_every", type=cli.positive(), default=50, help="training iterations per TensorBoard step point")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.init_from and (args.resume or args.pretrained):
        raise InputError(f"--init_from starts a new run from a checkpoint's weights: drop {'--resume' if args.resume else '--pretrained'}")
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        check_resumable(ckpt, args.resume)
        apply_checkpoint_args(args, ckpt, NETWORK_FLAGS, cli.explicit_dests(parser, argv))
    init = load_checkpoint(args.init_from) if args.init_from else None
    if init is not None:
        explicit = cli.explicit_dests(parser, argv)
        saved = {**(init.get("args") or {}), "model": init["model_name"]}
        for key in INIT_FLAGS:
            if key in saved and key not in explicit:
                setattr(args, key, saved[key])
    small = resolve_small_input(args.small_input, args.img_size)
    if args.img_size < min_img_size(args.model, small):
        off = " with --small_input off" if min_img_size(args.model, not small) < min_img_size(args.model, small) else ""
        parser.error(f"argument --img_size: {args.model} needs at least {min_img_size(args.model, small)} px{off}, "
                     f"got {args.img_size}")
    device = cli.resolve_device(args.device, require_cuda=args.cuda)
    rank, world, local_rank = init_distributed(device.type)
    if device.type == "cuda" and is_distributed():
        device = torch.device("cuda", local_rank)
    spec = DataSpec(args.dataset, args.data_root, args.skip_bad_images, val_fraction=args.val_fraction, seed=args.seed,
                    split_record=ckpt.get("split") if ckpt is not None else None)
    run = choose_run_dir(args.path_to_save, spec.name, args.name or args.model, exist_ok=args.exist_ok, resume=args.resume)
    if is_main_process():
        run.announce()
    try:
        return train(args, ckpt, init, spec, run, device, rank, world)
    finally:
        if is_main_process():
            run.discard_if_empty()  # a run that failed before writing anything leaves no empty directory


def train(args, ckpt: dict | None, init: dict | None, spec: DataSpec, run: RunDir, device: torch.device, rank: int,
          world: int) -> int:
    main_proc = is_main_process()
    seed_everything(args.seed + rank)
    pre = Preprocess.for_size(args.img_size)
    augment = resolve_augment(args.augment, args.img_size, args.random_erasing, args.random_crop_padding, args.auto_augment)
    train_set, val_set, classes = build_datasets(spec, pre, augment=augment)
    if ckpt is not None:
        saved_data = (ckpt.get("args") or {}).get("dataset") or "Fashion-MNIST"
        check_same_classes(list(ckpt["classes"]), classes, f"checkpoint {args.resume}", f"dataset {spec.dataset or 'Fashion-MNIST'}",
                           f"resume on the run's own dataset ({saved_data}); to fine-tune on another dataset start a new run "
                           f"with --init_from {args.resume}")
    loaders = build_train_loaders(train_set, val_set, pre, augment, pipeline=args.data_pipeline, batch_size=args.batch_size,
                                  num_workers=args.num_workers, device=device, seed=args.seed, rank=rank, world=world,
                                  sampler=args.sampler, cache=args.cache, cache_dir=args.cache_dir,
                                  show_progress=not args.quiet)
    args.data_used = loaders.record()  # saved in args.json and the checkpoints: the pipeline and cache files this run read
    kwargs = model_kwargs(args.img_size, args.norm_type, pre.channels, args.small_input)
    model = build_model(args.model, len(classes), pretrained=args.pretrained and ckpt is None,
                        freeze_backbone=args.freeze_backbone, **kwargs).to(device)
    if init is not None:
        initialise_from(model, init, args, classes, kwargs, main_proc)
        del init
    precision = resolve_precision(device, args.fp16, args.amp_dtype, args.channels_last)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = build_train_state(args, model, device, precision, len(classes), steps_per_epoch=-(-len(loaders.train) // args.accumulation))
    resume = restore(ckpt, model=model, state=state) if ckpt is not None else ResumePoint()
    del ckpt  # the optimizer state and weights are in place now: free the checkpoint's copy
    if args.start_epoch is not None:
        resume.start_at(args.start_epoch, state)
    model = wrap_model(model, args.compile, device)
    class_weights = balanced_class_weights(targets_of(train_set), len(classes)) if args.class_weights == "balanced" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing,
                                    weight=class_weights.to(device) if class_weights is not None else None)
    val_criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    run_dir = run.path
    identity = {"model_name": args.model, "num_classes": len(classes), "classes": classes, "preprocess": pre.to_dict(),
                "model_kwargs": kwargs, "augment": augment.to_dict(), "args": vars(args),
                "split": getattr(train_set, "split", None),
                "class_weights": class_weights.tolist() if class_weights is not None else None}
    data_files = describe_folders(train_set, val_set, run_dir) if main_proc else {}
    recorder, saver, length = open_run(args, run_dir, identity, model, state, resume, device, main_proc, data_files)
    if main_proc:
        describe_run(args, model, len(train_set), len(val_set), classes, device, world, loaders, augment, precision, resume,
                     recorder.log_dir)
        describe_balance(args, train_set, classes, class_weights)
    # SIGTERM (docker stop, kill, job schedulers) behaves like Ctrl-C: save last.pth, then exit. Its own handler, not
    # a copy of SIGINT's: a shell starts background jobs with SIGINT ignored, and copying that would ignore SIGTERM too.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    epoch = resume.start_epoch
    try:
        while epoch < length.max_epoch:
            start = time.perf_counter()
            seed_everything(args.seed + 1000 * epoch + rank)  # each epoch's randomness depends only on (seed, epoch)
            loaders.set_epoch(epoch)
            stats = train_one_epoch(model, loaders.train, criterion, state, device, epoch + 1, not args.quiet)
            row = {"epoch": epoch + 1, "lr": stats["lr"], "train_loss": stats["train_loss"], "train_acc1": stats["train_acc1"],
                   "seconds": round(stats["seconds"], 2)}
            if (epoch + 1) % args.eval_epoch == 0 or epoch + 1 == length.max_epoch:
                row.update(validate(model, state, loaders.val, device, len(classes), val_criterion, args, recorder, epoch + 1))
            recorder.add(row)
            stop = length.after_epoch(epoch + 1, time.perf_counter() - start, row.get("val_acc1"), state.scheduler, state.step)
            recorder.set_max_epoch(length.max_epoch, args)  # a time budget fixes it after the first epoch
            check_finite(row, args)  # a diverged run stops before its NaN weights reach last.pth/best.pth
            recorder.write_identity()  # args.json and classes.txt once the first epoch is through (then no-op)
            saver.epoch_end(epoch, row.get("val_acc1"))
            recorder.write_epoch(row, stats["images_per_s"])
            if main_proc and epoch == resume.start_epoch:
                run.mark_latest()  # <name>-latest follows the newest run with a checkpoint
            epoch += 1
            barrier()
            if stop:
                break
        if args.tta != "none":  # the final weights once more, with test-time augmentation
            recorder.add_to_last_row(validate(model, state, loaders.val, device, len(classes), val_criterion, args, recorder,
                                              epoch, tta=args.tta))
    except KeyboardInterrupt:
        saved = saver.interrupted()
        if saved:
            print(f"\ninterrupted in epoch {epoch + 1}: saved {saved}; continue with --resume", flush=True)
            run.announce()
        cleanup()
        return 130
    finally:
        recorder.close()
    if main_proc:
        recorder.plot()
        print(f"best val acc@1 {saver.best_acc1:.4f}\nresults saved to {run_dir}/ (best.pth, last.pth, results.csv, results.png)")
        run.announce()
    cleanup()
    return 0


def initialise_from(model: nn.Module, init: dict, args, classes: list[str], kwargs: dict, verbose: bool) -> None:
    """--init_from: copy the checkpoint's (EMA) weights whose names and shapes fit; the head stays new when the classes
    differ (even in number only by name). An error when nothing fits."""
    same = list(init["classes"]) == classes
    exclude = set() if same else head_keys(args.model, len(classes), kwargs)
    loaded, skipped = load_matching(model, inference_state(init), exclude)
    if not loaded:
        raise InputError(f"--init_from {args.init_from}: none of its tensors fits --model {args.model} (it holds a "
                         f"{init['model_name']!r}): drop --model or give a checkpoint of that network")
    if verbose:
        head = "" if same else (f"; new head for {len(classes)} classes (the checkpoint's {len(init['classes'])} classes "
                                f"differ: only here {sorted(set(classes) - set(init['classes']))[:5]})")
        print(f"initialised from {args.init_from}: loaded {len(loaded)} tensors, skipped {len(skipped)}"
              + (f" ({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})" if skipped else "") + head)


def check_finite(row: dict, args) -> None:
    """A NaN/inf training or validation loss means the weights diverged: stop with one line (exit 2)."""
    bad = [f"{key} {row[key]}" for key in ("train_loss", "val_loss") if key in row and not math.isfinite(row[key])]
    if bad:
        raise InputError(f"training diverged in epoch {row['epoch']} ({', '.join(bad)}): nothing of this epoch was saved; "
                         f"fix: lower --base_lr (now {args.base_lr:g}), add --clip_grad 1.0 or a longer --wp_epoch")


def wrap_model(model: nn.Module, compile_model: bool, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun (even with one process: --nproc_per_node=1 runs the DDP path on NCCL),
    then torch.compile when asked (unwrap() reaches the plain module)."""
    if is_distributed():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def open_run(args, run_dir: Path, identity: dict, model: nn.Module, state: TrainState, resume: ResumePoint,
             device: torch.device, main_proc: bool, data_files: dict[str, str]) -> tuple[RunRecorder, CheckpointSaver,
                                                                                              TrainingLength]:
    """The run's records (results.csv, TensorBoard), checkpoint policy and length policy, started."""
    dashboard = TrainingDashboard.open(args, run_dir, resume, identity, model=model, state=state,
                                       device=device) if args.tensorboard and main_proc else None
    recorder = RunRecorder(run_dir, max_epoch=args.max_epoch, history=resume.history, enabled=main_proc, dashboard=dashboard)
    recorder.start(identity["classes"], vars(args), data_files)
    state.on_log = recorder.log_step
    saver = CheckpointSaver(run_dir, identity=identity, model=model, state=state, history=recorder.history,
                            best_acc1=resume.best_acc1, finished=resume.start_epoch - 1, enabled=main_proc)
    length = TrainingLength(args.max_epoch, start_epoch=resume.start_epoch, time_budget_min=args.time_budget, patience=args.patience,
                            history=recorder.history, device=device, log=print if main_proc else lambda _: None)
    return recorder, saver, length


def build_train_state(args, model: nn.Module, device: torch.device, precision: Precision, num_classes: int,
                      steps_per_epoch: int) -> TrainState:
    """Optimizer, LR schedule, loss scaler, EMA and batch mixing as the flags ask."""
    optimizer = build_optimizer(model, args.optimizer, lr=args.base_lr, weight_decay=args.weight_decay, momentum=args.momentum)
    scheduler = WarmupSchedule(optimizer, steps_per_epoch=steps_per_epoch, max_epoch=args.max_epoch, wp_epoch=args.wp_epoch,
                               base_lr=args.base_lr, min_lr=args.min_lr, shape=args.sched)
    return TrainState(optimizer=optimizer, scheduler=scheduler, accumulation=args.accumulation, clip_grad=args.clip_grad,
                      scaler=torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, precision.amp, precision.amp_dtype)),
                      ema=ModelEMA(model, decay=args.ema_decay) if args.ema else None, amp=precision.amp,
                      amp_dtype=precision.amp_dtype, channels_last=precision.channels_last, log_every=args.log_every,
                      mix=batch_mixing(args.mixup_alpha, args.cutmix_alpha, num_classes))


def describe_run(args, model, num_train: int, num_val: int, classes: list[str], device, world: int, loaders, augment,
                 precision: Precision, resume: ResumePoint, log_dir: str | None) -> None:
    """The start-up lines: where logs go, the network, the data, the pipeline, the augmentation, the precision."""
    if precision.note:
        print(f"warning: {precision.note}", file=sys.stderr)
    if log_dir is not None:
        print(f"TensorBoard logs: {log_dir}  (tensorboard --logdir {args.log_dir} --bind_all --port 6006)")
    print(f"{args.model}: {count_parameters(model) / 1e6:.2f} M params, {num_train} train / {num_val} val images, "
          f"{len(classes)} classes, device {device}" + (f", {world} processes" if world > 1 else "")
          + f"\ndata pipeline: {loaders.pipeline} ({loaders.reason})"
          + "".join(f"\n{cache.describe()}" for cache in loaders.caches)
          + f"\naugmentation: {augment.describe()}"
          + (f", then {'Mixup' if args.mixup_alpha else ''}{'/' if args.mixup_alpha and args.cutmix_alpha else ''}"
             f"{'CutMix' if args.cutmix_alpha else ''} on batches (train acc@1 = predictions of the dominant label)"
             if args.mixup_alpha or args.cutmix_alpha else "")
          + f"\nprecision: {precision.describe()}; LR schedule: {args.sched}, {args.optimizer}")
    if resume.start_epoch >= args.max_epoch:
        print(f"nothing to train: the run already finished epoch {resume.start_epoch} of --max_epoch {args.max_epoch}; "
              "raise --max_epoch to train longer")


def describe_folders(train_set, val_set, run_dir: Path) -> dict[str, str]:
    """Image folders: used and skipped images per class of each split. Returns the files the run keeps about its data
    (split.json, skipped_images.txt), written with args.json once the first epoch is through."""
    files = {}
    scans = [(name, getattr(ds, "scan", None)) for name, ds in (("train", train_set), ("val", val_set))]
    scans = [(name, scan) for name, scan in scans if scan is not None]
    for name, scan in scans:
        print(scan.describe(name, skipped=True))
    split = getattr(train_set, "split", None)
    if split is not None:
        print(f"split: {len(train_set)} train / {len(val_set)} val images of {split['root']} (held out per class: "
              f"--val_fraction {split['val_fraction']}, --seed {split['seed']}); file lists in {run_dir / 'split.json'}")
        files["split.json"] = split_json(split)
    if any(scan.bad for _, scan in scans):
        files["skipped_images.txt"] = bad_images_report([scan for _, scan in scans]) + "\n"
        print(f"skipped images listed in {run_dir / 'skipped_images.txt'}")
    return files


def describe_balance(args, train_set, classes: list[str], class_weights) -> None:
    """--class_weights / --sampler: the class counts and what each does with them."""
    if args.class_weights == "none" and args.sampler == "random":
        return
    counts = class_counts(targets_of(train_set), len(classes)).tolist()
    more = ", ..." if len(classes) > 10 else ""
    print("train images per class: " + ", ".join(f"{c} {n}" for c, n in zip(classes[:10], counts[:10])) + more)
    if class_weights is not None:
        weights = class_weights.tolist()
        print("class weights (balanced, n / (classes x count)): "
              + ", ".join(f"{c} {w:.3f}" for c, w in zip(classes[:10], weights[:10])) + more)
    if args.sampler == "balanced":
        print(f"sampler: balanced (each epoch draws {len(train_set)} images with replacement, every class equally likely)")


def validate(model, state: TrainState, loader, device, num_classes: int, criterion, args, recorder: RunRecorder, epoch: int,
             tta: str = "none") -> dict:
    """Validation loss/acc@1/acc@5 of the EMA model when there is one (TensorBoard also gets the raw model's, as
    val_no_ema/, and the evaluation's pictures). With tta, the keys are suffixed _tta and the result is printed.
    Every process takes the same path: the metrics are summed over processes."""
    options = {"criterion": criterion, "amp": state.amp, "amp_dtype": state.amp_dtype, "channels_last": state.channels_last,
               "show_progress": not args.quiet, "tta": tta}
    ema, board = state.ema, args.tensorboard and tta == "none"
    if ema is not None:
        ema.sync_buffers()  # under torchrun, validate (and save) rank 0's BatchNorm statistics on every process
    val = evaluate(ema.module if ema is not None else model, loader, device, num_classes, **options,
                   **(evaluation_details(args, epoch) if board else {}))
    raw = evaluate(model, loader, device, num_classes, **options) if ema is not None and board else None
    if board and recorder.dashboard is not None:
        recorder.dashboard.add_evaluation(epoch, val, raw)
    suffix = "" if tta == "none" else "_tta"
    out = {f"val_{key}{suffix}": val[key] for key in ("loss", "acc1", "acc5")}
    if tta != "none" and recorder.enabled:
        print(f"final weights with {tta} TTA: val loss {val['loss']:.4f} acc@1 {val['acc1']:.4f} acc@5 {val['acc5']:.4f}")
    return out


if __name__ == "__main__":
    cli.run(main)
