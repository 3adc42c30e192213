"""torchrun with 2 CPU processes (gloo): it trains, only rank 0 writes, and validation sees each image exactly once;
two torchrun "nodes" meeting at a c10d rendezvous train the same weights as one process with their global batch."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    earlier = out / "FashionMNIST" / "custom"  # an earlier run: this one must go to custom-2, on both processes
    earlier.mkdir(parents=True)
    (earlier / "best.pth").write_bytes(b"earlier run")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes" in proc.stdout
    assert proc.stdout.count("epoch 1/2") == 1 and proc.stdout.count("best val acc@1") == 1  # rank 0 prints

    run_dir = out / "FashionMNIST" / "custom-2"
    # rank 0 chose the directory and both processes used it: no custom-3, the earlier run untouched
    assert [line for line in proc.stdout.splitlines() if line.startswith("run_dir: ")] == [f"run_dir: {run_dir}"] * 2
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["custom", "custom-2", "custom-latest"]
    assert sorted(p.name for p in earlier.iterdir()) == ["best.pth"] and (earlier / "best.pth").read_bytes() == b"earlier run"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ResNet18 with GroupNorm and no augmentation: no BatchNorm batch statistics, no dropout and no random augmentation,
# so a step's gradient depends only on which images the global batch holds, not on how they are split over processes
MULTINODE_FLAGS = ["--model", "resnet18", "--img_size", "8", "--norm_type", "GN", "--augment", "none", "--optimizer", "sgd",
                   "--base_lr", "0.01", "--wp_epoch", "0", "--max_epoch", "2", "--num_workers", "0", "--seed", "3",
                   "--quiet", "--device", "cpu"]


def run_two_nodes(data_root: Path, out: Path, logs: Path, per_process_batch: int, timeout: float = 300) -> None:
    """`torchrun --nnodes 2` twice, as on two machines, meeting at a c10d rendezvous on 127.0.0.1.

    Each torchrun and its worker run in their own process group; on a failure or timeout both groups are killed.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for attempt in range(3):  # the free port can be taken between finding it and binding it: try another
        port = free_port()
        procs, paths = [], [logs / f"node{rank}_try{attempt}.log" for rank in (0, 1)]
        try:
            for rank, path in enumerate(paths):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                       "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                       "--rdzv_id", "multinode-test", "--max_restarts", "0", "train.py", *MULTINODE_FLAGS,
                       "--batch_size", str(per_process_batch), "--data_root", str(data_root), "--path_to_save", str(out)]
                with open(path, "w") as log:
                    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            deadline = time.monotonic() + timeout
            codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        text = "".join(f"--- {path.name}\n{path.read_text()}" for path in paths)
        if codes == [0, 0]:
            return
        if codes is not None and "address already in use" in text.lower() and attempt < 2:
            continue
        raise AssertionError(f"two-node torchrun {'timed out' if codes is None else f'exited {codes}'}:\n{text}")


@pytest.mark.slow
def test_two_node_torchrun_equals_one_process_with_the_global_batch(tmp_path):
    """Two nodes x 1 process x 16 images = one process x 32 images: the same samples in every step (DistributedSampler
    and the single process's RandomSampler draw the same permutation from seed + epoch; rank r takes every other
    index of it), and DDP averages the two 16-image mean gradients into the 32-image mean gradient. The weights agree
    up to float rounding (the batch sums and the all-reduce add in a different order): max |diff| < 1e-5."""
    data_root = make_fashion_root(tmp_path / "fm", n_train=96, n_test=40)
    run_two_nodes(data_root, tmp_path / "nodes", tmp_path, per_process_batch=16)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="")
    single = subprocess.run([sys.executable, "train.py", *MULTINODE_FLAGS, "--batch_size", "32", "--data_root", str(data_root),
                             "--path_to_save", str(tmp_path / "single")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr

    nodes = torch.load(tmp_path / "nodes" / "FashionMNIST" / "resnet18" / "last.pth", map_location="cpu", weights_only=True)
    one = torch.load(tmp_path / "single" / "FashionMNIST" / "resnet18" / "last.pth", map_location="cpu", weights_only=True)
    assert nodes["step"] == one["step"] == 2 * (96 // 32)
    assert nodes["model"].keys() == one["model"].keys()
    torch.manual_seed(3)  # the initial weights both runs started from (train.py seeds with --seed + rank, rank 0 here)
    from models import build_model, model_kwargs

    start = build_model("resnet18", 10, **model_kwargs(8, "GN")).state_dict()
    moved = max((one["model"][k] - start[k]).abs().max().item() for k in start)
    diff = max((nodes["model"][k] - one["model"][k]).abs().max().item() for k in one["model"])
    assert moved > 1e-2, "the weights hardly changed: the comparison would prove nothing"
    print(f"two nodes vs one process: max |weight diff| {diff:.3g}; weights moved up to {moved:.3g}")
    assert diff < 1e-5, f"two nodes and one process differ by {diff:.3g} (weights moved {moved:.3g})"
    for a, b in zip(nodes["history"], one["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5) and a["val_acc1"] == b["val_acc1"]
