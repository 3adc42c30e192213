"""What a training run shows and keeps per epoch: results.csv, the epoch line, results.png, and (with --tensorboard)
everything its TrainingDashboard logs (utils/training/dashboard.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from utils.io import atomic_write_text
from utils.plots import plot_results

if TYPE_CHECKING:
    from utils.training.dashboard import TrainingDashboard

CSV_COLUMNS = ["epoch", "lr", "train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5", "seconds"]
EXTRA_COLUMNS = ["val_loss_tta", "val_acc1_tta", "val_acc5_tta"]  # only when train.py --tta ran


class RunRecorder:
    """One run's records. Only the main process writes (`enabled`); every process keeps `history` so the
    checkpoints it may save carry it."""

    def __init__(self, run_dir: Path, *, max_epoch: int, history: list[dict] | None = None, enabled: bool = True,
                 dashboard: TrainingDashboard | None = None):
        self.run_dir, self.max_epoch, self.enabled = Path(run_dir), max_epoch, enabled
        self.history: list[dict] = list(history or [])
        self.dashboard = dashboard if enabled else None
        self.log_dir = str(self.dashboard.log_dir) if self.dashboard is not None else None
        # classes, args (TrainConfig.to_dict()) and other files (name -> text), written after the first epoch
        self.pending: tuple[list[str], dict, dict[str, str]] | None = None

    def start(self, classes: list[str], args: dict, files: dict[str, str] | None = None) -> None:
        """classes.txt, args.json and the run's other descriptive `files` (name -> text: split.json,
        skipped_images.txt), kept until the first epoch ends (write_identity): a run that fails before that leaves
        the directory as it was (--exist_ok or --resume reuse an earlier run's). `args` is serialised only then, so
        what the first epoch decides (--time_budget's epoch count) is in it."""
        self.pending = (classes, args, dict(files or {}))

    def write_identity(self) -> None:
        if self.pending is not None and self.enabled:
            classes, args, files = self.pending
            files = {"classes.txt": "\n".join(classes) + "\n", "args.json": json.dumps(args, indent=2) + "\n", **files}
            for name, text in files.items():
                atomic_write_text(self.run_dir / name, text)
        self.pending = None

    def set_args(self, args: dict) -> None:
        """The run changed its own settings (--time_budget fixed the epoch count): args.json and the epoch line follow."""
        self.max_epoch = args["max_epoch"]
        if self.dashboard is not None:
            self.dashboard.max_epoch = self.max_epoch
        if self.pending is not None:  # args.json is still to be written: with these
            self.pending = (self.pending[0], args, self.pending[2])
        elif self.enabled:
            atomic_write_text(self.run_dir / "args.json", json.dumps(args, indent=2) + "\n")

    def log_step(self, step: int, values: dict) -> None:
        """Per-iteration training values (every --log_every micro-batches) as train_step/<key> scalars."""
        if self.dashboard is not None:
            self.dashboard.log_step(step, values)

    def add(self, row: dict) -> None:
        self.history.append(row)

    def truncate(self, last_epoch: int) -> None:
        """Drop rows after `last_epoch` (1-based), e.g. an epoch interrupted after its row was added."""
        self.history[:] = [r for r in self.history if r["epoch"] <= last_epoch]

    def add_to_last_row(self, values: dict) -> None:
        """Extra columns for the last epoch (e.g. the final TTA validation), written to results.csv at once."""
        if self.history:
            self.history[-1].update(values)
            if self.enabled:
                self.write_csv()

    def write_epoch(self, row: dict, images_per_s: float) -> None:
        """results.csv rewritten with every row, the epoch to TensorBoard, one line on stdout."""
        if not self.enabled:
            return
        self.write_identity()
        self.write_csv()
        if self.dashboard is not None:
            self.dashboard.epoch_end(row, self.history, images_per_s)
        val_text = (f"val loss {row['val_loss']:.4f} acc@1 {row['val_acc1']:.4f} acc@5 {row['val_acc5']:.4f}"
                    if "val_acc1" in row else "no validation")
        print(f"epoch {row['epoch']}/{self.max_epoch}  train loss {row['train_loss']:.4f} acc@1 {row['train_acc1']:.4f}  "
              f"{val_text}  lr {row['lr']:.2e}  {row['seconds']:.1f}s ({images_per_s:.0f} img/s)", flush=True)

    def write_csv(self) -> None:
        buf = io.StringIO()
        extra = [k for k in EXTRA_COLUMNS if any(k in row for row in self.history)]
        columns = CSV_COLUMNS + extra
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
        atomic_write_text(self.run_dir / "results.csv", buf.getvalue())

    def plot(self) -> None:
        if self.enabled and self.history:
            plot_results(self.history, self.run_dir / "results.png")

    def close(self) -> None:
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None
