"""torchrun with 2 CPU processes (gloo): it trains, only rank 0 writes, and validation sees each image exactly once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_fashion_root
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

import eval as eval_script
from utils.data.samplers import ShardSampler


@pytest.mark.parametrize("length,world", [(101, 2), (7, 3), (2, 4)])
def test_shard_sampler_covers_every_index_once(length, world):
    shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert sum(len(ShardSampler(length, rank, world)) for rank in range(world)) == length


def test_torchrun_two_processes_on_cpu(tmp_path):
    data_root = make_fashion_root(tmp_path / "fm", n_train=200, n_test=101)  # odd: padding would repeat an image
    out, logs = tmp_path / "runs", tmp_path / "logs"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--model", "custom", "--img_size", "28", "--max_epoch", "2", "--wp_epoch", "0", "--batch_size", "20",
           "--num_workers", "0", "--data_root", str(data_root), "--path_to_save", str(out), "--quiet",
           "--tensorboard", "--log_dir", str(logs), "--base_lr", "3e-3", "--ema", "--ema_decay", "0.9"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes" in proc.stdout
    assert proc.stdout.count("epoch 1/2") == 1 and proc.stdout.count("best val acc@1") == 1  # rank 0 prints

    run_dir = out / "FashionMNIST" / "custom"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["best.pth", "last.pth", "classes.txt", "args.json", "results.csv", "results.png"])
    (event_file,) = logs.rglob("events.out.tfevents.*")  # one SummaryWriter (its file name holds the pid)
    board = EventAccumulator(str(event_file.parent), size_guidance={"tensors": 0})
    board.Reload()
    # the PR counts are summed over both processes: at threshold 0 every one of the 101 images counts for each class
    for tag in ("val_pr/Bag", "val_pr/Shirt"):
        counts = tensor_util.make_ndarray(board.Tensors(tag)[-1].tensor_proto)  # rows TP, FP, TN, FN, precision, recall
        assert counts[0, 0] + counts[1, 0] == 101, tag

    last = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    assert last["step"] == 2 * (100 // 20)  # each process trains on its half of the 200 images
    assert "module." not in next(iter(last["model"]))  # the DDP wrapper is not saved

    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = torch.load(run_dir / "best.pth", map_location="cpu", weights_only=True)
    row = rows[best["epoch"]]
    report_path = tmp_path / "eval.json"
    assert eval_script.main(["--weights", str(run_dir / "best.pth"), "--data_root", str(data_root), "--output",
                             str(report_path), "--speed_repeats", "0", "--num_workers", "0", "--device", "cpu", "--quiet"]) == 0
    report = json.loads(report_path.read_text())
    assert report["num_images"] == 101
    # the 2-process validation summed over both shards equals a single-process eval of the same (EMA) weights:
    # a padded or repeated image would shift the mean loss of 101 images, and so would a process validating its own
    # EMA BatchNorm statistics instead of rank 0's
    assert float(row["val_loss"]) == pytest.approx(report["loss"], rel=1e-5)
    assert float(row["val_acc1"]) == pytest.approx(report["acc1"], abs=1e-7)
    assert float(row["val_acc5"]) == pytest.approx(report["acc5"], abs=1e-7)
    assert float(row["val_acc1"]) == best["best_acc1"]
