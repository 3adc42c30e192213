"""train.py end to end: the loss goes down, every run file is written and loadable, image folders work."""

from __future__ import annotations

import csv
import json
import math

import torch
from conftest import assert_valid_png, run_main, run_script

import train
from models import build_model
from utils.data.fashion_mnist import FASHION_MNIST_CLASSES

CKPT_KEYS = {"model_name", "num_classes", "classes", "preprocess", "model_kwargs", "augment", "epoch", "model", "ema", "best_acc1",
             "step", "history", "args", "split", "torch_version"}
RESUME_KEYS = {"optimizer", "scheduler", "scaler"}  # last.pth only
RUN_FILES = {"best.pth", "last.pth", "classes.txt", "args.json", "results.csv", "results.png"}


def read_results(run_dir):
    with open(run_dir / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_short_training_lowers_the_loss_and_writes_every_run_file(trained_run):
    assert RUN_FILES <= {p.name for p in trained_run.iterdir()}
    assert not [p.name for p in trained_run.iterdir() if ".tmp" in p.name]  # atomic writes leave no temp files
    columns, rows = read_results(trained_run)
    assert columns == ["epoch", "lr", "train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[1] < losses[0]
    assert float(rows[-1]["val_loss"]) < math.log(10) * 0.8  # well below chance level (ln 10 for 10 classes)
    for r in rows:
        for key in ("train_acc1", "val_acc1", "val_acc5"):
            assert 0.0 <= float(r[key]) <= 1.0  # fractions, not percent
        assert float(r["val_acc5"]) >= float(r["val_acc1"])
        assert float(r["seconds"]) > 0
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # cosine decay (no warm-up in the fixture)
    assert (trained_run / "classes.txt").read_text().splitlines() == FASHION_MNIST_CLASSES
    args = json.loads((trained_run / "args.json").read_text())
    assert args["model"] == "custom" and args["img_size"] == 28 and args["max_epoch"] == 2
    assert_valid_png(trained_run / "results.png")


def test_checkpoints_load_with_weights_only_and_hold_every_key(trained_run):
    _, rows = read_results(trained_run)
    last = torch.load(trained_run / "last.pth", map_location="cpu", weights_only=True)
    best = torch.load(trained_run / "best.pth", map_location="cpu", weights_only=True)
    assert CKPT_KEYS | RESUME_KEYS <= set(last), CKPT_KEYS | RESUME_KEYS - set(last)
    assert CKPT_KEYS <= set(best) and not RESUME_KEYS & set(best), set(best) ^ CKPT_KEYS
    for ckpt in (last, best):
        assert ckpt["model_name"] == "custom" and ckpt["num_classes"] == 10
        assert ckpt["classes"] == FASHION_MNIST_CLASSES
        # Fashion-MNIST's images are 28 px: --crop_pct defaults to 1.0 (no resize to 32 and crop back)
        assert ckpt["preprocess"]["img_size"] == ckpt["preprocess"]["resize"] == 28 and ckpt["preprocess"]["crop_pct"] == 1.0
        assert ckpt["model_kwargs"] == {"img_size": 28, "norm_type": "BN", "in_channels": 3, "small_input": True}
        assert ckpt["ema"] is None
        # --augment auto at 28 px resolves to flips only, recorded with the resolved parameters
        assert ckpt["augment"] == {"name": "light", "crop_scale": None, "rotation": 0.0, "flip": 0.5, "erasing": 0.0,
                                   "crop_padding": 0, "auto_augment": "none"}
        assert ckpt["torch_version"] == str(torch.__version__)
    val_acc = [float(r["val_acc1"]) for r in rows]
    assert last["epoch"] == 1 and last["step"] == 2 * (320 // 32)
    assert best["epoch"] == val_acc.index(max(val_acc))
    assert best["best_acc1"] == max(val_acc) == last["best_acc1"]
    assert [h["epoch"] for h in last["history"]] == [1, 2]
    assert last["history"][-1]["val_acc1"] == float(rows[-1]["val_acc1"])
    model = build_model("custom", 10, **last["model_kwargs"])
    model.load_state_dict(last["model"])  # strict
    assert last["optimizer"]["state"] and last["scaler"] is None  # AdamW moments are saved for --resume
    assert "rng" not in last and "rng" not in best  # each epoch is seeded from (seed, epoch): no snapshot needed


def test_best_pth_leaves_out_the_optimizer_and_resume_from_it_names_last_pth(trained_run, tmp_path):
    # AdamW keeps two moments per weight: best.pth, without them, is well under last.pth (weights x 3 + model + ...)
    best, last = (trained_run / "best.pth").stat().st_size, (trained_run / "last.pth").stat().st_size
    assert best < 0.6 * last, (best, last)
    run = tmp_path / "FashionMNIST" / "custom"
    run.mkdir(parents=True)
    (run / "best.pth").write_bytes((trained_run / "best.pth").read_bytes())
    proc = run_script("train.py", "--resume", str(run / "best.pth"), "--max_epoch", "3", "--path_to_save", str(tmp_path),
                      "--quiet", "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds no optimizer state" in lines[0] and f"--resume {run / 'last.pth'}" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == ["best.pth"]  # nothing written


def test_image_folder_training_accepts_test_split_and_writes_folder_run(tmp_path, image_folder):
    (image_folder / "val").rename(image_folder / "test")
    out = tmp_path / "runs"
    code = train.main(["--dataset", str(image_folder), "--model", "custom", "--img_size", "32", "--max_epoch", "2",
                       "--batch_size", "4", "--num_workers", "0", "--path_to_save", str(out), "--quiet", "--device", "cpu",
                       "--ema", "--accumulation", "2", "--fp16", "--cache_dir", str(tmp_path / "cache")])
    assert code == 0
    run_dir = out / "folder_ds" / "custom"
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "classes.txt").read_text().split() == ["cat", "dog", "fish"]
    ckpt = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["classes"] == ["cat", "dog", "fish"] and ckpt["num_classes"] == 3
    # 18 train images, batches of 4 (last dropped) -> 4 micro-batches -> 2 optimizer steps per epoch
    assert ckpt["step"] == 4
    assert ckpt["ema"]["updates"] == ckpt["step"]
    _, rows = read_results(run_dir)
    assert len(rows) == 2 and all(r["val_acc1"] != "" for r in rows)


def test_cuda_flag_on_a_cpu_machine_is_one_line_exit_2(tmp_path, fashion_root):
    argv = ("train.py", "--cuda", "--data_root", str(fashion_root), "--path_to_save", str(tmp_path), "--quiet")
    if torch.cuda.is_available():  # a GPU machine: only a fresh process started with no GPU visible sees none
        proc = run_script(*argv, env={"CUDA_VISIBLE_DEVICES": ""})
    else:  # torch sees no GPU here: main(argv) in this process, as `python train.py` runs it
        proc = run_main(*argv)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "--device cpu" in lines[0]
    assert not any(tmp_path.iterdir())
