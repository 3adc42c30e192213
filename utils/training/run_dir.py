"""Where a training run writes: a directory of its own, never an earlier run's (Ultralytics' increment_path).

- New run: `<path_to_save>/<dataset>/<name>` (name = --name, default the model), or `<name>-2`, `<name>-3`, ...
  when that exists; the directory is created here, without exist_ok, so two runs starting together cannot take the
  same one. `--exist_ok` reuses `<name>` as it is.
- `--resume CKPT`: the checkpoint's own directory.
- `<name>-latest`: a symbolic link to the newest run of that name that has saved a checkpoint, so command sequences
  (train, then eval/export the result) follow the run they just made.
- Under torchrun only rank 0 chooses; every process gets its choice (broadcast).
- One run at a time per directory: rank 0 holds an exclusive lock (flock) on `<run dir>/.lock` for its lifetime, so
  a second run given the same `--name --exist_ok` (or `--resume` of the same run) at the same moment is refused with
  one line instead of both reporting success over each other's files. The kernel releases the lock when the holder
  exits, however it ends (SIGKILL included), so a killed run never leaves it stuck.
The chosen directory is printed as `run_dir: <path>` first and last (`RUN_DIR_PREFIX`), for scripts to follow.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from utils.distributed import broadcast_object, is_main_process
from utils.errors import InputError
from utils.io import atomic_symlink, make_dirs

RUN_DIR_PREFIX = "run_dir: "
LATEST_SUFFIX = "-latest"
LOCK_FILE = ".lock"


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
    lock_fd: int | None = field(default=None, repr=False)  # the open .lock file this run holds (rank 0)

    def __getstate__(self) -> dict:  # broadcast to the other ranks: the descriptor is rank 0's alone
        return {**self.__dict__, "lock_fd": None}

    def lock(self) -> None:
        """Take the directory for this run, or raise InputError naming the run that holds it (see the module docstring)."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs there are not protected against a concurrent --exist_ok
            return
        path = self.path / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise InputError(f"cannot write in the run directory {self.path} ({e.strerror or e}); fix: a writable "
                                 "--path_to_save, or copy the run somewhere writable before --resume") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise InputError(f"{self.path} is in use by a run that is still going ({holder}); fix: wait for it to "
                                 "end, or choose another --name (without --exist_ok a new run never reuses a directory)") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file between our open and our lock: take the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self.lock_fd = fd

    def announce(self) -> None:
        print(f"{RUN_DIR_PREFIX}{self.path}", flush=True)

    def mark_latest(self) -> None:
        """Point <name>-latest at this run (after its first checkpoint)."""
        if self.link is not None:
            atomic_symlink(self.link, self.path.name)

    def release(self) -> None:
        """Remove the .lock file (while still holding it, so no other run can hold it at the same time) and let go.
        A killed run leaves the file behind, unlocked: the next run takes it."""
        if self.lock_fd is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            os.close(self.lock_fd)
            self.lock_fd = None

    def discard_if_empty(self) -> None:
        """A run that ended before writing anything leaves no empty numbered directory behind."""
        if not self.created:
            return
        self.release()
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
    """The run's directory (see the module docstring), locked for this run; rank 0 decides, every process returns the
    same or raises the same InputError."""
    choice, error = None, None
    if is_main_process():
        try:
            choice = _choose(Path(path_to_save), dataset, name, exist_ok, resume)
            choice.lock()
        except InputError as e:
            if choice is not None:
                choice.discard_if_empty()
            choice, error = None, str(e)
    choice, error = broadcast_object((choice, error))
    if error is not None:
        raise InputError(error)
    return choice


def _choose(path_to_save: Path, dataset: str, name: str, exist_ok: bool, resume: str | Path | None) -> RunDir:
    if resume is not None:
        return RunDir(resolve_checkpoint_dir(resume), False, None)
    parent = path_to_save / dataset
    made = tuple(folder for folder in (parent, parent.parent) if not folder.exists())
    make_dirs(parent, exist_ok=True)
    if not exist_ok:
        return RunDir(next_free(parent, name), True, parent / f"{name}{LATEST_SUFFIX}", made)
    path = parent / name
    if path.exists() and not path.is_dir():
        raise InputError(f"--exist_ok: {path} exists and is not a directory; fix: choose another --name")
    created = not path.exists()
    make_dirs(path, exist_ok=True)
    return RunDir(path, created, parent / f"{name}{LATEST_SUFFIX}", made)


check_run_name.invalid_examples = ["../x", ".hidden", "exp-latest", ""]  # what tests/test_bad_flags.py feeds it
