"""Train an image classifier on Fashion-MNIST or a folder of your own images.

Examples:
  python train.py --model custom --img_size 28 --max_epoch 5 --batch_size 128
  python train.py --config recipes/fashion_cnn_10min.yaml
  python train.py --model resnet18 --dataset path/to/folder --pretrained --fp16 --ema --tensorboard
  torchrun --nproc_per_node=2 train.py --model custom --img_size 28

Each run gets its own directory, <path_to_save>/<dataset>/<name>/ (best.pth, last.pth, args.json, results.csv,
results.png), printed first and last as "run_dir: <path>"; --resume continues it from its last.pth.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from models import MODEL_NAMES, build_model, count_parameters, min_img_size, model_kwargs, resolve_small_input
from models.memory import explain_out_of_memory, require_fits, training_flags, training_memory
from models.norm import NORM_TYPES
from utils import cli, progress
from utils.checkpoint import check_resume_fits, head_keys, inference_state, load_checkpoint, load_matching
from utils.data.augment import AUGMENT_CHOICES, AUTO_AUGMENT_CHOICES, batch_mixing, resolve_augment
from utils.data.datasets import DataSpec, build_datasets, native_image_size, resolve_crop_pct
from utils.data.folders import bad_images_report, check_same_classes
from utils.data.loaders import build_train_loaders
from utils.data.preprocess import Preprocess, check_preprocess_values
from utils.data.samplers import CLASS_WEIGHTS, SAMPLERS, balanced_class_weights, class_counts, targets_of
from utils.data.splits import split_json
from utils.distributed import barrier, cleanup, init_distributed, is_distributed, is_main_process
from utils.errors import InputError
from utils.evaluation.loop import TTA_CHOICES, evaluate
from utils.precision import AMP_DTYPES, Precision, needs_grad_scaler
from utils.training.checkpointer import CheckpointSaver, ResumePoint, restore
from utils.training.config import RUN_FIELDS, TrainConfig
from utils.training.dashboard import TrainingDashboard, evaluation_details
from utils.training.ema import ModelEMA
from utils.training.engine import TrainState, train_one_epoch
from utils.training.interrupt import GracefulStop
from utils.training.length import TrainingLength
from utils.training.optim import OPTIMIZERS, build_optimizer
from utils.training.precision_choice import MEMORY_FORMATS, PRECISIONS, candidates, choose_precision, describe_choice
from utils.training.recorder import RunRecorder
from utils.training.resume import check_resumable, checkpoint_flags, fixed_by_resume
from utils.training.rng import seed_everything
from utils.training.run_dir import RunDir, check_run_name, choose_run_dir
from utils.training.schedule import SCHEDULES, WarmupSchedule
from utils.training.whitening import whiten_from_dataset

# --resume takes these from the checkpoint: they define the network, its input and the augmentation it was trained with
NETWORK_FLAGS = ("model", "img_size", "crop_pct", "in_channels", "norm_type", "small_input", "augment", "random_erasing",
                 "random_crop_padding", "auto_augment")
INIT_FLAGS = ("model", "img_size", "in_channels", "norm_type", "small_input")  # --init_from's defaults (explicit flags win)


def get_args_parser():
    p = cli.parser(__doc__, epilog="The manual, with every flag explained: docs/training.md", grouped=True)
    cli.add_config_arg(p)
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default="custom", choices=MODEL_NAMES, metavar="NAME",
                   help="network: custom (FashionCNN), resnet9, speednet, resnet18-152, mobilenet_v2/v3_small/v3_large, efficientnet_b0")
    g.add_argument("-p", "--pretrained", action="store_true", help="start from torchvision's ImageNet weights (new head)")
    g.add_argument("--freeze_backbone", action="store_true", help="train only the classification head")
    g.add_argument("--norm_type", default="BN", choices=NORM_TYPES, help="normalisation layers: BatchNorm, GroupNorm or none")
    g.add_argument("--img_size", type=cli.positive(), default=224, help="crop size fed to the network, in pixels")
    g.add_argument("--crop_pct", type=cli.in_range(0, 1, low_open=True), default=None,
                   help="eval resize = img_size / crop_pct, then centre crop; default 1.0 at the images' own size, else 0.875")
    g.add_argument("--in_channels", type=cli.positive(), default=3, choices=(1, 3),
                   help="1: grayscale network (Fashion-MNIST, grey folders; colour images are converted); 3: RGB")
    g.add_argument("--small_input", default="auto", choices=["auto", "on", "off"],
                   help="stride-1 stem for small images; auto = on when img_size <= 64")
    g.add_argument("--whiten_stem", action="store_true",
                   help="speednet: initialise its 2x2 stem as a whitening filter bank of 512 training images")
    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--augment", default="auto", choices=AUGMENT_CHOICES,
                   help="policy: seed = crop + rotate + flip, light = flip, none; auto = seed above 64 px, else light")
    g.add_argument("--random_erasing", type=cli.in_range(0, 1), default=0.0, metavar="P", help="RandomErasing probability")
    g.add_argument("--random_crop_padding", type=cli.non_negative(), default=0, metavar="P",
                   help="pad by P px and crop back at a random offset (0 = off)")
    g.add_argument("--auto_augment", default="none", choices=AUTO_AUGMENT_CHOICES,
                   help="torchvision policy per image: RandAugment, TrivialAugmentWide, AugMix or AutoAugment")
    g.add_argument("--mixup_alpha", type=cli.non_negative(float), default=0.0, help="Mixup Beta(alpha, alpha) (0 = off)")
    g.add_argument("--cutmix_alpha", type=cli.non_negative(float), default=0.0, help="CutMix Beta(alpha, alpha) (0 = off)")
    g.add_argument("--label_smoothing", type=cli.in_range(0, 1, high_open=True), default=0.0, help="cross-entropy label smoothing")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights; validation and best.pth use it")
    g.add_argument("--ema_decay", type=cli.in_range(0, 1), default=0.9999, help="EMA decay (warmed up over the first steps)")
    g = cli.add_data_args(p)
    g.add_argument("--val_fraction", type=cli.in_range(0, 1, low_open=True, high_open=True), default=0.1,
                   help="share of each class held out when a folder has no val/")
    g.add_argument("--class_weights", default="none", choices=CLASS_WEIGHTS,
                   help="balanced: weight the loss of each class by n / (classes x count)")
    g.add_argument("--sampler", default="random", choices=SAMPLERS,
                   help="balanced: draw every class equally often (with replacement)")
    g = p.add_argument_group("optimisation and schedule")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--base_lr", type=cli.positive(float), default=3e-3, help="peak learning rate (try 0.1 with SGD)")
    g.add_argument("--sched", default="cosine", choices=SCHEDULES, help="LR decay after the warm-up")
    g.add_argument("--min_lr", type=cli.non_negative(float), default=1e-6, help="learning rate at the end of the decay")
    g.add_argument("--wp_epoch", type=cli.non_negative(), default=1, help="warm-up epochs (linear, per step)")
    g.add_argument("--weight_decay", type=cli.non_negative(float), default=5e-2, help="weight decay (not on biases and norms)")
    g.add_argument("--momentum", type=cli.in_range(0, 1, high_open=True), default=0.9, help="SGD momentum (Adam's beta1)")
    g.add_argument("--accumulation", type=cli.positive(), default=1, help="micro-batches per optimizer step")
    g.add_argument("--clip_grad", type=cli.non_negative(float), default=0.0, help="clip the gradient norm (0 = off)")
    g = p.add_argument_group("length and evaluation")
    g.add_argument("--max_epoch", type=cli.positive(), default=10, help="number of epochs")
    g.add_argument("--start_epoch", type=cli.non_negative(), default=None,
                   help="epoch to start at (default: 0, or the checkpoint's next with --resume)")
    g.add_argument("--time_budget", type=cli.non_negative(float), default=0.0, metavar="MINUTES",
                   help="train fewer epochs than --max_epoch so the whole run (start-up, validation, TTA) ends inside it (0 = off)")
    g.add_argument("--patience", type=cli.non_negative(), default=0, metavar="N",
                   help="stop when val acc@1 has not improved for N evaluations (0 = off)")
    g.add_argument("--eval_epoch", type=cli.positive(), default=1, help="validate every N epochs (and after the last)")
    g.add_argument("--tta", default="none", choices=TTA_CHOICES, help="flip: validate the final weights once more with flip TTA")
    g = p.add_argument_group("precision and speed")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: time a few training steps of fp32 and bf16 (CPUs with native bf16) and train with the faster")
    g.add_argument("--memory_format", default="auto", choices=MEMORY_FORMATS,
                   help="auto: time NCHW and channels_last with --precision's candidates (CUDA: channels_last)")
    g.add_argument("--fp16", action="store_true", help="mixed precision: fp16 on CUDA, bf16 on CPUs with native bf16")
    g.add_argument("--amp_dtype", default="auto", choices=AMP_DTYPES, help="autocast dtype with --fp16")
    g.add_argument("--channels_last", action="store_true", help="NHWC memory format (= --memory_format channels_last)")
    g.add_argument("--data_pipeline", default="auto", choices=["auto", "pil", "tensor"],
                   help="tensor: augment whole batches from memory; pil: per-image PIL workers; auto: tensor when it fits")
    cli.add_cache_args(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cuda", action="store_true", help="require CUDA (error if there is no GPU)")
    cli.add_device_arg(g)
    g.add_argument("--seed", type=cli.non_negative(), default=42, help="random seed (each epoch reseeded from it)")
    g = p.add_argument_group("run directory and outputs")
    g.add_argument("-r", "--resume", default=None, metavar="CKPT", help="continue a run from its last.pth")
    g.add_argument("--init_from", default=None, metavar="CKPT", help="fine-tune: start a new run from a checkpoint's weights")
    g.add_argument("--path_to_save", default="weights", help="runs go to <path_to_save>/<dataset>/<name>/")
    g.add_argument("--name", type=check_run_name, default=None, help="run directory name (default: the model name)")
    g.add_argument("--exist_ok", action="store_true", help="reuse an existing run directory instead of numbering a new one")
    g.add_argument("--tensorboard", action="store_true", help="log the run's dashboard under --log_dir")
    g.add_argument("--log_dir", default="logs", help="TensorBoard root")
    g.add_argument("--log_every", type=cli.positive(), default=50, help="training iterations per TensorBoard point")
    cli.add_quiet_arg(g)
    return p


def main(argv=None) -> int:
    started = time.perf_counter()  # the --time_budget clock: the whole run, start-up included
    parser = get_args_parser()
    args = parser.parse_args(argv)
    explicit = cli.explicit_dests(parser, argv)
    recipe = cli.config_values(parser, args.config, explicit, ignore=RUN_FIELDS)
    flags = {**vars(args), **recipe}
    explicit |= set(recipe)  # a recipe's values count as given: --resume/--init_from must not silently replace them
    if flags["init_from"] and (flags["resume"] or flags["pretrained"]):
        drop = "--resume" if flags["resume"] else "--pretrained"
        raise InputError(f"--init_from starts a new run from a checkpoint's weights: drop {drop}")
    ckpt = load_checkpoint(flags["resume"]) if flags["resume"] else None
    if ckpt is not None:
        check_resumable(ckpt, flags["resume"])
        saved = checkpoint_flags(ckpt, NETWORK_FLAGS, flags, explicit)
        flags.update(cli.checked_values(parser, saved, f"--resume {flags['resume']}: saved flag"))
        if "crop_pct" not in saved:  # a checkpoint from before --crop_pct: its recorded resize is the geometry
            flags["crop_pct"] = legacy_crop_pct(ckpt)
        flags.update(fixed_by_resume(ckpt, flags, explicit))
    init = load_checkpoint(flags["init_from"]) if flags["init_from"] else None
    if init is not None:
        saved = {**(init.get("args") or {}), "model": init["model_name"]}
        flags.update(cli.checked_values(parser, {key: saved[key] for key in INIT_FLAGS if key in saved and key not in explicit},
                                        f"--init_from {flags['init_from']}: saved flag"))
    cfg = TrainConfig(**flags)
    if cfg.whiten_stem and cfg.model != "speednet":
        raise InputError(f"--whiten_stem initialises speednet's 2x2 stem; --model {cfg.model} has none: drop the flag")
    progress.set_quiet(cfg.quiet)  # every bar of the run, the data checks' and the cache's too
    small = resolve_small_input(cfg.small_input, cfg.img_size)
    if cfg.img_size < min_img_size(cfg.model, small):
        off = " with --small_input off" if min_img_size(cfg.model, not small) < min_img_size(cfg.model, small) else ""
        parser.error(f"argument --img_size: {cfg.model} needs at least {min_img_size(cfg.model, small)} px{off}, "
                     f"got {cfg.img_size}")
    device = cli.resolve_device(cfg.device, require_cuda=cfg.cuda)
    rank, world, local_rank = init_distributed(device.type)
    if device.type == "cuda" and is_distributed():
        device = torch.device("cuda", local_rank)
    spec = DataSpec(cfg.dataset, cfg.data_root, cfg.skip_bad_images, val_fraction=cfg.val_fraction, seed=cfg.seed,
                    split_record=ckpt.get("split") if ckpt is not None else None, resuming=ckpt is not None,
                    run_dataset=(ckpt.get("args") or {}).get("dataset") if ckpt is not None else None, cache_dir=cfg.cache_dir)
    run = choose_run_dir(cfg.path_to_save, spec.name, cfg.name or cfg.model, exist_ok=cfg.exist_ok, resume=cfg.resume)
    if is_main_process():
        run.announce()
    replay = recorded_precision(args.config)
    try:
        with explain_out_of_memory(training_flags(cfg.batch_size, cfg.img_size), "lower --batch_size or --img_size"):
            return train(cfg, ckpt, init, spec, run, device, rank, world, replay, started)
    finally:
        if is_main_process():
            run.release()
            run.discard_if_empty()  # a run that failed before writing anything leaves no empty directory


def train(cfg: TrainConfig, ckpt: dict | None, init: dict | None, spec: DataSpec, run: RunDir, device: torch.device, rank: int,
          world: int, replay: dict | None = None, started: float | None = None) -> int:
    main_proc = is_main_process()
    seed_everything(cfg.seed + rank)
    if cfg.crop_pct is None:  # auto: from the images' own size (a folder's file headers are read)
        cfg = replace(cfg, crop_pct=resolve_crop_pct(None, cfg.img_size, native_image_size(spec)))
    pre = Preprocess.for_size(cfg.img_size, channels=cfg.in_channels, crop_pct=cfg.crop_pct)
    augment = resolve_augment(cfg.augment, cfg.img_size, cfg.random_erasing, cfg.random_crop_padding, cfg.auto_augment)
    train_set, val_set, classes = build_datasets(spec, pre, augment=augment)
    if ckpt is not None:
        saved_data = (ckpt.get("args") or {}).get("dataset") or "Fashion-MNIST"
        check_same_classes(list(ckpt["classes"]), classes, f"checkpoint {cfg.resume}", f"dataset {spec.dataset or 'Fashion-MNIST'}",
                           f"resume on the run's own dataset ({saved_data}); to fine-tune on another dataset start a new run "
                           f"with --init_from {cfg.resume}")
    kwargs = model_kwargs(cfg.img_size, cfg.norm_type, pre.channels, cfg.small_input)
    # before the data is loaded: a batch that cannot fit is one line, not the OOM killer
    require_fits(training_memory(cfg.model, len(classes), kwargs, cfg.batch_size, len(train_set), cfg.freeze_backbone, cfg.fp16), device)
    loaders = build_train_loaders(train_set, val_set, pre, augment, pipeline=cfg.data_pipeline, batch_size=cfg.batch_size,
                                  num_workers=cfg.num_workers, device=device, seed=cfg.seed, rank=rank, world=world,
                                  sampler=cfg.sampler, cache=cfg.cache, cache_dir=cfg.cache_dir,
                                  show_progress=not cfg.quiet)
    cfg = replace(cfg, data_used=loaders.record())  # in args.json and the checkpoints: the pipeline and cache files read
    model = build_model(cfg.model, len(classes), pretrained=cfg.pretrained and ckpt is None,
                        freeze_backbone=cfg.freeze_backbone, **kwargs).to(device)
    if init is not None:
        initialise_from(model, init, cfg, classes, kwargs, main_proc)
        del init
    elif cfg.whiten_stem and ckpt is None:
        count = whiten_from_dataset(model, train_set, device)
        if main_proc:
            print(f"stem whitened from the 2x2 patches of {count} training images")
    cands, note = candidates(device, cfg.precision, cfg.memory_format, cfg.fp16, cfg.amp_dtype, cfg.channels_last)
    precision, used = choose_precision(model, cands, note, batch_shape=(cfg.batch_size, pre.channels, cfg.img_size, cfg.img_size),
                                       num_classes=len(classes), device=device, planned_steps=len(loaders.train) * cfg.max_epoch,
                                       recorded=(ckpt.get("args") or {}).get("precision_used") if ckpt is not None else replay,
                                       recorded_by="resume" if ckpt is not None else "replay")
    cfg = replace(cfg, precision_used=used)  # in args.json, the checkpoints and TensorBoard's run/args
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = build_train_state(cfg, model, device, precision, len(classes), steps_per_epoch=-(-len(loaders.train) // cfg.accumulation))
    check_resume_fits(ckpt, model, state.optimizer, cfg.resume)  # a tensor of another shape: one line, before loading
    resume = restore(ckpt, model=model, state=state) if ckpt is not None else ResumePoint()
    del ckpt  # the optimizer state and weights are in place now: free the checkpoint's copy
    if cfg.start_epoch is not None:
        resume.start_at(cfg.start_epoch, state)
    model = wrap_model(model, cfg.compile, device)
    class_weights = balanced_class_weights(targets_of(train_set), len(classes)) if cfg.class_weights == "balanced" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing,
                                    weight=class_weights.to(device) if class_weights is not None else None)
    val_criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    run_dir = run.path
    identity = {"model_name": cfg.model, "num_classes": len(classes), "classes": classes, "preprocess": pre.to_dict(),
                "model_kwargs": kwargs, "augment": augment.to_dict(), "args": cfg.to_dict(),
                "split": getattr(train_set, "split", None),
                "class_weights": class_weights.tolist() if class_weights is not None else None}
    data_files = describe_folders(train_set, val_set, run_dir) if main_proc else {}
    cfg, recorder, saver, length = open_run(cfg, run_dir, identity, model, state, resume, device, main_proc, data_files,
                                            started)
    if main_proc:
        describe_run(cfg, model, len(train_set), len(val_set), classes, device, world, loaders, augment, precision, resume,
                     recorder.log_dir)
        describe_balance(cfg, train_set, classes, class_weights)
    stop = GracefulStop(announce=main_proc).install()  # Ctrl-C / SIGTERM: stop after the current optimizer step
    epoch, partial, done = resume.start_epoch, resume.partial, None
    val_s = 0.0  # the last validation's seconds: the final TTA evaluation (two views) is kept twice that
    try:
        while epoch < length.max_epoch:
            start = time.perf_counter()
            seed_everything(cfg.seed + 1000 * epoch + rank)  # each epoch's randomness depends only on (seed, epoch)
            loaders.set_epoch(epoch)
            with stop.stepping():
                stats = train_one_epoch(model, loaders.train, criterion, state, device, epoch + 1, not cfg.quiet,
                                        resume_from=partial, stop=stop)
            partial = None
            if stats["stopped"] is not None:
                done = stats["stopped"]
                raise KeyboardInterrupt
            done = stats["progress"]  # the epoch's training is complete: a stop in validation resumes from here
            if stop.requested:
                raise KeyboardInterrupt
            row = {"epoch": epoch + 1, "lr": stats["lr"], "train_loss": stats["train_loss"], "train_acc1": stats["train_acc1"],
                   "seconds": round(stats["seconds"], 2)}
            if (epoch + 1) % cfg.eval_epoch == 0 or epoch + 1 == length.max_epoch:
                val_start = time.perf_counter()
                row.update(validate(model, state, loaders.val, device, len(classes), val_criterion, cfg, recorder, epoch + 1))
                val_s = time.perf_counter() - val_start
            recorder.add(row)
            end_early = length.after_epoch(epoch + 1, time.perf_counter() - start, row.get("val_acc1"), state.scheduler,
                                           state.step, tail_s=2 * val_s if cfg.tta != "none" else 0.0)
            if length.max_epoch != cfg.max_epoch:  # a time budget planned (or shortened) it
                cfg = replace(cfg, max_epoch=length.max_epoch)
                identity["args"] = cfg.to_dict()  # the checkpoints' copy (saver.identity is this dict)
                recorder.set_args(identity["args"])
            check_finite(row, cfg)  # a diverged run stops before its NaN weights reach last.pth/best.pth
            recorder.write_identity()  # args.json and classes.txt once the first epoch is through (then no-op)
            saver.epoch_end(epoch, row.get("val_acc1"))
            done = None  # last.pth holds this epoch now
            recorder.write_epoch(row, stats["images_per_s"])
            if main_proc and epoch == resume.start_epoch:
                run.mark_latest()  # <name>-latest follows the newest run with a checkpoint
            epoch += 1
            barrier()
            if end_early:
                break
        if cfg.tta != "none":  # the final weights once more, with test-time augmentation
            recorder.add_to_last_row(validate(model, state, loaders.val, device, len(classes), val_criterion, cfg, recorder,
                                              epoch, tta=cfg.tta))
            saver.rewrite_last()  # its history carries the TTA columns too, so a later --resume keeps them
    except KeyboardInterrupt:
        saved = saver.interrupted(done)
        if main_proc:
            where = (f"after batch {done.batches} of {done.of}" if done is not None and done.batches < done.of
                     else "after its training, before validation" if done is not None else "")
            print(f"\ninterrupted in epoch {epoch + 1}{' ' + where if where else ''}: "
                  + (f"saved {saved}; continue with --resume {saved}" if saved else
                     f"nothing newer to save (last.pth holds epoch {saver.finished + 1})" if saver.finished >= 0 else
                     "nothing saved yet (no epoch had finished)"), flush=True)
            run.announce()
        cleanup()
        return 130
    finally:
        stop.uninstall()
        recorder.close()
    if main_proc:
        recorder.plot()
        best = f"best val acc@1 {saver.best_acc1:.4f}" if saver.best_acc1 >= 0 else "no validation ran: no best.pth"
        files = ", ".join(name for name in ("best.pth", "last.pth", "results.csv", "results.png") if (run_dir / name).exists())
        print(f"{best}\nresults saved to {run_dir}/ ({files})")
        run.announce()
    cleanup()
    return 0


def initialise_from(model: nn.Module, init: dict, cfg: TrainConfig, classes: list[str], kwargs: dict, verbose: bool) -> None:
    """--init_from: copy the checkpoint's (EMA) weights whose names and shapes fit; the head stays new when the classes
    differ (even in number only by name). An error when nothing fits."""
    same = list(init["classes"]) == classes
    exclude = set() if same else head_keys(cfg.model, len(classes), kwargs)
    loaded, skipped = load_matching(model, inference_state(init), exclude)
    if not loaded:
        raise InputError(f"--init_from {cfg.init_from}: none of its tensors fits --model {cfg.model} (it holds a "
                         f"{init['model_name']!r}): drop --model or give a checkpoint of that network")
    if verbose:
        head = "" if same else (f"; new head for {len(classes)} classes (the checkpoint's {len(init['classes'])} classes "
                                f"differ: only here {sorted(set(classes) - set(init['classes']))[:5]})")
        print(f"initialised from {cfg.init_from}: loaded {len(loaded)} tensors, skipped {len(skipped)}"
              + (f" ({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})" if skipped else "") + head)


def recorded_precision(config: str | None) -> dict | None:
    """--config with a run's args.json: the precision that run chose (its `precision_used`), so a replay repeats it."""
    if not config or not config.endswith(".json"):
        return None
    import json

    with open(config, encoding="utf-8") as f:  # config_values has read and checked it already
        used = json.load(f).get("precision_used")
    return used if isinstance(used, dict) else None


def legacy_crop_pct(ckpt: dict) -> float:
    """The crop_pct of a checkpoint saved before the flag existed: its preprocessing's img_size / resize (28 / 32)."""
    pre = ckpt["preprocess"]
    check_preprocess_values(pre, "--resume: the checkpoint's ")
    return pre.get("img_size", 224) / pre.get("resize", 256)


def check_finite(row: dict, cfg: TrainConfig) -> None:
    """A NaN/inf training or validation loss means the weights diverged: stop with one line (exit 2)."""
    bad = [f"{key} {row[key]}" for key in ("train_loss", "val_loss") if key in row and not math.isfinite(row[key])]
    if bad:
        raise InputError(f"training diverged in epoch {row['epoch']} ({', '.join(bad)}): nothing of this epoch was saved; "
                         f"fix: lower --base_lr (now {cfg.base_lr:g}), add --clip_grad 1.0 or a longer --wp_epoch")


def wrap_model(model: nn.Module, compile_model: bool, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun (even with one process: --nproc_per_node=1 runs the DDP path on NCCL),
    then torch.compile when asked (unwrap() reaches the plain module)."""
    if is_distributed():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def open_run(cfg: TrainConfig, run_dir: Path, identity: dict, model: nn.Module, state: TrainState, resume: ResumePoint,
             device: torch.device, main_proc: bool,
             data_files: dict[str, str], started: float) -> tuple[TrainConfig, RunRecorder, CheckpointSaver, TrainingLength]:
    """The run's records (results.csv, TensorBoard), checkpoint policy and length policy, started. The config comes
    back with the TensorBoard directory the dashboard chose (identity["args"] follows it)."""
    dashboard = None
    if cfg.tensorboard and main_proc:
        dashboard = TrainingDashboard.open(cfg, run_dir, resume, identity, model=model, state=state, device=device)
        cfg = replace(cfg, tensorboard_dir=str(dashboard.log_dir))
        identity["args"] = cfg.to_dict()
    recorder = RunRecorder(run_dir, max_epoch=cfg.max_epoch, history=resume.history, enabled=main_proc, dashboard=dashboard)
    recorder.start(identity["classes"], identity["args"], data_files)
    state.on_log = recorder.log_step
    saver = CheckpointSaver(run_dir, identity=identity, model=model, state=state, history=recorder.history,
                            best_acc1=resume.best_acc1, finished=resume.start_epoch - 1, enabled=main_proc)
    length = TrainingLength(cfg.max_epoch, time_budget_min=cfg.time_budget, patience=cfg.patience,
                            history=recorder.history, device=device, log=print if main_proc else lambda _: None,
                            started=started)
    return cfg, recorder, saver, length


def build_train_state(cfg: TrainConfig, model: nn.Module, device: torch.device, precision: Precision, num_classes: int,
                      steps_per_epoch: int) -> TrainState:
    """Optimizer, LR schedule, loss scaler, EMA and batch mixing as the flags ask."""
    optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.base_lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler = WarmupSchedule(optimizer, steps_per_epoch=steps_per_epoch, max_epoch=cfg.max_epoch, wp_epoch=cfg.wp_epoch,
                               base_lr=cfg.base_lr, min_lr=cfg.min_lr, shape=cfg.sched)
    return TrainState(optimizer=optimizer, scheduler=scheduler, accumulation=cfg.accumulation, clip_grad=cfg.clip_grad,
                      scaler=torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, precision.amp, precision.amp_dtype)),
                      ema=ModelEMA(model, decay=cfg.ema_decay) if cfg.ema else None, amp=precision.amp,
                      amp_dtype=precision.amp_dtype, channels_last=precision.channels_last, log_every=cfg.log_every,
                      mix=batch_mixing(cfg.mixup_alpha, cfg.cutmix_alpha, num_classes))


def describe_run(cfg: TrainConfig, model, num_train: int, num_val: int, classes: list[str], device, world: int, loaders, augment,
                 precision: Precision, resume: ResumePoint, log_dir: str | None) -> None:
    """The start-up lines: where logs go, the network, the data, the pipeline, the augmentation, the precision."""
    if precision.note:
        print(f"warning: {precision.note}", file=sys.stderr)
    if log_dir is not None:
        print(f"TensorBoard logs: {log_dir}  (tensorboard --logdir {cfg.log_dir} --bind_all --port 6006)")
    print(f"{cfg.model}: {count_parameters(model) / 1e6:.2f} M params, {num_train} train / {num_val} val images, "
          f"{len(classes)} classes, device {device}" + (f", {world} processes" if world > 1 else "")
          + f"\ndata pipeline: {loaders.pipeline} ({loaders.reason})"
          + "".join(f"\n{cache.describe()}" for cache in loaders.caches)
          + f"\ninput: {cfg.img_size} px, {'grayscale (1 channel)' if cfg.in_channels == 1 else 'RGB'}; "
            f"eval resize {round(cfg.img_size / cfg.crop_pct)} -> centre crop {cfg.img_size} (crop_pct {cfg.crop_pct})"
          + f"\naugmentation: {augment.describe()}"
          + (f", then {'Mixup' if cfg.mixup_alpha else ''}{'/' if cfg.mixup_alpha and cfg.cutmix_alpha else ''}"
             f"{'CutMix' if cfg.cutmix_alpha else ''} on batches (train acc@1 = predictions of the dominant label)"
             if cfg.mixup_alpha or cfg.cutmix_alpha else "")
          + f"\nprecision: {precision.describe()}, chosen: {describe_choice(cfg.precision_used)}"
          + f"\nLR schedule: {cfg.sched}, {cfg.optimizer}")
    if resume.start_epoch >= cfg.max_epoch:
        print(f"nothing to train: the run already finished epoch {resume.start_epoch} of --max_epoch {cfg.max_epoch}; "
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


def describe_balance(cfg: TrainConfig, train_set, classes: list[str], class_weights) -> None:
    """--class_weights / --sampler: the class counts and what each does with them."""
    if cfg.class_weights == "none" and cfg.sampler == "random":
        return
    counts = class_counts(targets_of(train_set), len(classes)).tolist()
    more = ", ..." if len(classes) > 10 else ""
    print("train images per class: " + ", ".join(f"{c} {n}" for c, n in zip(classes[:10], counts[:10])) + more)
    if class_weights is not None:
        weights = class_weights.tolist()
        print("class weights (balanced, n / (classes x count)): "
              + ", ".join(f"{c} {w:.3f}" for c, w in zip(classes[:10], weights[:10])) + more)
    if cfg.sampler == "balanced":
        print(f"sampler: balanced (each epoch draws {len(train_set)} images with replacement, every class equally likely)")


def validate(model, state: TrainState, loader, device, num_classes: int, criterion, cfg: TrainConfig, recorder: RunRecorder, epoch: int,
             tta: str = "none") -> dict:
    """Validation loss/acc@1/acc@5 of the EMA model when there is one (TensorBoard also gets the raw model's, as
    val_no_ema/, and the evaluation's pictures). With tta, the keys are suffixed _tta and the result is printed.
    Every process takes the same path: the metrics are summed over processes."""
    options = {"criterion": criterion, "amp": state.amp, "amp_dtype": state.amp_dtype, "channels_last": state.channels_last,
               "show_progress": not cfg.quiet, "tta": tta}
    ema, board = state.ema, cfg.tensorboard and tta == "none"
    if ema is not None:
        ema.sync_buffers()  # under torchrun, validate (and save) rank 0's BatchNorm statistics on every process
    val = evaluate(ema.module if ema is not None else model, loader, device, num_classes, **options,
                   **(evaluation_details(cfg, epoch) if board else {}))
    raw = evaluate(model, loader, device, num_classes, **options) if ema is not None and board else None
    if board and recorder.dashboard is not None:
        recorder.dashboard.add_evaluation(epoch, val, raw)
    suffix = "" if tta == "none" else "_tta"
    out = {f"val_{key}{suffix}": getattr(val, key) for key in ("loss", "acc1", "acc5")}
    if tta != "none" and recorder.enabled:
        print(f"final weights with {tta} TTA: val loss {val.loss:.4f} acc@1 {val.acc1:.4f} acc@5 {val.acc5:.4f}")
    return out


if __name__ == "__main__":
    cli.run(main)
