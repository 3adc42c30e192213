"""CLI pieces shared by the scripts: common flags, device choice, and the one-line error exit. Torch-free at import."""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Callable, Sequence

from utils.errors import InputError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the description's line breaks."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An invalid flag is one line on stderr (no usage block), exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def parser(description: str) -> argparse.ArgumentParser:
    return OneLineErrorParser(description=description, formatter_class=HelpFormatter)


def add_device_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, choices=["auto", "cpu", "cuda"],
                   help="where to run: auto = CUDA when available, else CPU")


def add_model_override_arg(p: argparse.ArgumentParser) -> None:
    """-m/--model for scripts that read a checkpoint: the network name normally comes from the checkpoint."""
    p.add_argument("-m", "--model", default=None, help="override the model name stored in the checkpoint")


def add_data_args(p: argparse.ArgumentParser, *, batch_size: int = 64, num_workers: int = 2,
                  from_checkpoint: bool = False) -> None:
    """--dataset, --data_root, --batch_size, --num_workers. from_checkpoint: the defaults are the data the
    checkpoint was trained on (quantize.py, benchmarks) instead of Fashion-MNIST under data/."""
    where = "default: the checkpoint's dataset" if from_checkpoint else "default: Fashion-MNIST"
    p.add_argument("--dataset", default=None, metavar="PATH",
                   help=f"image-folder dataset with train/ and val/ (or test/) holding one folder per class; {where}")
    p.add_argument("--data_root", default=None if from_checkpoint else "data",
                   help="where Fashion-MNIST lives (<data_root>/FashionMNIST/raw/) or is downloaded to"
                        + ("; default: the checkpoint's" if from_checkpoint else ""))
    p.add_argument("--skip_bad_images", action="store_true",
                   help="image folders: leave out the files Pillow cannot read (listed on stderr) instead of stopping with "
                        "that list (exit 2)")
    p.add_argument("--batch_size", type=positive(), default=batch_size, help="images per batch (per process under torchrun)")
    p.add_argument("--num_workers", type=non_negative(), default=num_workers,
                   help="DataLoader worker processes (0 = load in the main process)")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """--cache and --cache_dir: the decode-once image cache of image folders (utils/data/cache.py)."""
    p.add_argument("--cache", default="auto", choices=["auto", "off"],
                   help="decode-once cache for image folders: the first run decodes every image once (shorter side to "
                        "the eval resize, img_size*256/224, and its central square; val: the exact eval crop), stores the "
                        "uint8 pixels in a memory-mapped .npy under --cache_dir, and every epoch and later run reads them "
                        "and augments in batches with the tensor pipeline (on the GPU when training there). Rebuilt "
                        "when any file is added, removed, replaced or touched. auto = use it for image folders (GPU or CPU: "
                        "benchmarks/bench_photos.py measured it faster than the PIL workers at every size on 2 CPU cores, "
                        "4.2x for FashionCNN at 64 px; README table), unless --data_pipeline pil, the images already share one size no "
                        "larger than the cached one, or the files would take more than half the free disk; off = never "
                        "(Fashion-MNIST never needs it)")
    p.add_argument("--cache_dir", default="data/.cache", metavar="DIR",
                   help="where the cache files live (safe to delete; a run rebuilds what it needs)")


def add_tensorboard_args(p: argparse.ArgumentParser, what: str, where: str) -> None:
    """--tensorboard and --log_dir for scripts that log `what` to TensorBoard under <log_dir>/`where`/."""
    p.add_argument("--tensorboard", action="store_true", help=f"also log {what} to TensorBoard under <log_dir>/{where}/")
    p.add_argument("--log_dir", default="logs", help="TensorBoard root (serve it with: tensorboard --logdir logs --port 6006)")


def explicit_dests(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags actually given on the command line (not left at their defaults)."""
    probe = copy.deepcopy(p)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(probe.parse_args(argv)))


def resolve_device(choice: str, require_cuda: bool = False):
    """'auto' picks CUDA when present; asking for CUDA on a machine without it is an input error."""
    import torch

    if require_cuda or choice == "cuda":
        if not torch.cuda.is_available():
            raise InputError("CUDA was requested (--cuda / --device cuda) but torch sees no GPU: use --device cpu")
        return torch.device("cuda")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cpu")


def _number(kind, text: str):
    """`text` as an int or a finite float; argparse shows the ArgumentTypeError's message on one line."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _described(check, kind, invalid: list[str]):
    """Name the check after its type (argparse: "invalid int value") and keep values it refuses (tests feed them)."""
    check.__name__ = kind.__name__
    check.invalid_examples = invalid + (["nan", "inf"] if kind is float else ["1.5"])
    return check


def positive(kind=int) -> Callable[[str], int | float]:
    def check(text: str):
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return _described(check, kind, ["0", "-1", "x"])


def non_negative(kind=int) -> Callable[[str], int | float]:
    def check(text: str):
        value = _number(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return _described(check, kind, ["-1", "x"])


def in_range(low: float, high: float, *, kind=float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A number in [low, high] (an open end excludes its bound: e.g. label smoothing in [0, 1))."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(text: str):
        value = _number(kind, text)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    bad = [f"{low - 1:g}", f"{high + 1:g}"] + ([f"{low:g}"] if low_open else []) + ([f"{high:g}"] if high_open else [])
    return _described(check, kind, bad)


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main(): bad input exits 2 with one line on stderr and no traceback."""
    try:
        code = main()
    except InputError as e:
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original message, not the traceback
            message = message.splitlines()[-1].partition("InputError: ")[2] or message.splitlines()[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python eval.py ... | head`: the reader left; that is not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise complain again while flushing stdout at exit
        sys.exit(0)
    sys.exit(code or 0)
