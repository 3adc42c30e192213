"""CLI pieces shared by the scripts: common flags, device choice, and the one-line error exit. Torch-free at import."""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Callable, Sequence

from utils.errors import InputError
from utils.io import display_line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the description's line breaks."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An invalid flag is one line on stderr (no usage block), exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def parser(description: str, epilog: str | None = None, grouped: bool = False) -> argparse.ArgumentParser:
    """A script's parser. grouped: the usage line stays one line and points to the groups below (timm's style)."""
    usage = "%(prog)s [-h] [--config FILE] [options]  (options by group below)" if grouped else None
    return OneLineErrorParser(description=description, epilog=epilog, usage=usage, formatter_class=HelpFormatter)


def add_device_arg(p, default: str = "auto") -> None:
    p.add_argument("--device", default=default, choices=["auto", "cpu", "cuda"],
                   help="where to run: auto = CUDA when available, else CPU")


def add_quiet_arg(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_model_override_arg(p: argparse.ArgumentParser) -> None:
    """-m/--model for scripts that read a checkpoint: the network name normally comes from the checkpoint."""
    p.add_argument("-m", "--model", default=None, help="override the model name stored in the checkpoint")


def add_data_args(p: argparse.ArgumentParser, *, batch_size: int = 64, num_workers: int = 2,
                  from_checkpoint: bool = False):
    """The "data" group: --dataset, --data_root, --skip_bad_images, --batch_size, --num_workers (returned, so a script
    adds its own data flags to it). from_checkpoint: the defaults are the data the checkpoint was trained on
    (quantize.py, benchmarks) instead of Fashion-MNIST under data/."""
    g = p.add_argument_group("data")
    where = "the checkpoint's" if from_checkpoint else "Fashion-MNIST"
    g.add_argument("--dataset", default=None, metavar="PATH",
                   help=f"image folder: train/ and val/ (or only class folders) of one folder per class; default: {where}")
    g.add_argument("--data_root", default=None if from_checkpoint else "data",
                   help="Fashion-MNIST's root (<data_root>/FashionMNIST/raw/)" + ("; default: the checkpoint's" if from_checkpoint else ""))
    g.add_argument("--skip_bad_images", action="store_true", help="leave out unreadable images (listed) instead of stopping")
    g.add_argument("--batch_size", type=positive(), default=batch_size, help="images per batch (per process under torchrun)")
    g.add_argument("--num_workers", type=non_negative(), default=num_workers, help="DataLoader worker processes (0 = none)")
    return g


def add_cache_args(p) -> None:
    """--cache and --cache_dir: the decode-once image cache of image folders (utils/data/cache.py)."""
    p.add_argument("--cache", default="auto", choices=["auto", "off"],
                   help="decode image folders once into a memory-mapped uint8 cache (auto: when it pays)")
    p.add_argument("--cache_dir", default="data/.cache", metavar="DIR", help="where cache files live (safe to delete)")


def add_tensorboard_args(p, what: str, where: str) -> None:
    """--tensorboard and --log_dir for scripts that log `what` to TensorBoard under <log_dir>/`where`/."""
    p.add_argument("--tensorboard", action="store_true", help=f"also log {what} to TensorBoard under <log_dir>/{where}/")
    p.add_argument("--log_dir", default="logs", help="TensorBoard root (serve it with: tensorboard --logdir logs --port 6006)")


def explicit_dests(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags actually given on the command line (not left at their defaults)."""
    probe = copy.deepcopy(p)
    probe._defaults.clear()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(probe.parse_args(argv)))


def add_config_arg(p) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML recipe or a run's args.json: its values replace the defaults, flags given here win")


def config_values(p: argparse.ArgumentParser, path: str | None, explicit: set[str], ignore: Sequence[str] = ()) -> dict:
    """The values of a --config file (YAML, or JSON such as a run's args.json) for the flags not given on the command
    line (`explicit`), each checked by the flag's own type and choices, so a file gets the command line's checks.
    Keys in `ignore` (what a run records besides its flags) are skipped; an unknown key or a bad value is one line
    naming the key."""
    if not path:
        return {}
    where = f"--config {path}"
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise InputError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        if path.endswith(".json"):
            import json

            data = json.loads(text)
        else:
            import yaml  # PyYAML, only for YAML recipes

            data = yaml.safe_load(text)
    except ValueError as e:  # json.JSONDecodeError
        raise InputError(f"{where}: not valid JSON ({e})") from None
    except Exception as e:  # yaml.YAMLError: its message spans lines
        raise InputError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of flag names to values (img_size: 28), got {type(data).__name__}")
    actions = {a.dest: a for a in p._actions if a.option_strings and a.dest != "help"}
    out = {}
    for key, value in data.items():
        if key in ignore or key == "config":
            continue
        action = actions.get(key)
        if action is None:
            import difflib

            close = difflib.get_close_matches(str(key), actions, n=1)
            raise InputError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; the keys are the flag names of {p.prog} --help without the dashes")
        if key not in explicit:
            out[key] = _config_value(action, value, f"{where}: {key}")
    return out


def checked_values(p: argparse.ArgumentParser, values: dict, where: str) -> dict:
    """Flag values read from a file (a checkpoint's saved args for --resume / --init_from) through each flag's own
    type and choices, as --config's: an edited or damaged value is one line naming the key (`where`: key)."""
    actions = {a.dest: a for a in p._actions if a.option_strings}
    return {key: _config_value(actions[key], value, f"{where} {key}") if key in actions else value
            for key, value in values.items()}


def _config_value(action: argparse.Action, value, where: str):
    """One config value through the flag's own checks (type, choices; true/false for switches)."""
    if value is None:
        if action.default is not None:
            raise InputError(f"{where}: has no value; give one or leave the key out (default {action.default!r})")
        return None
    if action.nargs == 0:  # store_true switches
        if not isinstance(value, bool):
            raise InputError(f"{where}: must be true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        values = value if isinstance(value, list) else [value]
        return [_check_scalar(action, v, where) for v in values]
    return _check_scalar(action, value, where)


def _check_scalar(action: argparse.Action, value, where: str):
    if isinstance(value, (dict, list)):
        raise InputError(f"{where}: must be a single value, got {value!r}")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise InputError(f"{where}: {e}") from None
    if action.choices is not None and converted not in action.choices:
        raise InputError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


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
        print(f"error: {display_line(message)}", file=sys.stderr)  # one line, whatever file name it quotes
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python eval.py ... | head`: the reader left; that is not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise complain again while flushing stdout at exit
        sys.exit(0)
    sys.exit(code or 0)
