"""Folders without val/ are split deterministically and per class, the split travels with the run (split.json, the
checkpoint, --resume, eval.py), and the imbalance options (--class_weights balanced, --sampler balanced) do what
their formulas say, in both data pipelines."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from utils.data.augment import resolve_augment
from utils.data.datasets import DataSpec, build_datasets, build_eval_dataset
from utils.data.loaders import build_train_loaders
from utils.data.preprocess import Preprocess
from utils.data.samplers import BalancedSampler, balanced_class_weights, targets_of
from utils.data.splits import split_source, stratified_split
from utils.errors import InputError


def flat_folder(root: Path, counts: dict[str, int], size: tuple[int, int] | None = None) -> Path:
    """root/<class>/ with counts[class] small PNGs (one size when `size` is given, else varied)."""
    rng = np.random.default_rng(0)
    for ci, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            w, h = size or (20 + j % 5, 18 + j % 3)
            arr = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
            arr[..., ci % 3] = 200
            Image.fromarray(arr).save(root / name / f"{name}_{j:03d}.png")
    return root


PRE = Preprocess.for_size(16)


# ----------------------------------------------------------------------------- splits


def test_split_is_deterministic_and_stratified(tmp_path):
    root = flat_folder(tmp_path / "shapes", {"a": 30, "b": 10, "c": 2, "d": 7})
    assert split_source(root) == root
    spec = DataSpec(str(root), val_fraction=0.2, seed=3)
    train, val, classes = build_datasets(spec, PRE)
    assert classes == ["a", "b", "c", "d"]
    per_class_val = Counter(t for _, t in val.samples)
    # round(n * 0.2) clamped to [1, n - 1]: 30 -> 6, 10 -> 2, 2 -> 1 (one each side), 7 -> 1
    assert [per_class_val[i] for i in range(4)] == [6, 2, 1, 1]
    assert [Counter(train.targets)[i] for i in range(4)] == [24, 8, 1, 6]
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}  # no image on both sides
    assert len(train) + len(val) == 49
    again = build_datasets(spec, PRE)
    assert again[0].samples == train.samples and again[1].samples == val.samples  # same seed, same split
    other = build_datasets(DataSpec(str(root), val_fraction=0.2, seed=4), PRE)
    assert other[1].samples != val.samples and Counter(other[1].targets) == per_class_val  # other seed, same sizes
    record = train.split
    assert (record["seed"], record["val_fraction"], record["classes"]) == (3, 0.2, classes)
    assert [p for p, _ in record["val"]] == [str(Path(p).relative_to(root)) for p, _ in val.samples]


def test_train_only_folder_is_split_too(tmp_path):
    root = make_image_folder(tmp_path / "ds", classes=("x", "y"), per_class=10, splits=("train",))
    assert split_source(root) == root / "train"
    train, val, _ = build_datasets(DataSpec(str(root)), PRE)  # default --val_fraction 0.1
    assert (len(train), len(val)) == (18, 2)
    assert all(Path(p).parent.parent == root / "train" for p, _ in val.samples)
    assert split_source(make_image_folder(tmp_path / "full")) is None  # its own val/: not split


def test_split_errors(tmp_path):
    root = flat_folder(tmp_path / "few", {"a": 5, "b": 1})
    with pytest.raises(InputError, match=r"class 'b' has 1 usable image in .*few: a train/validation split needs at least "
                                         r"2 per class \(one on each side\)"):
        build_datasets(DataSpec(str(root)), PRE)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(InputError, match=rf"--val_fraction must be between 0 and 1 \(exclusive\), got {bad}"):
            stratified_split(root, [], [], bad, 0)
    with pytest.raises(InputError, match=r"has no val/ \(or test/\) folder: train.py splits such a folder"):
        build_eval_dataset(DataSpec(str(root)), PRE)
    import train

    full = make_image_folder(tmp_path / "full")  # has val/: the fraction is unused, and still checked
    with pytest.raises(SystemExit) as exited:  # refused by argparse, before anything is read or written
        train.main(["--dataset", str(full), "--val_fraction", "1", "--path_to_save", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert not (tmp_path / "out").exists()


def test_eval_uses_exactly_the_held_out_files(tmp_path, capsys):
    import eval as eval_script
    import train

    root = flat_folder(tmp_path / "parts", {"bolt": 12, "gear": 9, "nut": 5})
    out = tmp_path / "runs"
    assert train.main(["--dataset", str(root), "--model", "custom", "--img_size", "16", "--max_epoch", "1", "--batch_size",
                       "8", "--num_workers", "0", "--device", "cpu", "--quiet", "--path_to_save", str(out),
                       "--val_fraction", "0.25", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    run_dir = out / "parts" / "custom"
    saved = json.loads((run_dir / "split.json").read_text())
    assert f"split: 20 train / 6 val images of {root} (held out per class: --val_fraction 0.25, --seed 7)" in printed
    assert Counter(t for _, t in saved["val"]) == {0: 3, 1: 2, 2: 1}  # round(12/4), round(9/4), round(5/4)
    ckpt = torch.load(run_dir / "best.pth", map_location="cpu", weights_only=True)
    assert [list(x) for x in ckpt["split"]["val"]] == saved["val"]
    assert [list(x) for x in ckpt["split"]["train"]] == saved["train"]
    report = tmp_path / "report.json"
    assert eval_script.main(["--weights", str(run_dir / "best.pth"), "--device", "cpu", "--quiet", "--num_workers", "0",
                             "--speed_repeats", "0", "--output", str(report)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["num_images"] == 6 and result["files"] == [p for p, _ in saved["val"]]
    assert result["dataset"] == "parts" and result["split"] == "val (the run's recorded split)"
    assert f"evaluating the val files recorded in {run_dir / 'best.pth'} (the run split {root} with --val_fraction 0.25, " \
           f"--seed 7): 6 images" in printed
    # the same with --dataset naming the folder; a new image added since is not evaluated
    flat_folder(tmp_path / "extra", {"nut": 1})
    shutil.copy(tmp_path / "extra" / "nut" / "nut_000.png", root / "nut" / "nut_new.png")
    assert eval_script.main(["--weights", str(run_dir / "best.pth"), "--dataset", str(root), "--device", "cpu", "--quiet",
                             "--num_workers", "0", "--speed_repeats", "0", "--output", str(report)]) == 0
    assert json.loads(report.read_text())["files"] == [p for p, _ in saved["val"]]
    # --resume keeps the recorded split even with another --val_fraction and --seed
    assert train.main(["--dataset", str(root), "--resume", str(run_dir / "last.pth"), "--max_epoch", "2", "--num_workers", "0",
                       "--device", "cpu", "--quiet", "--val_fraction", "0.5", "--seed", "1", "--batch_size", "8",
                       "--path_to_save", str(out)]) == 0
    resumed = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["split"] == ckpt["split"]


# ----------------------------------------------------------------------------- imbalance


def test_balanced_class_weights_formula():
    targets = torch.tensor([0] * 30 + [1] * 10 + [2] * 5)
    weights = balanced_class_weights(targets, 3)
    # scikit-learn's "balanced": n_samples / (n_classes * count) = 45 / (3 * [30, 10, 5])
    assert weights.tolist() == pytest.approx([0.5, 1.5, 3.0])
    assert weights.dtype == torch.float32
    assert balanced_class_weights(torch.tensor([0, 0, 2]), 3).tolist() == pytest.approx([0.5, 0.0, 1.0])


def test_class_weights_in_the_loss(tmp_path, capsys):
    import train

    root = flat_folder(tmp_path / "imbalanced", {"a": 30, "b": 10, "c": 5})
    out = tmp_path / "runs"
    assert train.main(["--dataset", str(root), "--model", "custom", "--img_size", "16", "--max_epoch", "1", "--batch_size",
                       "16", "--num_workers", "0", "--device", "cpu", "--quiet", "--path_to_save", str(out),
                       "--val_fraction", "0.2", "--class_weights", "balanced"]) == 0
    printed = capsys.readouterr().out
    # the train side: 24 / 8 / 4 -> 36 / (3 * count)
    assert "train images per class: a 24, b 8, c 4" in printed
    assert "class weights (balanced, n / (classes x count)): a 0.500, b 1.500, c 3.000" in printed
    ckpt = torch.load(out / "imbalanced" / "custom" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["class_weights"] == pytest.approx([0.5, 1.5, 3.0]) and ckpt["args"]["class_weights"] == "balanced"


def within_binomial(counts: list[int], draws: int, sigmas: float = 4.0) -> bool:
    p = 1 / len(counts)
    sd = math.sqrt(draws * p * (1 - p))
    return all(abs(c - draws * p) <= sigmas * sd for c in counts)


def test_balanced_sampler_draws_classes_equally():
    targets = torch.tensor([0] * 3000 + [1] * 1000 + [2] * 500)
    sampler = BalancedSampler(targets, 3, seed=0)
    draws = list(sampler)
    assert len(draws) == len(sampler) == 4500
    counts = torch.bincount(targets[draws], minlength=3).tolist()
    assert within_binomial(counts, 4500), counts  # 1500 each, sd 31.6; uniform drawing would give 3000/1000/500
    sampler.set_epoch(0)
    assert list(sampler) == draws  # an epoch's draw depends only on (seed, rank, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != draws
    ranks = [BalancedSampler(targets, 3, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert [len(s) for s in ranks] == [2250, 2250]  # each process draws its share of the epoch
    assert list(ranks[0]) != list(ranks[1])


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_balanced_sampler_in_both_pipelines(tmp_path, pipeline):
    root = flat_folder(tmp_path / "imbalanced", {"a": 30, "b": 10, "c": 5}, size=(20, 20))
    train_set, val_set, _ = build_datasets(DataSpec(str(root), val_fraction=0.2), PRE)
    assert Counter(targets_of(train_set).tolist()) == {0: 24, 1: 8, 2: 4}
    augment = resolve_augment("light", PRE.img_size)
    loaders = build_train_loaders(train_set, val_set, PRE, augment, pipeline=pipeline, batch_size=6, num_workers=0,
                                  device=torch.device("cpu"), seed=0, sampler="balanced")
    assert loaders.pipeline == pipeline
    counts, epochs = Counter(), 20
    for epoch in range(epochs):
        loaders.set_epoch(epoch)
        for images, labels in loaders.train:
            assert images.shape[1:] == (3, 16, 16)
            counts.update(labels.tolist())
    draws = epochs * 36
    assert sum(counts.values()) == draws  # 36 draws per epoch (6 batches of 6)
    assert within_binomial([counts[i] for i in range(3)], draws), counts  # 240 each, sd 12.6; unbalanced: 480/160/80
