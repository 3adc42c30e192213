"""The ready-made models under weights/fashion_mnist/ (docs/models.md): the files are the ones the page lists (size,
sha256), eval.py reproduces the listed test accuracy on the real Fashion-MNIST test set, and predict.py runs on them
out of the box, the ONNX file and the checkpoint giving the same classes."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import ROOT, run_main
from PIL import Image

from utils.errors import InputError
from utils.io import file_sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread

MODELS = ROOT / "weights" / "fashion_mnist"
SHIPPED = ("speednet", "fashion_cnn")
PAGE = ROOT / "docs" / "models.md"
# the real data: the repository's data/ (scripts/demo.sh copies it there) or the shared copy beside the checkout
REAL_RAW = [ROOT / "data" / "FashionMNIST" / "raw", ROOT.parent / "shared" / "data" / "FashionMNIST" / "raw"]


def listed() -> dict[str, dict]:
    """The table rows of docs/models.md: file -> {acc1, acc1_tta, mb, sha256}."""
    rows = {}
    row = r"^\| \[`([\w.]+)`\][^|]*\|[^|]*\| ([\d.]+) % \| ([\d.]+) % \| ([\d.]+) \| `([0-9a-f]{64})` \|"
    for m in re.finditer(row, PAGE.read_text(), re.M):
        rows[m[1]] = {"acc1": float(m[2]), "acc1_tta": float(m[3]), "mb": float(m[4]), "sha256": m[5]}
    return rows


def test_the_shipped_files_are_the_listed_ones():
    rows = listed()
    assert set(rows) == {p.name for p in MODELS.iterdir()} == {f"{m}.{ext}" for m in SHIPPED for ext in ("pth", "onnx")}
    for name, row in rows.items():
        assert file_sha256(MODELS / name) == row["sha256"], name
        assert abs((MODELS / name).stat().st_size / 1e6 - row["mb"]) < 0.01, name


def test_eval_reproduces_the_listed_accuracy_on_the_real_test_set(tmp_path):
    raw = next((r for r in REAL_RAW if (r / "t10k-images-idx3-ubyte.gz").is_file()), None)
    if raw is None:
        pytest.skip(f"needs the real Fashion-MNIST files in one of {[str(r) for r in REAL_RAW]}")
    (tmp_path / "FashionMNIST").mkdir()
    shutil.copytree(raw, tmp_path / "FashionMNIST" / "raw")
    rows = listed()
    # the ONNX files (the faster engine on 10,000 images); each checkpoint gives the same classes (test below) and the
    # page lists the same accuracy for it
    assert all(rows[f"{m}.pth"]["acc1"] == rows[f"{m}.onnx"]["acc1"] for m in SHIPPED)
    for name in (f"{m}.onnx" for m in SHIPPED):
        out = tmp_path / f"{name}.json"
        proc = run_main("eval.py", "--weights", str(MODELS / name), "--data_root", str(tmp_path), "--speed_repeats", "0",
                        "--quiet", "--num_workers", "0", "--output", str(out), "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(out.read_text())
        assert report["num_images"] == 10000 and report["split"] == "test", name
        assert abs(100 * report["acc1"] - rows[name]["acc1"]) < 0.015, (name, report["acc1"])


def test_predict_runs_on_them_out_of_the_box(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(16):  # any image: colour, another size; the preprocessing comes from the files
        Image.fromarray(rng.integers(0, 255, (40 + i, 33, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    for model in SHIPPED:
        top = {}
        for name in (f"{model}.onnx", f"{model}.pth"):
            proc = run_main("predict.py", "--model", str(MODELS / name), "--image", str(tmp_path), "--json", "--topk", "1",
                            "--device", "cpu")
            assert proc.returncode == 0, proc.stderr
            top[name] = [r["top"][0]["class"] for r in json.loads(proc.stdout)["predictions"]]
        assert top[f"{model}.onnx"] == top[f"{model}.pth"] and len(top[f"{model}.onnx"]) == 16


def test_release_weights_keeps_the_served_weights_and_drops_the_training_state(trained_ckpt, tmp_path):
    """scripts/release_weights.py (how the shipped files were made): the served (EMA) weights become `model`, bit for
    bit, nothing a resume needs stays, and an existing --out is refused without --exist_ok."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("release_weights", ROOT / "scripts" / "release_weights.py")
    release = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(release)
    out = tmp_path / "released.pth"
    assert release.main(["--weights", str(trained_ckpt), "--out", str(out)]) == 0
    with pytest.raises(InputError, match="exists: pass --exist_ok"):
        release.main(["--weights", str(trained_ckpt), "--out", str(out)])
    src = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    got = torch.load(out, map_location="cpu", weights_only=True)
    served = src["ema"]["module"] if src.get("ema") else src["model"]
    assert got["ema"] is None and not {"optimizer", "scheduler", "scaler", "partial"} & set(got)
    assert set(got["model"]) == set(served) and all(torch.equal(got["model"][k], served[k]) for k in served)
