"""--resume after a hard kill repeats the uninterrupted run exactly; Ctrl-C saves last.pth and exits."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_fashion_root


@pytest.fixture(scope="module")
def resume_root(tmp_path_factory) -> Path:
    # enough training images that an epoch lasts long enough to be killed in the middle
    return make_fashion_root(tmp_path_factory.mktemp("fm_resume"), n_train=960, n_test=64)


def train_cmd(data_root: Path, out: Path, *extra: str, max_epoch: int = 3) -> list[str]:
    return [sys.executable, "train.py", "--model", "custom", "--img_size", "28", "--max_epoch", str(max_epoch),
            "--batch_size", "32", "--num_workers", "0", "--seed", "7", "--data_root", str(data_root),
            "--path_to_save", str(out), "--quiet", "--device", "cpu", *extra]


def start(cmd: list[str], log: Path, as_background_job: bool = False) -> subprocess.Popen:
    # one thread each: the reference run trains beside the interrupted one, and oversubscribed threads crawl
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1")

    def ignore_sigint() -> None:  # what a shell does to a `cmd &` job
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=ignore_sigint if as_background_job else None)


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


@pytest.mark.parametrize("extra", [[], ["--ema", "--ema_decay", "0.99"]], ids=["plain", "ema"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, resume_root, extra):
    ref_out, cut_out = tmp_path / "reference", tmp_path / "interrupted"
    ref_dir, cut_dir = ref_out / "FashionMNIST" / "custom", cut_out / "FashionMNIST" / "custom"
    reference = start(train_cmd(resume_root, ref_out, *extra), tmp_path / "reference.log")  # runs meanwhile

    log = tmp_path / "interrupted.log"
    proc = start(train_cmd(resume_root, cut_out, *extra), log)
    wait_for_rows(proc, cut_dir, 2, log)
    proc.send_signal(signal.SIGKILL)  # no handler can run: only the end-of-epoch-2 checkpoint survives
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(csv_rows(cut_dir)) == 2, "epoch 3 finished before the kill"
    assert load(cut_dir / "last.pth")["epoch"] == 1

    resume_log = tmp_path / "resume.log"
    resumed = start(train_cmd(resume_root, cut_out, *extra, "--resume", str(cut_dir / "last.pth")), resume_log)
    assert finish(resumed, resume_log) == 0, resume_log.read_text()
    assert "epoch 3/3" in resume_log.read_text() and "epoch 1/3" not in resume_log.read_text()
    assert finish(reference, tmp_path / "reference.log") == 0, (tmp_path / "reference.log").read_text()

    ref, res = load(ref_dir / "last.pth"), load(cut_dir / "last.pth")
    assert ref["epoch"] == res["epoch"] == 2 and ref["step"] == res["step"] == 3 * (960 // 32)
    assert_same_tensors(ref["model"], res["model"], "model")
    if extra:
        assert ref["ema"]["updates"] == res["ema"]["updates"] == ref["step"]
        assert_same_tensors(ref["ema"]["module"], res["ema"]["module"], "ema")
        assert not torch.equal(ref["ema"]["module"]["classifier.1.weight"], ref["model"]["classifier.1.weight"])
    assert ref["optimizer"]["state"].keys() == res["optimizer"]["state"].keys()
    for key, state in ref["optimizer"]["state"].items():
        assert_same_tensors(state, res["optimizer"]["state"][key], f"optimizer state {key}")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in csv_rows(ref_dir)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in csv_rows(cut_dir)]
    assert [int(r["epoch"]) for r in csv_rows(cut_dir)] == [1, 2, 3]


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


def test_ctrl_c_saves_last_pth_and_resume_finishes(tmp_path, resume_root):
    out = tmp_path / "runs"
    run_dir = out / "FashionMNIST" / "custom"
    log = tmp_path / "train.log"
    proc = start(train_cmd(resume_root, out, max_epoch=4), log)
    wait_for_rows(proc, run_dir, 1, log)
    proc.send_signal(signal.SIGINT)
    assert finish(proc, log, timeout=120) == 130, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text
    assert "interrupted in epoch" in text and "continue with --resume" in text
    done = csv_rows(run_dir)
    last = load(run_dir / "last.pth")
    assert len(done) < 4
    assert last["epoch"] == len(done) - 1  # resume restarts the interrupted epoch
    assert [h["epoch"] for h in last["history"]] == [int(r["epoch"]) for r in done]

    resume_log = tmp_path / "resume.log"
    resumed = start(train_cmd(resume_root, out, "--resume", str(run_dir / "last.pth"), max_epoch=4), resume_log)
    assert finish(resumed, resume_log) == 0, resume_log.read_text()
    assert [int(r["epoch"]) for r in csv_rows(run_dir)] == [1, 2, 3, 4]
    assert load(run_dir / "last.pth")["epoch"] == 3


def test_sigterm_saves_last_pth_even_in_a_background_job(tmp_path, resume_root):
    """`python train.py ... &` then `kill PID`: the shell ignored SIGINT for the job; SIGTERM must still stop and save."""
    out = tmp_path / "runs"
    run_dir = out / "FashionMNIST" / "custom"
    log = tmp_path / "train.log"
    proc = start(train_cmd(resume_root, out, max_epoch=6), log, as_background_job=True)
    wait_for_rows(proc, run_dir, 1, log)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log, timeout=120) == 130, log.read_text()
    text = log.read_text()
    assert "interrupted in epoch" in text and "Traceback" not in text
    last = load(run_dir / "last.pth")
    assert last["epoch"] == len(csv_rows(run_dir)) - 1 < 5
