"""TensorBoard end to end: train.py --tensorboard logs a short run, the real `tensorboard` server (started with the
Makefile's `make tensorboard` command, on 127.0.0.1 at a free port) serves it, and its HTTP data API returns the
run, the per-epoch tags and exactly the values in the run's results.csv."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TAG_TO_COLUMN = {"train/loss": "train_loss", "train/acc1": "train_acc1", "val/loss": "val_loss", "val/acc1": "val_acc1",
                 "val/acc5": "val_acc5", "lr": "lr"}
READY_TIMEOUT_S = 90


def make_tensorboard_command() -> list[str]:
    """The command `make tensorboard` runs, with this interpreter's environment as VENV."""
    venv = Path(sys.executable).parent.parent
    out = subprocess.run(["make", "--no-print-directory", "-n", "tensorboard", f"VENV={venv}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    return shlex.split(lines[0])


def flag_value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_bytes(base: str, path: str, **params) -> bytes:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def get_json(base: str, path: str, **params):
    return json.loads(get_bytes(base, path, **params))


@contextlib.contextmanager
def serve(log_dir: Path, output: Path, ready: Callable[[str], bool]) -> Iterator[str]:
    """The real server (the command `make tensorboard` runs) on `log_dir` at 127.0.0.1 and a free port; yields its
    base URL once `ready(base)` is true, and stops it (with its data-server child) afterwards."""
    port = free_port()
    cmd = make_tensorboard_command()
    cmd[cmd.index("--logdir") + 1] = str(log_dir)
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--bind_all"):cmd.index("--bind_all") + 1] = ["--host", "127.0.0.1"]  # loopback only in tests
    base = f"http://127.0.0.1:{port}"
    # Own session: the server and its data-server child are stopped together by process group.
    log = open(output, "w+")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, last_error = time.monotonic() + READY_TIMEOUT_S, None
        while time.monotonic() < deadline:
            assert server.poll() is None, f"tensorboard exited with {server.returncode}: {output.read_text()}"
            try:
                if ready(base):
                    break
            except OSError as e:  # not listening yet, or still loading
                last_error = e
            time.sleep(0.3)
        else:
            pytest.fail(f"tensorboard served no complete data within {READY_TIMEOUT_S} s: {last_error}")
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory, fashion_root):
    """(log_dir, results.csv rows) of a 2-epoch FashionCNN run at 28 px with --tensorboard."""
    import train

    out = tmp_path_factory.mktemp("tb_run")
    code = train.main(["--model", "custom", "--img_size", "28", "--max_epoch", "2", "--wp_epoch", "0", "--batch_size", "32",
                       "--num_workers", "0", "--data_root", str(fashion_root), "--path_to_save", str(out / "weights"),
                       "--tensorboard", "--log_dir", str(out / "logs"), "--quiet", "--device", "cpu", "--base_lr", "3e-3"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "weights" / "FashionMNIST" / "custom" / "results.csv")))
    return out / "logs", rows


def test_make_tensorboard_serves_logs_on_all_interfaces_port_6006():
    cmd = make_tensorboard_command()
    assert Path(cmd[0]).name == "tensorboard" and Path(cmd[0]).exists(), cmd
    assert "--bind_all" in cmd, "without --bind_all TensorBoard is unreachable from outside the container"
    assert flag_value(cmd, "--port") == "6006" and flag_value(cmd, "--logdir") == "logs"


def test_tensorboard_serves_the_training_scalars(tensorboard_run, tmp_path):
    log_dir, rows = tensorboard_run

    def ready(base: str) -> bool:
        tags = get_json(base, "/data/plugin/scalars/tags")
        return bool(tags) and all(set(TAG_TO_COLUMN) <= set(t) for t in tags.values())

    with serve(log_dir, tmp_path / "tensorboard.log", ready) as base:
        tags = get_json(base, "/data/plugin/scalars/tags")
        runs = get_json(base, "/data/runs")
        (run,) = runs
        assert run.startswith("FashionMNIST/custom/"), run  # <log_dir>/<dataset>/<run dir name>/<time>/
        assert set(TAG_TO_COLUMN) <= set(tags[run])
        for tag, column in TAG_TO_COLUMN.items():
            points = get_json(base, "/data/plugin/scalars/scalars", run=run, tag=tag)  # [[wall_time, step, value], ...]
            assert [p[1] for p in points] == [int(r["epoch"]) for r in rows], tag
            # TensorBoard keeps float32: equal to the CSV's float64 up to float32 rounding.
            assert [p[2] for p in points] == pytest.approx([float(r[column]) for r in rows], rel=1e-6, abs=1e-9), tag
        assert float(rows[-1]["val_acc1"]) > 0.5  # the logged run learned (10 classes: chance 0.1)
