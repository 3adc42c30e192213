"""train.py --tensorboard: the run's dashboard in TensorBoard.

- HParams: the flags that matter and the final and best metrics, the same keys and types for every run of a
  --log_dir, so runs line up in the HParams table and parallel-coordinates view.
- Scalars per epoch: train/ and val/ loss and acc@1 (acc@5), lr, images/s, time/ (epoch seconds, training
  minutes), memory/ peaks, the raw model's val_no_ema/ beside the EMA's, best/; per iteration (every --log_every):
  train_step/ loss, acc1, lr, images/s and the gradient norm (measured on the device, read at the log points'
  existing host sync).
- Images at capped evaluations (IMAGE_EVALUATIONS per run): the confusion matrix, the misclassified validation
  images with their probabilities; once at the start, a grid of augmented training images as the network sees them.
  PR curves per class at the same evaluations; per-class accuracy and precision at every evaluation (above
  TAGGED_CLASSES classes: those of the lowest-F1 classes of that evaluation, every class in the text table).
- Text: command line, resolved arguments, environment. Graph: traced once, or skipped with a one-line note.

One TensorBoard run across --resume: the checkpoint's args name the log directory and the resumed run writes into it.
Two x-axes share the run: the optimizer step for per-iteration values and the run's text (STEP_AXIS tags), the epoch
for everything else. TensorBoard purges one step for all tags, so a run resumed after epoch E (optimizer step S)
purges from step E + 1 and writes the step-axis values of steps E + 1 to S again, read back from its own event
files: what the resumed run repeats (a partly logged epoch, or epochs after an older checkpoint) appears once.
Evaluations are held until `epoch_end`, which train.py calls after the epoch's last.pth is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from utils.data.preprocess import Preprocess, denormalize
from utils.distributed import world_size
from utils.evaluation.dashboard import detail_options, evaluation_figures, log_evaluation, log_per_class
from utils.evaluation.loop import EvalResult
from utils.plots import GRID_LABEL_CHARS, close_figures, examples_figure, short_label
from utils.precision import autocast_dtype
from utils.tensorboard import (
    add_figure,
    add_graph,
    add_markdown,
    add_values,
    command_line,
    environment_markdown,
    experiment_summary,
    logged_values,
    open_writer,
    session_end_summary,
    session_start_summary,
)
from utils.training.config import TrainConfig
from utils.training.ema import unwrap
from utils.training.precision_choice import describe_choice

# name -> type of every hparam a training run logs (types fixed, so runs of one --log_dir line up)
HPARAMS = {"model": str, "dataset": str, "img_size": int, "pretrained": bool, "batch_size": int, "accumulation": int,
           "processes": int, "optimizer": str, "base_lr": float, "weight_decay": float, "label_smoothing": float,
           "augment": str, "random_erasing": float, "precision": str, "channels_last": bool, "ema": bool,
           "max_epoch": int, "seed": int}
HPARAMS_SHOWN = ("model", "img_size", "optimizer", "base_lr", "augment")  # the HParams table's default columns
# scalar tag -> column title in the HParams table (the last value logged is the run's value)
METRICS = {"val/acc1": "val acc@1 (last)", "val/acc5": "val acc@5 (last)", "val/loss": "val loss (last)",
           "best/val_acc1": "best val acc@1", "best/val_acc5": "val acc@5 at best", "best/val_loss": "val loss at best",
           "best/epoch": "best epoch", "train/loss": "train loss (last)", "train/acc1": "train acc@1 (last)",
           "time/train_minutes": "training minutes", "train/images_per_s": "images/s (last epoch)"}
STEP_AXIS = ("train_step/", "run/")  # tags whose x is the optimizer step (the rest: the epoch)
IMAGE_EVALUATIONS = 10  # evaluations with pictures and PR curves per run (TensorBoard keeps 10 per tag by default)
PREVIEW_IMAGES = 32
GIB = 1024**3


def image_epochs(max_epoch: int, eval_epoch: int, cap: int = IMAGE_EVALUATIONS) -> set[int]:
    """The evaluated epochs (1-based) that get pictures and PR curves: all of them up to `cap`, otherwise `cap`
    spread evenly, the first and the last included."""
    evaluated = [e for e in range(1, max_epoch + 1) if e % eval_epoch == 0 or e == max_epoch]
    if len(evaluated) <= cap:
        return set(evaluated)
    return {evaluated[round(i * (len(evaluated) - 1) / (cap - 1))] for i in range(cap)}


def evaluation_details(cfg: TrainConfig, epoch: int) -> dict:
    """The evaluate() options for `epoch`: PR counts and mistakes at picture epochs with --tensorboard. Every process
    must ask for the same (the PR counts are summed over processes), so this depends on the flags only."""
    return detail_options() if cfg.tensorboard and epoch in image_epochs(cfg.max_epoch, cfg.eval_epoch) else {}


def run_log_dir(log_root: str, run_dir: Path, dataset: str, previous: str | None) -> tuple[Path, bool]:
    """(directory, continued): the resumed run's own directory when it lies under --log_dir (`log_root`), otherwise a
    new <log_dir>/<dataset>/<run directory's name>/<start time>/."""
    if previous and Path(previous).resolve().is_relative_to(Path(log_root).resolve()):
        return Path(previous), True
    return Path(log_root) / dataset / run_dir.name / time.strftime("%Y%m%d-%H%M%S"), False


def precision_name(state, device: torch.device) -> str:
    """What the training state really runs (--fp16 may have fallen back to float32): fp32, fp16 or bf16."""
    if not state.amp:
        return "fp32"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[autocast_dtype(device, state.amp_dtype)]


class TrainingDashboard:
    """The TensorBoard writer of one training run (main process only) and what goes into it."""

    def __init__(self, log_dir: Path, *, classes: list[str], pre: Preprocess, device: torch.device, max_epoch: int,
                 eval_epoch: int, start_epoch: int = 0, step: int = 0, continued: bool = False, name: str = ""):
        """`continued`: `log_dir` holds this run's earlier legs, to be continued after `start_epoch` finished
        epochs and `step` optimizer steps."""
        self.name = name or Path(log_dir).name  # the run's name in TensorBoard, relative to --log_dir
        self.log_dir, self.classes, self.pre, self.device, self.max_epoch = Path(log_dir), classes, pre, device, max_epoch
        self.continued = continued
        if continued:
            kept = [v for v in logged_values(self.log_dir, lambda tag: tag.startswith(STEP_AXIS)) if start_epoch < v[1] <= step]
            self.writer = open_writer(self.log_dir, purge_step=start_epoch + 1)
            add_values(self.writer, kept)
        else:
            self.writer = open_writer(self.log_dir)
        self.epoch = start_epoch  # finished epochs: the x of what is logged before the next epoch ends
        self.pending: list[tuple[int, dict, dict | None]] = []  # evaluations held until their epoch's checkpoint
        self.ended = False

    @classmethod
    def open(cls, cfg: TrainConfig, run_dir: Path, resume, identity: dict, *, model: nn.Module, state,
             device: torch.device) -> TrainingDashboard:
        """Choose the directory (`log_dir`: the caller stores it as the config's tensorboard_dir, so the checkpoint
        carries it), log the start and attach to the training state (gradient norm, the first batch's picture).
        `identity`: the checkpoint's description of the network (classes, preprocess, augment)."""
        dataset = run_dir.parent.name  # <path_to_save>/<dataset>/<run name>
        log_dir, continued = run_log_dir(cfg.log_dir, run_dir, dataset, resume.log_dir)
        board = cls(log_dir, classes=identity["classes"], pre=Preprocess.from_dict(identity["preprocess"]), device=device,
                    max_epoch=cfg.max_epoch, eval_epoch=cfg.eval_epoch, start_epoch=resume.start_epoch, step=state.step,
                    continued=continued, name=Path(os.path.relpath(log_dir, cfg.log_dir)).as_posix())
        if continued:
            print(f"TensorBoard: continuing {log_dir} after optimizer step {state.step} (what it logged later is dropped)")
        board.log_start(replace(cfg, tensorboard_dir=str(log_dir)), state, dataset, identity["augment"]["name"], model)
        state.track_grad_norm = True
        state.on_first_batch = board.log_training_batch
        return board

    def log_start(self, cfg: TrainConfig, state, dataset: str, augment: str, model: nn.Module) -> None:
        """Text at every (re)start; the HParams session and the graph once per run."""
        step, processes = state.step, world_size()
        add_markdown(self.writer, "run/command_line", f"```\n{command_line()}\n```", step)
        add_markdown(self.writer, "run/args", f"```json\n{json.dumps(cfg.to_dict(), indent=2, default=str)}\n```", step)
        add_markdown(self.writer, "run/environment", environment_markdown(self.device, processes), step)
        if cfg.precision_used:  # what --precision/--memory_format auto chose, and the step times behind it
            add_markdown(self.writer, "run/precision", describe_choice(cfg.precision_used), step)
        if self.continued:
            return
        values = {**{key: getattr(cfg, key) for key in HPARAMS if hasattr(cfg, key)}, "dataset": dataset, "augment": augment,
                  "precision": precision_name(state, self.device), "channels_last": state.channels_last, "processes": processes}
        hparams = {key: kind(values[key]) for key, kind in HPARAMS.items()}
        self.writer.file_writer.add_summary(experiment_summary(HPARAMS, METRICS, HPARAMS_SHOWN))
        self.writer.file_writer.add_summary(session_start_summary(hparams, group_name=self.name))
        net = unwrap(model)
        example = torch.zeros(1, self.pre.channels, self.pre.img_size, self.pre.img_size, device=self.device)
        if state.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        note = add_graph(self.writer, net, example)
        if note:
            print(f"TensorBoard graph skipped: {note}")
        self.writer.flush()

    def log_training_batch(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """The first training batch after each (re)start, de-normalised, titled with its classes (Mixup: the dominant one)."""
        images = images[:PREVIEW_IMAGES].detach().float().cpu()
        titles = ([short_label(self.classes[t], GRID_LABEL_CHARS) for t in targets[:PREVIEW_IMAGES].tolist()] if targets.ndim == 1
                  else [""] * len(images))
        fig = examples_figure([denormalize(image.numpy(), self.pre) for image in images], titles)
        add_figure(self.writer, "train/augmented_batch", fig, self.epoch)
        close_figures(fig)
        self.writer.flush()

    def log_step(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"train_step/{key}", value, step)

    def add_evaluation(self, epoch: int, stats: EvalResult, raw: EvalResult | None = None) -> None:
        """Hold an evaluation (and the raw model's, when validation used the EMA) until `epoch_end`."""
        self.pending.append((epoch, stats, raw))

    def epoch_end(self, row: dict, history: list[dict], images_per_s: float) -> None:
        """Everything of the finished epoch, written after its checkpoint."""
        w, epoch = self.writer, row["epoch"]
        for key in ("train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5"):
            if row.get(key) is not None:
                split, metric = key.split("_", 1)
                w.add_scalar(f"{split}/{metric}", row[key], epoch)
        w.add_scalar("lr", row["lr"], epoch)
        w.add_scalar("train/images_per_s", images_per_s, epoch)
        w.add_scalar("time/epoch_seconds", row["seconds"], epoch)
        w.add_scalar("time/train_minutes", sum(r["seconds"] for r in history) / 60, epoch)
        self.log_memory(epoch)
        for evaluated, stats, raw in self.pending:
            if raw is not None:
                for key in ("loss", "acc1", "acc5"):
                    w.add_scalar(f"val_no_ema/{key}", getattr(raw, key), evaluated)
            log_per_class(w, stats, self.classes, evaluated, "val", table=stats.pr_curves is not None)
            if stats.pr_curves is not None:  # a picture epoch (evaluation_details)
                figures = evaluation_figures(stats, self.classes, self.pre, f"epoch {evaluated}")
                log_evaluation(w, stats, figures, self.classes, evaluated, "val")
                close_figures(*figures.values())
        self.pending.clear()
        validated = [r for r in history if r.get("val_acc1") is not None]
        if validated:
            best = max(validated, key=lambda r: r["val_acc1"])  # the first of equals, as best.pth keeps it
            for key in ("val_acc1", "val_acc5", "val_loss"):
                w.add_scalar(f"best/{key}", best[key], epoch)
            w.add_scalar("best/epoch", best["epoch"], epoch)
        self.epoch = epoch
        if epoch == self.max_epoch:
            w.file_writer.add_summary(session_end_summary("STATUS_SUCCESS"))
            self.ended = True
        w.flush()

    def log_memory(self, epoch: int) -> None:
        """Peak memory since the previous epoch's end: the GPU's allocator on CUDA, the process's RSS on the host."""
        if self.device.type == "cuda":
            self.writer.add_scalar("memory/gpu_peak_allocated_gib", torch.cuda.max_memory_allocated(self.device) / GIB, epoch)
            self.writer.add_scalar("memory/gpu_peak_reserved_gib", torch.cuda.max_memory_reserved(self.device) / GIB, epoch)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            import resource
        except ImportError:  # Windows
            return
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
        self.writer.add_scalar("memory/host_peak_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / GIB, epoch)

    def close(self) -> None:
        """A run that raised is marked failed in the HParams table; one interrupted by Ctrl-C stays open for --resume."""
        error = sys.exc_info()[1]
        if not self.ended and isinstance(error, Exception):
            self.writer.file_writer.add_summary(session_end_summary("STATUS_FAILURE"))
        self.writer.close()
