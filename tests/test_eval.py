"""eval.py on the session checkpoint: JSON keys and values, plots, strict loading, bad checkpoint files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_valid_png, make_fashion_root, run_main, synthetic_fashion_images, write_idx

import eval as eval_script
from models import build_model
from utils.checkpoint import load_checkpoint
from utils.data.fashion_mnist import FASHION_MNIST_CLASSES
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread
REPORT_KEYS = {"model", "format", "engine", "weights", "dataset", "split", "num_images", "loss", "acc1", "acc5",
               "per_class_recall", "confusion_matrix", "classes", "params", "macs", "size_mb", "img_size", "latency_ms",
               "throughput_img_s", "speed_batch_size", "device", "torch"}


def run_eval(*args: str) -> None:
    assert eval_script.main([*args, "--num_workers", "0", "--device", "cpu", "--quiet"]) == 0


def test_eval_report_keys_and_values(tmp_path, trained_ckpt, fashion_root):
    out = tmp_path / "report" / "custom.json"
    run_eval("--weights", str(trained_ckpt), "--data_root", str(fashion_root), "--output", str(out), "--speed_repeats", "3")
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    assert report["model"] == "custom" and report["format"] == "pytorch" and report["split"] == "test"
    assert report["dataset"] == "FashionMNIST" and report["img_size"] == 28
    assert report["num_images"] == 160
    for key in ("acc1", "acc5"):
        assert 0.0 <= report[key] <= 1.0  # fractions, not percent
    assert report["acc5"] >= report["acc1"] > 0.5
    assert report["classes"] == FASHION_MNIST_CLASSES
    assert list(report["per_class_recall"]) == FASHION_MNIST_CLASSES and "per_class_acc" not in report  # was its duplicate
    assert all(0.0 <= v <= 1.0 for v in report["per_class_recall"].values())
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == report["num_images"]
    assert report["acc1"] == pytest.approx(np.trace(cm) / report["num_images"], abs=1e-6)
    rows = cm.sum(1)
    for i, name in enumerate(FASHION_MNIST_CLASSES):
        assert report["per_class_recall"][name] == pytest.approx(cm[i, i] / rows[i] if rows[i] else 0.0, abs=1e-6)
    # the same weights on the same images give the validation figures train.py recorded
    ckpt = load_checkpoint(trained_ckpt)
    assert report["acc1"] == pytest.approx(ckpt["best_acc1"], abs=1e-6)
    best_row = ckpt["history"][ckpt["epoch"]]
    assert report["loss"] == pytest.approx(best_row["val_loss"], rel=1e-5)
    model = build_model("custom", 10, **ckpt["model_kwargs"])
    params = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert report["params"] == params == 173_978
    # conv MACs by hand: 28*28*16*3*9 + 14*14*32*16*9 + 7*7*64*32*9, plus the two Linear layers 576*256 + 256*10
    assert report["macs"] == 338_688 + 903_168 + 903_168 + 147_456 + 2_560
    assert report["size_mb"] == pytest.approx(stored / 1e6)
    assert report["latency_ms"] > 0 and report["throughput_img_s"] > 0 and report["speed_batch_size"] >= 1
    assert math.isfinite(report["loss"]) and report["loss"] > 0
    assert report["device"] == "cpu" and report["torch"] == str(torch.__version__)
    assert_valid_png(out.with_name(f"{out.stem}_confusion_matrix.png"))


def test_eval_save_examples_draws_the_misclassified_images(tmp_path, trained_ckpt):
    # the same kind of images with every label moved to the next class: the model is wrong on most of them
    root = make_fashion_root(tmp_path / "fm")
    images, labels = synthetic_fashion_images(40, seed=1)
    raw = root / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", images)
    write_idx(raw / "t10k-labels-idx1-ubyte", (labels + 1) % 10)
    out = tmp_path / "shifted.json"
    run_eval("--weights", str(trained_ckpt), "--data_root", str(root), "--output", str(out), "--speed_repeats", "0",
             "--save_examples")
    report = json.loads(out.read_text())
    assert report["num_images"] == 40 and report["acc1"] < 0.5
    assert "latency_ms" not in report  # --speed_repeats 0 skips timing
    assert_valid_png(tmp_path / "shifted_misclassified_examples.png", min_side=200)
    assert_valid_png(tmp_path / "shifted_confusion_matrix.png")


def test_eval_with_the_wrong_model_name_fails_strictly(tmp_path, trained_ckpt, fashion_root):
    proc = run_main("eval.py", "--weights", str(trained_ckpt), "--model", "resnet18", "--data_root", str(fashion_root),
                    "--output", str(tmp_path / "r.json"), "--device", "cpu", "--quiet")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "resnet18" in lines[0] and "custom" in lines[0]
    assert not (tmp_path / "r.json").exists()


def test_eval_on_a_file_that_is_not_a_checkpoint(tmp_path, fashion_root):
    fake = tmp_path / "best.pth"
    fake.write_text("this is not a checkpoint\n")
    proc = run_main("eval.py", "--weights", str(fake), "--data_root", str(fashion_root), "--device", "cpu", "--quiet",
                    "--output", str(tmp_path / "r.json"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(fake) in lines[0]


def test_load_checkpoint_rejects_other_torch_files(tmp_path):
    path = tmp_path / "weights_only.pth"
    torch.save({"weight": torch.zeros(2)}, path)  # a valid torch file, but not one train.py wrote
    with pytest.raises(InputError, match="not a checkpoint written by train.py"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
