"""What both benchmarks share: machine facts, a contention warning, the markdown table and the JSON file."""

from __future__ import annotations

import itertools
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils import io  # noqa: E402
from utils.io import markdown_table  # noqa: E402
from utils.precision import bf16_native, cpu_capability, cpu_model  # noqa: E402
from utils.timing import median_seconds  # noqa: E402


def machine_info(device: torch.device) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": cpu_capability(), "bf16_native": bf16_native(device),
        "torch": str(torch.__version__), "python": platform.python_version(),
        "device": str(device), "load_average_1min": round(load[0], 2),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_busy_seconds() -> float | None:
    """CPU-seconds all cores have spent busy since boot (/proc/stat), or None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


class OtherLoad:
    """How many cores OTHER processes kept busy while a benchmark ran: the machine's busy CPU time minus this
    process's and its finished children's (DataLoader workers). Load averages cannot tell: they count the
    benchmark's own threads too."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float | None, float]:
        t = os.times()
        return time.monotonic(), machine_busy_seconds(), t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float | None:
        (wall0, busy0, own0), (wall1, busy1, own1) = self.start, self._sample()
        if busy0 is None or busy1 is None:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9)


def contention_note(meter: OtherLoad, cores: int) -> str | None:
    """A sentence for the report when other processes competed for the CPU during the run."""
    others = meter.cores()
    if others is None or others <= 0.2:
        return None
    return (f"CPU contended: other processes kept {others:.2f} of the {cores} cores busy on average during this run. "
            "Absolute numbers are low and noisy; ratios between rows of this run remain comparable.")


def command_line(script: str, argv: list[str] | None) -> str:
    """The exact command, with the environment variables that change CPU threading when they are set."""
    args = sys.argv[1:] if argv is None else argv
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if os.environ.get(k)]
    return shlex.join([*env, "python", f"benchmarks/{script}", *args])


def format_cell(value) -> str:
    """Floats with 3 significant digits (or as integers when large); missing values as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of result dicts; columns: (key, header)."""
    return markdown_table([h for _, h in columns], [[row.get(k) for k, _ in columns] for row in rows], format_cell)


def write_json(path: str | Path, payload: dict) -> Path:
    return io.write_json(path, payload, default=str)


class Take:
    """The first `n` batches of a loader (or the next `n` of an endless batch iterator), with len() as
    utils.training.engine.train_one_epoch expects: a timed slice of an epoch."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(self.batches, self.n)


def matmul_peaks(n: int, device: torch.device, warmup: int = 2, repeats: int = 5) -> dict[str, float | None]:
    """GFLOP/s of an n x n x n fp32 and bf16 matrix product on `device`, on the threads the benchmark runs with: the
    machine's practical peak, to set a training step's achieved GFLOP/s against (bf16 None where it is not native,
    as a peak of emulated bf16 means nothing)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    peaks: dict[str, float | None] = {}
    for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if kind == "bf16" and not bf16_native(device):
            peaks[kind] = None
            continue
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        peaks[kind] = 2 * n ** 3 / median_seconds(lambda a=a, b=b: torch.mm(a, b), warmup, repeats, sync) / 1e9
    return peaks
