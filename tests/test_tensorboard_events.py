"""TensorBoard scalars, read back with tensorboard's own EventAccumulator, equal the values in results.csv."""

from __future__ import annotations

import csv

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train

EPOCH_TAGS = {"val/loss": "val_loss", "val/acc1": "val_acc1", "val/acc5": "val_acc5", "train/loss": "train_loss",
              "train/acc1": "train_acc1", "lr": "lr"}


def test_tensorboard_scalars_equal_results_csv(tmp_path, fashion_root):
    logs, out = tmp_path / "logs", tmp_path / "runs"
    code = train.main(["--model", "custom", "--img_size", "28", "--max_epoch", "2", "--batch_size", "32",
                       "--num_workers", "0", "--data_root", str(fashion_root), "--path_to_save", str(out), "--quiet",
                       "--device", "cpu", "--tensorboard", "--log_dir", str(logs), "--log_every", "3", "--ema"])
    assert code == 0
    event_files = list(logs.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    assert event_files[0].parent.parent == logs / "FashionMNIST" / "custom"  # logs/<dataset>/<model>/<time>/

    acc = EventAccumulator(str(event_files[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(EPOCH_TAGS) <= tags
    assert {"train_step/loss", "train_step/acc1", "train_step/lr"} <= tags
    assert {"val_no_ema/loss", "val_no_ema/acc1", "val_no_ema/acc5"} <= tags  # raw weights beside the EMA's

    with open(out / "FashionMNIST" / "custom" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for tag, column in EPOCH_TAGS.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2], tag
        for event, row in zip(events, rows):
            assert event.value == pytest.approx(float(row[column]), rel=1e-6, abs=1e-9), (tag, event.step)

    # 10 iterations per epoch, a point every 3 and at the end of each epoch: steps 3, 6, 9, 10 then 13, 16, 19, 20
    for tag in ("train_step/loss", "train_step/acc1", "train_step/lr"):
        assert [e.step for e in acc.Scalars(tag)] == [3, 6, 9, 10, 13, 16, 19, 20], tag
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("train_step/acc1"))
    assert acc.Scalars("train_step/lr")[-1].value == pytest.approx(float(rows[-1]["lr"]), rel=1e-6)
