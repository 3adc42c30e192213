"""--resume repeats the uninterrupted run exactly: after a hard kill (the end-of-epoch last.pth), and after Ctrl-C or
SIGTERM at any point (stopped at an optimizer step, in the first epoch, in the middle of a later one, during
validation; the tensor pipeline and DataLoader workers), results.csv and every weight equal the uninterrupted run's."""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import random
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_fashion_root

N_TRAIN, N_TEST, BATCH = 1920, 640, 32  # 60 steps per epoch: long enough to be stopped inside one
CONFIGS = {"tensor": ["--ema", "--ema_decay", "0.99", "--label_smoothing", "0.1"],
           "pil": ["--data_pipeline", "pil", "--num_workers", "2", "--mixup_alpha", "0.2"]}


@pytest.fixture(scope="module")
def resume_root(tmp_path_factory) -> Path:
    return make_fashion_root(tmp_path_factory.mktemp("fm_resume"), n_train=N_TRAIN, n_test=N_TEST)


def train_cmd(data_root: Path, out: Path, *extra: str, max_epoch: int = 3) -> list[str]:
    return [sys.executable, "train.py", "--model", "custom", "--img_size", "28", "--max_epoch", str(max_epoch),
            "--batch_size", str(BATCH), "--num_workers", "0", "--seed", "7", "--data_root", str(data_root),
            "--path_to_save", str(out), "--device", "cpu", "--precision", "fp32", "--memory_format", "nchw", *extra]
    # fixed precision: an uninterrupted run and a resumed one are compared bit for bit, and each fresh run of 180 steps
    # would otherwise probe for its own (timing-dependent) choice


ENV = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1")  # one thread: runs overlap


def start(cmd: list[str], log: Path, as_background_job: bool = False) -> subprocess.Popen:
    def ignore_sigint() -> None:  # what a shell does to a `cmd &` job
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with open(log, "w") as f:
        return subprocess.Popen([*cmd, "--quiet"], cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=ignore_sigint if as_background_job else None)


@pytest.fixture(scope="module")
def references(resume_root, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted 3-epoch run of each configuration (started together, one thread each)."""
    out = tmp_path_factory.mktemp("references")
    procs = {name: start(train_cmd(resume_root, out / name, *extra), out / f"{name}.log") for name, extra in CONFIGS.items()}
    for name, proc in procs.items():
        assert finish(proc, out / f"{name}.log") == 0, (out / f"{name}.log").read_text()
    return {name: out / name / "FashionMNIST" / "custom" for name in CONFIGS}


def csv_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wait_for_rows(proc: subprocess.Popen, run_dir: Path, n: int, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(csv_rows(run_dir)) < n:
        assert proc.poll() is None, f"training ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no epoch {n} after {timeout}s:\n{log.read_text()}"
        time.sleep(0.005)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"training did not finish:\n{log.read_text()}") from None


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs by {(a[key].float() - b[key].float()).abs().max()}"


def assert_same_run(ref_dir: Path, run_dir: Path) -> None:
    """The whole final state and every results.csv value but the seconds are the uninterrupted run's."""
    ref, res = load(ref_dir / "last.pth"), load(run_dir / "last.pth")
    assert ref["epoch"] == res["epoch"] == 2 and ref["step"] == res["step"] == 3 * (N_TRAIN // BATCH)
    assert "partial" not in res
    assert_same_tensors(ref["model"], res["model"], "model")
    if ref.get("ema"):
        assert ref["ema"]["updates"] == res["ema"]["updates"] == ref["step"]
        assert_same_tensors(ref["ema"]["module"], res["ema"]["module"], "ema")
    assert ref["optimizer"]["state"].keys() == res["optimizer"]["state"].keys()
    for key, state in ref["optimizer"]["state"].items():
        assert_same_tensors(state, res["optimizer"]["state"][key], f"optimizer state {key}")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in csv_rows(ref_dir)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in csv_rows(run_dir)] and len(strip) == 3


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, resume_root, references):
    cut_out = tmp_path / "interrupted"
    cut_dir = cut_out / "FashionMNIST" / "custom"
    log = tmp_path / "interrupted.log"
    proc = start(train_cmd(resume_root, cut_out, *CONFIGS["tensor"]), log)
    wait_for_rows(proc, cut_dir, 2, log)
    proc.send_signal(signal.SIGKILL)  # no handler can run: only the end-of-epoch-2 checkpoint survives
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(csv_rows(cut_dir)) == 2, "epoch 3 finished before the kill"
    assert load(cut_dir / "last.pth")["epoch"] == 1

    resume_log = tmp_path / "resume.log"
    resumed = start(train_cmd(resume_root, cut_out, *CONFIGS["tensor"], "--resume", str(cut_dir / "last.pth")), resume_log)
    assert finish(resumed, resume_log) == 0, resume_log.read_text()
    assert "epoch 3/3" in resume_log.read_text() and "epoch 1/3" not in resume_log.read_text()
    assert_same_run(references["tensor"], cut_dir)


def open_terminal() -> tuple[int, int]:
    """A pseudo-terminal 200 columns wide (tqdm draws nothing in a terminal of width 0)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    return master, slave


def stop_when_shown(cmd: list[str], pattern: str, sig: signal.Signals, log: Path, as_background_job: bool = False,
                    timeout: float = 300) -> int:
    """Run `cmd` with its progress bars drawn on a pseudo-terminal (so tqdm shows them, as in a user's terminal) and send
    `sig` once its output matches `pattern`; returns the exit code. The whole output goes to `log`."""
    master, slave = open_terminal()

    def child_setup() -> None:
        if as_background_job:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=slave, stderr=slave, preexec_fn=child_setup)
    os.close(slave)
    seen, sent, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk and proc.poll() is not None:
                    break
                seen += chunk
                if not sent and re.search(pattern.encode(), seen):
                    proc.send_signal(sig)
                    sent = True
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        log.write_bytes(seen)
    assert sent, f"{pattern!r} never appeared:\n{seen.decode(errors='replace')[-3000:]}"
    return code


@pytest.mark.parametrize(("config", "pattern", "sig", "where"), [
    ("tensor", r"epoch 1: +\d+%\|[^\r]*\| *(1[5-9]|[2-4]\d)/60", signal.SIGINT, "mid"),  # Ctrl-C in the first epoch
    ("tensor", r"val: ", signal.SIGTERM, "validation"),  # docker stop during the first validation
    ("pil", r"epoch 2: +\d+%\|[^\r]*\| *(1[5-9]|[2-4]\d)/60", signal.SIGTERM, "mid"),  # DataLoader workers, 2nd epoch
], ids=["ctrl_c_in_epoch_1", "sigterm_in_validation", "sigterm_in_epoch_2_with_workers"])
def test_stopped_at_any_point_then_resumed_equals_an_uninterrupted_run(tmp_path, resume_root, references, config, pattern,
                                                                      sig, where):
    out = tmp_path / "runs"
    run_dir = out / "FashionMNIST" / "custom"
    log = tmp_path / "stopped.log"
    code = stop_when_shown(train_cmd(resume_root, out, *CONFIGS[config]), pattern, sig, log,
                           as_background_job=sig == signal.SIGTERM)
    text = log.read_text(errors="replace")
    assert code == 130 and "Traceback" not in text, text[-3000:]
    last = load(run_dir / "last.pth")
    partial = last["partial"]
    stopped_epoch = last["epoch"] + 2  # 1-based: the epoch after the last finished one
    if where == "mid":  # the signal waited for the step to end
        assert "stopping after this optimizer step to save the run" in text
        assert 0 < partial["batches"] < partial["of"] == N_TRAIN // BATCH, partial["batches"]
        assert last["step"] == (stopped_epoch - 1) * 60 + partial["batches"]
        assert f"interrupted in epoch {stopped_epoch} after batch {partial['batches']} of 60" in text
    else:
        assert partial["batches"] == partial["of"] == 60 and last["step"] == stopped_epoch * 60
        assert f"interrupted in epoch {stopped_epoch} after its training, before validation" in text
    assert len(csv_rows(run_dir)) == stopped_epoch - 1 == len(last["history"])
    assert f"continue with --resume {run_dir / 'last.pth'}" in text

    resume_log = tmp_path / "resume.log"
    resumed = start(train_cmd(resume_root, out, *CONFIGS[config], "--resume", str(run_dir / "last.pth")), resume_log)
    assert finish(resumed, resume_log) == 0, resume_log.read_text()
    assert_same_run(references[config], run_dir)


def test_a_second_signal_stops_at_once_and_never_saves_a_half_step(tmp_path, resume_root):
    """Ctrl-C, then Ctrl-C again while the step still runs (a slow step: ResNet18 on 512 images, one thread): the
    second one stops at once, and the half-done step is not saved (here no epoch had finished: no last.pth at all)."""
    out = tmp_path / "runs"
    run_dir = out / "FashionMNIST" / "resnet18"
    cmd = [sys.executable, "train.py", "--model", "resnet18", "--img_size", "32", "--batch_size", "512", "--max_epoch", "1",
           "--num_workers", "0", "--data_root", str(resume_root), "--path_to_save", str(out), "--device", "cpu"]
    master, slave = open_terminal()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=slave, stderr=slave)
    os.close(slave)
    seen = b""

    def read_until(pattern: bytes) -> None:
        nonlocal seen
        while not re.search(pattern, seen):
            assert proc.poll() is None, seen.decode(errors="replace")
            if select.select([master], [], [], 0.05)[0]:
                seen += os.read(master, 65536)

    try:
        read_until(rb"epoch 1: ")
        proc.send_signal(signal.SIGINT)
        read_until(rb"stopping after this optimizer step")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert "Traceback" not in text and "interrupted in epoch 1: nothing saved yet (no epoch had finished)" in text, text[-2000:]
    assert not run_dir.exists() or not [p.name for p in run_dir.iterdir() if p.suffix == ".pth" or ".tmp" in p.name]


def test_resume_is_exact_whatever_rng_state_the_checkpoint_carries(tmp_path, fashion_root):
    """train.py reseeds every epoch from (seed, epoch) before it draws anything (flips, dropout), so the RNG state a
    checkpoint carried decided nothing and is no longer saved: a last.pth given a foreign `rng` entry (as older
    checkpoints have one) still resumes to the uninterrupted run, bit for bit."""
    import train

    common = ["--model", "custom", "--img_size", "8", "--batch_size", "32", "--num_workers", "0", "--data_root",
              str(fashion_root), "--quiet", "--device", "cpu", "--ema", "--ema_decay", "0.99",
              "--wp_epoch", "0", "--base_lr", "3e-3", "--min_lr", "3e-3"]  # constant LR: 1 epoch = the first of 2
    assert train.main([*common, "--max_epoch", "2", "--path_to_save", str(tmp_path / "ref")]) == 0
    assert train.main([*common, "--max_epoch", "1", "--path_to_save", str(tmp_path / "cut")]) == 0
    ref_dir, cut_dir = tmp_path / "ref" / "FashionMNIST" / "custom", tmp_path / "cut" / "FashionMNIST" / "custom"
    ckpt = load(cut_dir / "last.pth")
    ckpt["rng"] = {"torch": torch.Generator().manual_seed(12345).get_state(), "python": random.Random(12345).getstate(),
                   "numpy": torch.from_numpy(np.random.RandomState(12345).get_state()[1].astype(np.int64))}
    torch.save(ckpt, cut_dir / "last.pth")
    assert train.main([*common, "--max_epoch", "2", "--path_to_save", str(tmp_path / "cut"),
                       "--resume", str(cut_dir / "last.pth")]) == 0
    ref, res = load(ref_dir / "last.pth"), load(cut_dir / "last.pth")
    assert ref["epoch"] == res["epoch"] == 1 and ref["step"] == res["step"] == 2 * (320 // 32)
    assert_same_tensors(ref["model"], res["model"], "model")
    assert_same_tensors(ref["ema"]["module"], res["ema"]["module"], "ema")
    for key, state in ref["optimizer"]["state"].items():
        assert_same_tensors(state, res["optimizer"]["state"][key], f"optimizer state {key}")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in csv_rows(ref_dir)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in csv_rows(cut_dir)] and len(strip) == 2
