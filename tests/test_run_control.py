"""Who owns a run directory, and how long a run lasts: one run at a time per directory (a lock a killed run does not
leave stuck); a --time_budget only ever shortens a run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_main

FAST = ["--model", "custom", "--img_size", "16", "--batch_size", "64", "--num_workers", "0", "--quiet", "--device", "cpu"]


def test_a_second_run_into_a_directory_in_use_is_refused_and_a_killed_run_does_not_leave_it_locked(tmp_path, fashion_root):
    out = tmp_path / "runs"
    args = ["--data_root", str(fashion_root), "--path_to_save", str(out), "--name", "shared", "--exist_ok", *FAST]
    run_dir = out / "FashionMNIST" / "shared"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "train.py", *args, "--max_epoch", "500"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert first.stdout.readline().strip() == f"run_dir: {run_dir}"  # it holds the directory from here on
        while not first.stdout.readline().startswith("epoch 1/500"):  # until its first last.pth is written
            assert first.poll() is None
        in_use = [f"error: {run_dir} is in use by a run that is still going (pid {first.pid}); fix: wait for it to end, or "
                  "choose another --name (without --exist_ok a new run never reuses a directory)"]
        before = (run_dir / "args.json").read_bytes()
        second = run_main("train.py", *args, "--max_epoch", "1")
        assert second.returncode == 2 and second.stderr.splitlines() == in_use, second.stdout + second.stderr
        resumed = run_main("train.py", "--resume", str(run_dir / "last.pth"), "--data_root", str(fashion_root))
        assert resumed.returncode == 2 and resumed.stderr.splitlines() == in_use, resumed.stdout + resumed.stderr
        assert (run_dir / "args.json").read_bytes() == before  # neither wrote into the run
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (run_dir / ".lock").exists()  # SIGKILL left the file; the kernel released the lock with the process
    again = run_main("train.py", *args, "--max_epoch", "1")
    assert again.returncode == 0, again.stderr
    assert not (run_dir / ".lock").exists()  # a run that ends removes it
    assert json.loads((run_dir / "args.json").read_text())["max_epoch"] == 1


def test_a_time_budget_never_lengthens_a_run(tmp_path, fashion_root):
    started = time.perf_counter()
    result = run_main("train.py", "--data_root", str(fashion_root), "--path_to_save", str(tmp_path), *FAST,
                      "--max_epoch", "2", "--time_budget", "100000")
    assert result.returncode == 0, result.stderr
    assert ": all 2 epochs of --max_epoch fit (the budget only shortens a run)" in result.stdout
    run = tmp_path / "FashionMNIST" / "custom"
    assert len((run / "results.csv").read_text().splitlines()) == 1 + 2
    assert json.loads((run / "args.json").read_text())["max_epoch"] == 2
    assert time.perf_counter() - started < 120


def test_resume_keeps_the_tta_columns_and_records_the_flags_it_could_not_change(tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "parts", per_class=8, splits=("train",)) / "train"  # no val/: the run splits it
    base = ["--dataset", str(data), "--path_to_save", str(tmp_path / "runs"), "--model", "custom", "--img_size", "16",
            "--batch_size", "8", "--num_workers", "0", "--quiet", "--device", "cpu", "--tta", "flip"]
    assert run_main("train.py", *base, "--max_epoch", "1", "--val_fraction", "0.25").returncode == 0
    run = tmp_path / "runs" / "train" / "custom"
    first = (run / "results.csv").read_text().splitlines()
    assert first[0].endswith("val_loss_tta,val_acc1_tta,val_acc5_tta") and len(first) == 2
    resumed = run_main("train.py", *base, "--max_epoch", "2", "--val_fraction", "0.5", "--resume", str(run / "last.pth"))
    assert resumed.returncode == 0, resumed.stderr
    assert "note: --val_fraction 0.5 has no effect on --resume: the run continues with 0.25" in resumed.stdout
    rows = (run / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1] == first[1]  # epoch 1's TTA values survive the resume
    assert all(cell != "" for cell in rows[2].split(","))  # and epoch 2, the last, has its own
    assert json.loads((run / "args.json").read_text())["val_fraction"] == 0.25


def test_the_first_evaluation_writes_best_pth_even_at_acc1_zero(tmp_path):
    import torch

    from utils.training.checkpointer import CheckpointSaver
    from utils.training.engine import TrainState
    from utils.training.schedule import WarmupSchedule

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(optimizer=optimizer, scheduler=WarmupSchedule(optimizer, steps_per_epoch=1, max_epoch=2, wp_epoch=0,
                                                                      base_lr=0.1, min_lr=0.0))
    saver = CheckpointSaver(tmp_path, identity={"model_name": "x", "num_classes": 2, "classes": ["a", "b"]}, model=model,
                            state=state, history=[])
    assert saver.epoch_end(0, 0.0) is True and (tmp_path / "best.pth").is_file()
    assert saver.epoch_end(1, 0.0) is False  # not better: best.pth stays the first
    assert torch.load(tmp_path / "best.pth", weights_only=True)["epoch"] == 0


def test_quiet_hides_every_progress_bar_even_on_a_terminal(tmp_path):
    """On a terminal train.py draws bars for the folder check, the cache build, the epochs and validation; --quiet
    draws none of them."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    import numpy as np
    from PIL import Image

    for split, n in (("train", 520), ("val", 40)):  # train: above the folder check's bar threshold (500 files)
        for i in range(n):
            folder = tmp_path / "many" / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            size = (10 + i % 3, 12 + i % 2)  # sizes differ: the run builds its decode-once cache
            Image.fromarray(np.full((*size, 3), 40 + 180 * (i % 2), np.uint8)).save(folder / f"{i}.png")

    def terminal_output(*extra: str) -> str:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
        cmd = [sys.executable, "train.py", "--dataset", str(tmp_path / "many"), "--model", "custom", "--img_size", "8",
               "--max_epoch", "1", "--batch_size", "64", "--num_workers", "0", "--device", "cpu",
               "--path_to_save", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), *extra]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg"),
                                stdout=slave, stderr=slave)
        os.close(slave)
        seen = b""
        while True:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    chunk = b""
                if chunk:
                    seen += chunk
                    continue
            if proc.poll() is not None:
                break
        os.close(master)
        assert proc.wait() == 0, seen.decode(errors="replace")[-2000:]
        return seen.decode(errors="replace")

    shown = terminal_output()
    for desc in ("checking train/ images", "caching train images", "epoch 1", "val"):
        assert re.search(re.escape(desc) + r": +\d+%\|", shown), (desc, shown[-3000:])
    quiet = terminal_output("--quiet")
    assert "%|" not in quiet and "\r" not in quiet.replace("\r\n", "\n"), quiet[-3000:]
    assert "epoch 1/1" in quiet  # the epoch line itself stays
