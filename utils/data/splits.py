"""Train/validation splits of an image folder that has no val/: deterministic, stratified, recorded.

Why: users' folders often hold only class sub-folders. The split is drawn per class (stratified), fixed by the seed,
and recorded as file lists (paths relative to the split folder, with the class index): train.py saves the record as
split.json in the run directory and in every checkpoint, --resume reuses it, and eval.py evaluates exactly its
held-out files, so no image ever moves between the two sides of one run.

Rule per class with n images: round(n * val_fraction) go to validation, clamped to [1, n - 1], so every class has at
least one image on each side; a class with fewer than 2 images is an error. Which images: a permutation of the
class's sorted paths drawn by numpy's default_rng([seed, class index]), so the split of a class depends only on its
files, the seed and the fraction.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

from utils.errors import InputError

SPLIT_VERSION = 1


class SplitRecord(TypedDict):
    """The split as saved in split.json and in checkpoints (key "split")."""

    version: int
    root: str  # the folder holding the class folders that was split (absolute)
    seed: int
    val_fraction: float
    classes: list[str]
    train: list[tuple[str, int]]  # (path relative to root, class index)
    val: list[tuple[str, int]]


@dataclass
class Split:
    root: Path
    train: list[tuple[str, int]]  # (absolute path, class index), as dataset samples
    val: list[tuple[str, int]]
    record: SplitRecord


def split_source(dataset: str | Path) -> Path | None:
    """The folder to split when a dataset has no val/ (or test/): the dataset itself when it holds only class folders,
    its train/ when that is all it has; None when it has its own validation split."""
    root = Path(dataset)
    if (root / "val").is_dir() or (root / "test").is_dir():
        return None
    return root / "train" if (root / "train").is_dir() else root


def check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")


def stratified_split(root: str | Path, samples: list[tuple[str, int]], classes: list[str], val_fraction: float,
                     seed: int) -> Split:
    """Split `samples` (absolute paths under `root`, class index) per class by the rule in the module docstring."""
    check_fraction(val_fraction)
    root = Path(root)
    by_class: list[list[str]] = [[] for _ in classes]
    for path, target in samples:
        by_class[target].append(path)
    train, val = [], []
    for idx, paths in enumerate(by_class):
        if len(paths) < 2:
            raise InputError(f"class {classes[idx]!r} has {len(paths)} usable image{'s' if len(paths) != 1 else ''} in {root}: "
                             "a train/validation split needs at least 2 per class (one on each side); add images, or "
                             "give the dataset its own val/ folder")
        paths = sorted(paths)
        n_val = min(max(round(len(paths) * val_fraction), 1), len(paths) - 1)
        order = np.random.default_rng([seed, idx]).permutation(len(paths))
        held = set(order[:n_val].tolist())
        for i, path in enumerate(paths):
            (val if i in held else train).append((path, idx))
    record = SplitRecord(version=SPLIT_VERSION, root=str(root.resolve()), seed=seed, val_fraction=val_fraction,
                         classes=list(classes), train=[(relative(p, root), t) for p, t in train],
                         val=[(relative(p, root), t) for p, t in val])
    return Split(root, train, val, record)


def relative(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def from_record(record: dict, root: str | Path | None = None) -> Split:
    """The split a run recorded, with its paths under `root` (default: the recorded folder); missing files are an error."""
    root = Path(root or record["root"])
    train = [(str(root / p), int(t)) for p, t in record["train"]]
    val = [(str(root / p), int(t)) for p, t in record["val"]]
    missing = [p for p, _ in train + val if not os.path.exists(p)]
    if missing:
        raise InputError(f"{len(missing)} files of the run's recorded train/validation split are gone from {root} (first: "
                         f"{missing[0]}): restore them, or start a new run")
    return Split(root, train, val, SplitRecord(**record))


def split_json(record: SplitRecord) -> str:
    """split.json's text: the settings, then one ["relative/path", class index] pair per line (readable, diffable)."""
    head = {k: v for k, v in record.items() if k not in ("train", "val")}
    lines = json.dumps(head, indent=2)[:-2].rstrip("\n").splitlines()
    for side in ("train", "val"):
        pairs = [f"    {json.dumps([p, t])}" for p, t in record[side]]
        lines[-1] += ","
        lines += [f'  "{side}": [', ",\n".join(pairs), "  ]"]
    return "\n".join(lines) + "\n}\n"
