"""Screenshots of TensorBoard's dashboards for docs/tensorboard.md, taken by headless Chromium from Debian's packages.

Run by hand (CI never needs Chromium):

    apt-get install -y chromium
    python scripts/tensorboard_screenshots.py --logdir logs --out docs/images

It starts the project's `tensorboard` on 127.0.0.1 at a free port on --logdir, waits until the server has loaded
the runs, and writes one PNG per dashboard (tensorboard_<name>.png). TensorBoard renders its dashboards in the
browser from the data API, so each page gets --virtual-time-budget milliseconds of (virtual) time before the shot.
Look at the PNGs before committing them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import cli  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.io import atomic_path  # noqa: E402

# name -> (URL fragment, window width, height in CSS pixels, device scale factor); the legacy dashboards keep their tag
# filter and smoothing in the fragment. Image cards are small: the images page is rendered at twice the resolution.
DASHBOARDS = {
    "scalars": ("#scalars&_smoothingWeight=0&tagFilter=%5E(val%7Ctrain)%2F", 1600, 1000, 1),
    "images": ("#images&tagFilter=%5E(val%7Ctrain)%2F", 1100, 1160, 2),
    "hparams": ("#hparams", 1600, 700, 1),
    "pr_curves": ("#pr_curves", 1600, 1100, 1),
    "text": ("#text", 1600, 1100, 1),
}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(base: str, server: subprocess.Popen, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise InputError(f"tensorboard exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/data/runs", timeout=5) as response:
                runs = json.loads(response.read())
            if runs:
                time.sleep(3)  # the data server loads tags after it lists the runs
                return runs
        except OSError:
            pass
        time.sleep(0.5)
    raise InputError(f"tensorboard served no run from the log directory within {timeout:.0f} s")


def screenshot(chromium: str, url: str, out: Path, width: int, height: int, scale: int, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, atomic_path(out) as tmp:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--force-device-scale-factor={scale}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={tmp}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_ms / 1000 + 120)
        if proc.returncode != 0 or not tmp.is_file():
            raise InputError(f"chromium failed on {url}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")


def main(argv: list[str] | None = None) -> int:
    p = cli.OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", default="logs", help="TensorBoard log directory to serve")
    p.add_argument("--out", default="docs/images", help="where the PNGs go")
    p.add_argument("--dashboards", nargs="+", default=list(DASHBOARDS), choices=list(DASHBOARDS), help="which dashboards")
    p.add_argument("--virtual-time-budget", type=cli.positive(), default=20000, dest="budget",
                   help="milliseconds of page time before each screenshot")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="the Chromium binary")
    args = p.parse_args(argv)
    if not shutil.which(args.chromium):
        raise InputError("no chromium: install Debian's package with `apt-get install -y chromium`")
    if not Path(args.logdir).is_dir():
        raise InputError(f"no log directory {args.logdir}: train with --tensorboard first")
    tensorboard = Path(sys.executable).parent / "tensorboard"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(tensorboard), "--logdir", args.logdir, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        runs = wait_for_runs(base, server)
        print(f"tensorboard on {base}: {len(runs)} runs")
        for name in args.dashboards:
            fragment, width, height, scale = DASHBOARDS[name]
            out = Path(args.out) / f"tensorboard_{name}.png"
            screenshot(args.chromium, f"{base}/{fragment}", out, width, height, scale, args.budget)
            print(f"{name}: {out}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    from utils.cli import run

    run(main)
