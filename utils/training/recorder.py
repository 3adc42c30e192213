"""What a training run shows and keeps per epoch: results.csv, TensorBoard scalars, the epoch line, results.png."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from utils.io import atomic_write_text
from utils.plots import plot_results

CSV_COLUMNS = ["epoch", "lr", "train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5", "seconds"]
EXTRA_COLUMNS = ["val_loss_tta", "val_acc1_tta", "val_acc5_tta"]  # only when train.py --tta ran


class RunRecorder:
    """One run's records. Only the main process writes (`enabled`); every process keeps `history` so the
    checkpoints it may save carry it."""

    def __init__(self, run_dir: Path, *, max_epoch: int, history: list[dict] | None = None, enabled: bool = True,
                 log_dir: Path | None = None):
        self.run_dir, self.max_epoch, self.enabled = Path(run_dir), max_epoch, enabled
        self.history: list[dict] = list(history or [])
        self.writer = None
        self.log_dir = str(log_dir) if log_dir is not None else None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.log_dir)

    def start(self, classes: list[str], args: dict) -> None:
        """classes.txt and args.json, written when the run begins."""
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "classes.txt", "\n".join(classes) + "\n")
            atomic_write_text(self.run_dir / "args.json", json.dumps(args, indent=2) + "\n")

    def set_max_epoch(self, max_epoch: int, args) -> None:
        """The run's length changed (--time_budget): record it in args (and so in the checkpoints) and args.json."""
        if max_epoch != self.max_epoch:
            self.max_epoch = args.max_epoch = max_epoch
            if self.enabled:
                atomic_write_text(self.run_dir / "args.json", json.dumps(vars(args), indent=2) + "\n")

    def log_step(self, step: int, values: dict) -> None:
        """Per-iteration training values (every --log_every micro-batches) as train_step/<key> scalars."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train_step/{key}", value, step)

    def log_scalars(self, prefix: str, values: dict, epoch: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, epoch)

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
        """results.csv rewritten with every row, the epoch's scalars to TensorBoard, one line on stdout."""
        if not self.enabled:
            return
        self.write_csv()
        if self.writer is not None:
            for key in ("train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5"):
                if row.get(key) is not None:
                    split, metric = key.split("_", 1)
                    self.writer.add_scalar(f"{split}/{metric}", row[key], row["epoch"])
            self.writer.add_scalar("lr", row["lr"], row["epoch"])
            self.writer.flush()
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
        if self.writer is not None:
            self.writer.close()
            self.writer = None
