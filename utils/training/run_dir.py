"""Where a training run writes: a directory of its own, never an earlier run's (Ultralytics' increment_path).

- New run: `<path_to_save>/<dataset>/<name>` (name = --name, default the model), or `<name>-2`, `<name>-3`, ...
  when that exists; the directory is created here, without exist_ok, so two runs starting together cannot take the
  same one. `--exist_ok` reuses `<name>` as it is.
- `--resume CKPT`: the checkpoint's own directory.
- `<name>-latest`: a symbolic link to the newest run of that name that has saved a checkpoint, so command sequences
  (train, then eval/export the result) follow the run they just made.
- Under torchrun only rank 0 chooses; every process gets its choice (broadcast).
The chosen directory is printed as `run_dir: <path>` first and last (`RUN_DIR_PREFIX`), for scripts to follow.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from utils.distributed import broadcast_object, is_main_process
from utils.errors import InputError
from utils.io import atomic_symlink, make_dirs

RUN_DIR_PREFIX = "run_dir: "
LATEST_SUFFIX = "-latest"


def check_run_name(name: str) -> str:
    """argparse type of --name: one plain folder name."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise argparse.ArgumentTypeError(f"{name!r} is not a plain folder name (no '/', not starting with '.')")
    if name.endswith(LATEST_SUFFIX):
        raise argparse.ArgumentTypeError(f"{name!r}: names ending in {LATEST_SUFFIX} are the links to the newest runs")
    return name


@dataclass
class RunDir:
    path: Path
    created: bool  # made by this run (a fresh directory): removed again when the run leaves it empty
    link: Path | None  # the <name>-latest link to point at `path` once it holds a checkpoint
    made_parents: tuple[Path, ...] = ()  # <path_to_save> and <path_to_save>/<dataset> when this run created them

    def announce(self) -> None:
        print(f"{RUN_DIR_PREFIX}{self.path}", flush=True)

    def mark_latest(self) -> None:
        """Point <name>-latest at this run (after its first checkpoint)."""
        if self.link is not None:
            atomic_symlink(self.link, self.path.name)

    def discard_if_empty(self) -> None:
        """A run that ended before writing anything leaves no empty numbered directory behind."""
        if not self.created:
            return
        for folder in (self.path, *self.made_parents):  # deepest first; stop at the first that holds something
            if not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()


def resolve_checkpoint_dir(checkpoint: str | Path) -> Path:
    """The real directory of a checkpoint, through a <name>-latest link (relative paths stay relative)."""
    folder = Path(checkpoint).parent
    while folder.is_symlink():
        folder = folder.parent / os.readlink(folder)
    return folder


def next_free(parent: Path, name: str) -> Path:
    """Create and return parent/name, or the first free parent/name-N (N >= 2)."""
    n = 1
    while True:
        candidate = parent / (name if n == 1 else f"{name}-{n}")
        try:
            make_dirs(candidate, exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1


def choose_run_dir(path_to_save: str | Path, dataset: str, name: str, *, exist_ok: bool = False,
                   resume: str | Path | None = None) -> RunDir:
    """The run's directory (see the module docstring); rank 0 decides, every process returns the same."""
    choice = None
    if is_main_process():
        if resume is not None:
            choice = RunDir(resolve_checkpoint_dir(resume), False, None)
        else:
            parent = Path(path_to_save) / dataset
            made = tuple(folder for folder in (parent, parent.parent) if not folder.exists())
            make_dirs(parent, exist_ok=True)
            if exist_ok:
                path = parent / name
                if path.exists() and not path.is_dir():
                    raise InputError(f"--exist_ok: {path} exists and is not a directory; fix: choose another --name")
                created = not path.exists()
                make_dirs(path, exist_ok=True)
                choice = RunDir(path, created, parent / f"{name}{LATEST_SUFFIX}", made)
            else:
                choice = RunDir(next_free(parent, name), True, parent / f"{name}{LATEST_SUFFIX}", made)
    return broadcast_object(choice)


check_run_name.invalid_examples = ["../x", ".hidden", "exp-latest", ""]  # what tests/test_bad_flags.py feeds it
