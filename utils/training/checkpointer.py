"""The run's checkpoint policy (timm's CheckpointSaver idea): what goes into last.pth and best.pth, when, and
how a run continues from one.

- last.pth after every finished epoch, with everything --resume needs; best.pth when validation acc@1 improves,
  without the optimizer, scheduler and scaler state (as Ultralytics strips best.pt): a third of last.pth with
  AdamW, half with EMA, and all that eval, export, predict, quantize and --init_from read (network identity,
  weights, EMA, epoch, step, best_acc1, history, args, split). --resume refuses it and names last.pth.
- Interrupted (Ctrl-C, SIGTERM; utils/training/interrupt.py stops at an optimizer-step boundary): last.pth holds
  the state of that step, labelled as what it is: the last *finished* epoch in `epoch`, plus `partial` (the epoch
  in progress, the micro-batches done of it, its running sums and the random generators at that step:
  engine.EpochProgress), so --resume trains the rest of that epoch exactly as an uninterrupted run would. A second
  signal (a step that does not end) or a stop outside training leaves the last saved last.pth as it is.
  (A SIGKILL cannot be handled: the end-of-epoch last.pth survives it.)
- Start: temporary files that killed saves of earlier runs left in the run directory are removed.
- Resume: model, optimizer, scheduler position, scaler, EMA, history and best acc@1 come back (no RNG state:
  every epoch is seeded from (seed, epoch); the `rng` entry of older checkpoints is ignored);
  the checkpoint is dropped from memory afterwards by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from utils.checkpoint import Checkpoint, save_checkpoint
from utils.io import remove_stale_temps
from utils.training.ema import ModelEMA, unwrap
from utils.training.engine import EpochProgress, TrainState

RESUME_ONLY = ("optimizer", "scheduler", "scaler")  # in last.pth, left out of best.pth


@dataclass
class ResumePoint:
    """Where a run starts: epoch 0 of a new run, or after the checkpoint's last finished epoch."""

    start_epoch: int = 0
    step: int = 0
    best_acc1: float = -1.0  # below any accuracy: the first evaluation always writes best.pth (even at acc@1 0)
    history: list[dict] = field(default_factory=list)
    log_dir: str | None = None  # the run's TensorBoard directory (train.py --tensorboard), continued on resume
    partial: EpochProgress | None = None  # how far into start_epoch the checkpoint's run was stopped

    def start_at(self, epoch: int, state: TrainState) -> None:
        """--start_epoch: begin at `epoch` (0-based), with the LR schedule at that epoch's first step."""
        self.start_epoch, self.partial = epoch, None
        state.step = epoch * state.scheduler.steps_per_epoch
        state.scheduler.seek(state.step)


def restore(ckpt: Checkpoint, *, model: nn.Module, state: TrainState) -> ResumePoint:
    """Load a last.pth into the freshly built model, optimizer, scheduler, scaler and EMA."""
    model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scaler.is_enabled() and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None and ckpt.get("ema"):
        state.ema.load_state_dict(ckpt["ema"])
    step = ckpt.get("step", 0)
    # checkpoints written before the LRScheduler carry no scheduler state: the position is the step count
    state.scheduler.load_state_dict(ckpt.get("scheduler") or {"last_epoch": step})
    state.step = step
    partial = ckpt.get("partial")
    return ResumePoint(ckpt["epoch"] + 1, step, ckpt["best_acc1"], list(ckpt.get("history", [])),
                       (ckpt.get("args") or {}).get("tensorboard_dir"),
                       EpochProgress.from_dict(partial) if partial else None)


class CheckpointSaver:
    """Writes last.pth / best.pth of one run. `identity` holds what describes the network (model_name, classes,
    preprocess, model_kwargs, augment, args, ...); `finished` is the last epoch whose last.pth is on disk."""

    def __init__(self, run_dir: Path, *, identity: dict, model: nn.Module, state: TrainState, history: list[dict],
                 best_acc1: float = -1.0, finished: int = -1, enabled: bool = True):
        self.run_dir, self.identity, self.model, self.state = Path(run_dir), identity, model, state
        self.history, self.best_acc1, self.finished, self.enabled = history, best_acc1, finished, enabled
        if enabled:
            for path in remove_stale_temps(self.run_dir):
                print(f"removed {path.name} (a temporary file of a killed save)")

    def assemble(self, epoch: int) -> Checkpoint:
        state, ema = self.state, self.state.ema
        return Checkpoint(
            **self.identity, epoch=epoch, model=unwrap(self.model).state_dict(), optimizer=state.optimizer.state_dict(),
            scheduler=state.scheduler.state_dict(), scaler=state.scaler.state_dict() if state.scaler.is_enabled() else None,
            ema=ema.state_dict() if isinstance(ema, ModelEMA) else None, best_acc1=self.best_acc1, step=state.step,
            history=self.history, torch_version=str(torch.__version__),
        )

    def epoch_end(self, epoch: int, val_acc1: float | None) -> bool:
        """After epoch `epoch` (0-based): track the best acc@1, write last.pth (and best.pth). Returns is_best."""
        is_best = val_acc1 is not None and val_acc1 > self.best_acc1
        if is_best:
            self.best_acc1 = val_acc1
        if self.enabled:
            ckpt = self.assemble(epoch)
            save_checkpoint(ckpt, self.run_dir / "last.pth")
            self.finished = epoch
            if is_best:
                save_checkpoint({k: v for k, v in ckpt.items() if k not in RESUME_ONLY}, self.run_dir / "best.pth")
        return is_best

    def rewrite_last(self) -> None:
        """last.pth again, as of the same finished epoch, after the history gained values (the final TTA row)."""
        if self.enabled and self.finished >= 0:
            save_checkpoint(self.assemble(self.finished), self.run_dir / "last.pth")

    def interrupted(self, progress: EpochProgress | None) -> Path | None:
        """Save last.pth at the step where training stopped (`progress` into the epoch after the last finished one;
        the history keeps the finished epochs' rows only). None: nothing newer than the last.pth on disk."""
        self.history[:] = [r for r in self.history if r["epoch"] <= self.finished + 1]
        if not self.enabled or progress is None:
            return None
        ckpt = self.assemble(self.finished)
        ckpt["partial"] = progress.to_dict()
        return save_checkpoint(ckpt, self.run_dir / "last.pth")
