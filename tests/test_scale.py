"""Reliability at scale: 1,000 classes within a measured memory bound, batches that cannot fit refused in one line,
and models whose outputs are NaN refused.

- 1,000 classes: train.py --tensorboard and eval.py --tensorboard run in fresh processes on a 1,000-class folder of
  8x8 PNGs; the peak RSS of each (os.wait4) must stay within 1 GiB of what the process holds once its script is
  imported, and the outputs are read back: the JSON's full matrix, bounded PNGs, capped per-class tags in the event
  files (TensorBoard's own EventAccumulator), the capped text table.
- Memory that cannot fit: runs in this process under an address-space limit (RLIMIT_AS = its size now + a little),
  so the machine is never at risk and an allocation past the limit fails as on a full machine: the estimate refuses
  an absurd batch before anything is allocated, and an allocation that fails all the same is one line.
- NaN: a trained checkpoint with one weight set to NaN is refused by eval.py and export.py; nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_image_folder, run_main
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from models import build_model, model_kwargs
from models.memory import training_memory
from utils.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from utils.data.preprocess import Preprocess
from utils.deploy.export import save_torchscript
from utils.deploy.metadata import build_metadata
from utils.evaluation.dashboard import TAGGED_CLASSES, tag_name
from utils.evaluation.loop import Mistakes
from utils.evaluation.report import mistakes_figure
from utils.plots import FULL_MATRIX_CLASSES, close_figures, confusion_matrix_figure, short_label

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures memory through /proc and wait4")
CLASSES = 1000
GIB = 2**30
NAMES = [f"{i:04d}.Long_named_bird_species_number_{i:04d}" for i in range(CLASSES)]  # 39 characters, as in CUB-200
# the process runs main() of the script the way `python <script>.py ARGS` does, after noting its RSS once imported
MEASURED = """import resource, sys
from pathlib import Path
import {module} as script
from utils import cli
Path(sys.argv[1]).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.argv = ["{module}.py", *sys.argv[2:]]
cli.run(lambda: script.main(sys.argv[1:]))
"""


def run_measured(module: str, *args: str, workdir: Path) -> tuple[subprocess.CompletedProcess, int, int]:
    """`module`.main(args) in a fresh Python process. Returns (result, RSS once the script was imported, peak RSS of
    the process), in bytes; the peak is the kernel's (wait4's ru_maxrss)."""
    base, out, err = (workdir / f"{module}.{kind}" for kind in ("base", "out", "err"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", MEASURED.format(module=module), str(base), *args], cwd=ROOT,
                                env=env, stdout=stdout, stderr=stderr)
        timer = threading.Timer(300, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = subprocess.CompletedProcess(args, proc.returncode, out.read_text(), err.read_text())
    assert proc.returncode == 0, result.stderr[-3000:]
    return result, int(base.read_text()) * 1024, usage.ru_maxrss * 1024


def many_classes_folder(root: Path) -> Path:
    """train/ and val/ with one 8x8 PNG per class in each, written directly (2,000 files in about a second)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in NAMES:
            folder = root / split / name
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "0.png")
    return root


def events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def text(acc: EventAccumulator, tag: str) -> str:
    return tensor_util.make_ndarray(acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto).item().decode()


def tagged(acc: EventAccumulator, kind: str, prefix: str) -> list[str]:
    return sorted(t.removeprefix(prefix) for t in acc.Tags()[kind] if t.startswith(prefix))


def lowest_f1_first(table: str) -> list[str]:
    """The class column of a per-class markdown table (after its header and separator rows)."""
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]
    return [row.split("|")[1].strip() for row in rows]


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory) -> dict:
    """train.py --tensorboard, 1 epoch of FashionCNN at 8 px on the 1,000-class folder, its peak RSS measured."""
    tmp = tmp_path_factory.mktemp("scale")
    data = many_classes_folder(tmp / "birds")
    result, base, peak = run_measured(
        "train", "--model", "custom", "--img_size", "8", "--batch_size", "1000", "--max_epoch", "1", "--wp_epoch", "0",
        "--num_workers", "0", "--dataset", str(data), "--path_to_save", str(tmp / "weights"), "--tensorboard",
        "--log_dir", str(tmp / "logs"), "--quiet", "--device", "cpu", workdir=tmp)
    run_dir = Path(re.findall(r"^run_dir: (.+)$", result.stdout, re.M)[-1])
    return {"tmp": tmp, "data": data, "run_dir": run_dir, "base": base, "peak": peak, "stdout": result.stdout}


def test_train_tensorboard_with_1000_classes_stays_within_a_gib_and_caps_per_class_tags(scale_run):
    rise = scale_run["peak"] - scale_run["base"]
    print(f"train.py --tensorboard, {CLASSES} classes: peak RSS {scale_run['peak'] / GIB:.2f} GiB, "
          f"{scale_run['base'] / GIB:.2f} GiB once imported, +{rise / 2**20:.0f} MiB")
    assert rise < GIB  # before: a 1,000 x 1,000-cell figure (about 99,000 x 50,000 pixels) that no machine holds
    (log_dir,) = {p.parent for p in (scale_run["tmp"] / "logs").rglob("events.out.tfevents.*")}
    acc = events(log_dir)
    for prefix in ("val_per_class_accuracy/", "val_per_class_precision/"):
        assert len(tagged(acc, "scalars", prefix)) == TAGGED_CLASSES, prefix
    curves = tagged(acc, "tensors", "val_pr/")
    assert len(curves) == TAGGED_CLASSES
    table = text(acc, "val/per_class")
    assert table.startswith(f"{CLASSES} classes: per-class scalars and PR curves for the {TAGGED_CLASSES} lowest F1 only")
    order = lowest_f1_first(table)
    assert sorted(order) == NAMES  # every class in the table ...
    assert curves == sorted(tag_name(c) for c in order[:TAGGED_CLASSES])  # ... and the tags are its first rows
    (image,) = acc.Images("val/confusion_matrix")
    assert (image.width, image.height) == (3200, 1550)  # two 15.5-inch panels of 30 classes at 100 dpi, as for 30 classes
    assert {"val/misclassified", "train/augmented_batch"} <= set(acc.Tags()["images"])
    # the per-class table of each split before training lists 30 classes, not 1,000
    assert len(scale_run["stdout"].splitlines()) < 100 and f"({CLASSES - 30} more classes with" in scale_run["stdout"]


def test_eval_with_1000_classes_stays_within_a_gib_with_the_full_matrix_in_the_json(scale_run):
    tmp = scale_run["tmp"]
    report_path = tmp / "results" / "birds.json"
    result, base, peak = run_measured(
        "eval", "--weights", str(scale_run["run_dir"] / "last.pth"), "--dataset", str(scale_run["data"]), "--output",
        str(report_path), "--tensorboard", "--log_dir", str(tmp / "logs"), "--save_examples", "--speed_repeats", "0",
        "--batch_size", "1000", "--num_workers", "0", "--quiet", "--device", "cpu", workdir=tmp)
    rise = peak - base
    print(f"eval.py --tensorboard --save_examples, {CLASSES} classes: peak RSS {peak / GIB:.2f} GiB, "
          f"{base / GIB:.2f} GiB once imported, +{rise / 2**20:.0f} MiB")
    assert rise < GIB
    report = json.loads(report_path.read_text())
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (CLASSES, CLASSES) and cm.dtype == np.int64 and cm.sum() == report["num_images"] == CLASSES
    assert report["acc1"] == pytest.approx(np.trace(cm) / CLASSES)
    assert len(report["per_class_f1"]) == CLASSES and report["classes"] == NAMES
    with Image.open(report_path.with_name(f"{report_path.stem}_confusion_matrix.png")) as png:  # 110 dpi, cropped to what is drawn
        assert 2500 <= png.width <= 3700 and 1300 <= png.height <= 1900, png.size  # long names shortened: bounded
    with Image.open(report_path.with_name(f"{report_path.stem}_misclassified_examples.png")) as png:
        assert png.width <= 1700 and png.height <= 1000, png.size  # 32 images in 4 rows of 8
    rows = re.findall(r"^\d{4}\.Long_named_bird_species_number_\d{4} ", result.stdout, re.M)  # the printed class table
    assert len(rows) == 20 and f"({CLASSES - 20} more classes in the JSON report; the 20 lowest F1 shown)" in result.stdout
    acc = events(tmp / "logs" / "eval" / report_path.stem)
    assert len(tagged(acc, "scalars", "eval_per_class_accuracy/")) == TAGGED_CLASSES
    assert len(tagged(acc, "tensors", "eval_pr/")) == TAGGED_CLASSES
    f1 = report["per_class_f1"]
    expected = sorted(sorted(NAMES, key=lambda c: (f1[c], NAMES.index(c)))[:TAGGED_CLASSES])
    assert tagged(acc, "tensors", "eval_pr/") == sorted(tag_name(c) for c in expected)
    assert len(lowest_f1_first(text(acc, "eval/per_class"))) == CLASSES
    (image,) = acc.Images("eval/confusion_matrix")
    assert (image.width, image.height) == (3200, 1550)


def test_confusion_matrix_of_many_classes_shows_the_most_confused_ones():
    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(5, 9, CLASSES))
    planted = {(17, 930): 9, (930, 17): 4, (400, 401): 7, (5, 6): 3}
    for (i, j), n in planted.items():
        cm[i, j] = n
    for i, j in rng.integers(0, CLASSES, (40, 2)):  # single mistakes elsewhere
        cm[i, j] += 1 if i != j else 0
    fig = confusion_matrix_figure(cm, NAMES, "birds")
    counts = fig.axes[0]
    labels = [t.get_text() for t in counts.get_yticklabels()]
    shown = [next(i for i, name in enumerate(NAMES) if short_label(name) == label) for label in labels]
    assert len(shown) == FULL_MATRIX_CLASSES and shown == sorted(shown)
    assert {17, 930, 400, 401, 5, 6} <= set(shown)
    assert np.array_equal(counts.images[0].get_array(), cm[np.ix_(shown, shown)])
    assert "the 30 of 1000 classes in the most mistakes" in counts.get_title()
    assert all(len(label) == 24 for label in labels)  # "0017.Long_na…mber_0017": start and end of the name
    assert tuple(fig.get_size_inches() * fig.dpi) == (3200, 1550)
    close_figures(fig)


def test_misclassified_grid_titles_shorten_long_class_names():
    pre = Preprocess.for_size(8)
    mistakes = Mistakes(torch.zeros(2, 3, 8, 8), torch.tensor([17, 930]), torch.tensor([930, 5]), torch.tensor([0.5, 0.25]))
    fig = mistakes_figure(mistakes, NAMES, pre)
    titles = [t.get_text() for t in fig.axes[0].texts]
    assert titles == ["true 0017.Long\u2026umber_0017\npred 0930.Long\u2026umber_0930 50%",
                      "true 0930.Long\u2026umber_0930\npred 0005.Long\u2026umber_0005 25%"]
    assert max(len(line) for title in titles for line in title.split("\n")) <= 30  # a 1.8-inch cell at 7 pt
    close_figures(fig)


# ----------------------------------------------------------------------------- memory that cannot fit


@contextlib.contextmanager
def address_space(headroom: int):
    """RLIMIT_AS (ulimit -v) at this process's virtual size + `headroom` bytes for the block, then back."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> dict:
    """A resnet18 checkpoint (random weights, project format) and its TorchScript export, taking 2048 px images, and
    a 3-class folder of 18 validation images."""
    tmp = tmp_path_factory.mktemp("big_input")
    folder = make_image_folder(tmp / "folder", per_class=6)
    torch.manual_seed(0)
    kwargs = model_kwargs(2048, small_input="off")
    classes = ["cat", "dog", "fish"]
    save_checkpoint({"model_name": "resnet18", "num_classes": 3, "classes": classes,
                     "preprocess": Preprocess.for_size(2048).to_dict(), "model_kwargs": kwargs, "epoch": 0,
                     "model": build_model("resnet18", 3, **kwargs).state_dict(), "optimizer": None, "scaler": None,
                     "ema": None, "best_acc1": 0.0, "step": 0, "history": [], "args": {}, "rng": None,
                     "torch_version": str(torch.__version__)}, tmp / "resnet18.pth")
    model, info = build_from_checkpoint(load_checkpoint(tmp / "resnet18.pth"))
    save_torchscript(model, tmp / "resnet18.pt", build_metadata(info, tmp / "resnet18.pth", "fp32"), torch.zeros(1, 3, 64, 64))
    return {"tmp": tmp, "folder": folder}


def test_train_refuses_a_batch_that_cannot_fit_before_allocating_it(fashion_root, tmp_path):
    with address_space(2 * GIB):
        result = run_main("train.py", "--model", "resnet18", "--img_size", "4096", "--batch_size", "5000", "--max_epoch", "1",
                          "--num_workers", "0", "--data_root", str(fashion_root), "--path_to_save", str(tmp_path / "w"),
                          "--quiet", "--device", "cpu")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    match = re.fullmatch(r"error: --batch_size 5000 at --img_size 4096 does not fit in memory: one training step of resnet18 "
                         r"needs at least ([\d.]+) TiB for 320 images and this machine has ([\d.]+) GiB free; "
                         r"even one image needs ([\d.]+) GiB: lower --img_size", line)
    assert match, line
    need, free, one = (float(g) for g in match.groups())
    # at least the stem's output, which autograd keeps: 320 images x 64 channels x 2048 x 2048 floats (0.31 TiB)
    assert need >= 320 * 64 * 2048**2 * 4 / 2**40
    assert free <= 2.0 < one  # the address-space limit of this test, and one image needs more
    assert not list((tmp_path / "w").rglob("*"))  # the run directory it announced is gone, nothing written


def test_eval_refuses_a_batch_that_cannot_fit_and_names_the_largest_that_might(big_input):
    tmp = big_input["tmp"]
    with address_space(2 * GIB):
        result = run_main("eval.py", "--weights", str(tmp / "resnet18.pth"), "--dataset", str(big_input["folder"]),
                          "--output", str(tmp / "refused.json"), "--batch_size", "64", "--num_workers", "0", "--quiet",
                          "--device", "cpu")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    match = re.fullmatch(r"error: --batch_size 64 \(of 2048 px images, the model's input size\) does not fit in memory: "
                         r"evaluating resnet18 needs at least ([\d.]+) GiB for 18 images and this machine has ([\d.]+) GiB "
                         r"free; lower --batch_size to (\d+) or less", line)
    assert match, line
    need, free, fits = float(match[1]), float(match[2]), int(match[3])
    # at least the first convolution's input and output at once: 18 x (3 x 2048^2 + 64 x 1024^2) floats
    assert need >= 18 * (3 * 2048**2 + 64 * 1024**2) * 4 / GIB
    assert free <= 2.0 and 2 <= fits < 18 and fits * need / 18 <= free + 0.05
    assert not (tmp / "refused.json").exists() and not list(tmp.glob("*.png"))


def test_an_allocation_that_fails_all_the_same_is_one_line(big_input):
    """TorchScript programs are not looked into: the estimate counts their input batches only, the network's first
    layer then asks for more than the limit leaves, and the allocator's failure becomes the line."""
    tmp = big_input["tmp"]
    with address_space(GIB):
        result = run_main("eval.py", "--weights", str(tmp / "resnet18.pt"), "--dataset", str(big_input["folder"]),
                          "--output", str(tmp / "failed.json"), "--batch_size", "6", "--num_workers", "0", "--quiet",
                          "--device", "cpu")
    assert result.returncode == 2
    *notes, line = result.stderr.splitlines()  # a .pt is TorchScript: one note says it is legacy, then the error line
    assert [n[:22] for n in notes] == ["note: TorchScript (.pt"], notes
    assert re.fullmatch(r"error: out of memory at --batch_size 6 \(of 2048 px images, the model's input size\) \(RuntimeError: "
                        r"DefaultCPUAllocator: can't allocate memory: you tried to allocate \d+ bytes\. Error code 12 "
                        r"\(Cannot allocate memory\)\): lower --batch_size", line), line
    assert not (tmp / "failed.json").exists()


def test_train_allocation_failure_past_the_estimate_is_one_line(fashion_root, tmp_path):
    """The estimate is a lower bound: it counts one optimizer state per weight, AdamW keeps two. FashionCNN at 512 px
    has 67 M weights (268 MB) in its first Linear layer; with room for the estimate and 0.12 GiB more (what the run
    allocates before the check takes under 0.06), AdamW's second state fails at the first step, and train.py says so
    in one line."""
    need = training_memory("custom", 10, model_kwargs(512), 2, 320)
    with address_space(need.total + int(0.12 * GIB)):
        result = run_main("train.py", "--model", "custom", "--img_size", "512", "--batch_size", "2", "--max_epoch", "1",
                          "--num_workers", "0", "--data_root", str(fashion_root), "--path_to_save", str(tmp_path / "w"),
                          "--quiet", "--device", "cpu")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line == ("error: out of memory at --batch_size 2 at --img_size 512 (RuntimeError: DefaultCPUAllocator: can't "
                    "allocate memory: you tried to allocate 268435456 bytes. Error code 12 (Cannot allocate memory)): lower "
                    "--batch_size or --img_size"), line
    assert not list((tmp_path / "w").rglob("*"))  # failed in epoch 1: its run directory is gone


# ----------------------------------------------------------------------------- NaN


@pytest.fixture()
def nan_ckpt(trained_ckpt, tmp_path) -> Path:
    ckpt = torch.load(trained_ckpt, weights_only=True)
    for state in (ckpt["model"], (ckpt.get("ema") or {}).get("module")):
        if state is not None:
            state["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pth")
    return tmp_path / "nan.pth"


def test_eval_refuses_a_model_whose_outputs_are_nan(nan_ckpt, fashion_root, tmp_path):
    out = tmp_path / "results" / "nan.json"
    result = run_main("eval.py", "--weights", str(nan_ckpt), "--data_root", str(fashion_root), "--output", str(out),
                      "--num_workers", "0", "--quiet", "--device", "cpu", "--tensorboard", "--log_dir", str(tmp_path / "logs"))
    assert result.returncode == 2
    assert result.stderr == (f"error: {nan_ckpt}: the model's outputs are NaN or infinite for 160 of 160 images (its weight "
                             "features.0.weight holds NaN or inf), so its accuracy would mean nothing: evaluate a checkpoint "
                             "from before training diverged, or retrain (e.g. with a lower --base_lr)\n")
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


def test_export_says_the_pytorch_model_produces_nan(nan_ckpt, tmp_path):
    out = tmp_path / "exported" / "nan.onnx"
    result = run_main("export.py", "--weights", str(nan_ckpt), "--output", str(out), "--engine", "all")
    assert result.returncode == 2
    assert result.stderr == (f"error: {nan_ckpt}: the PyTorch model's outputs are NaN or infinite (on the random batch "
                             "1x3x28x28): its weights are broken, e.g. by a diverged training run; nothing exported: export a "
                             "checkpoint from before it diverged, or retrain (e.g. with a lower --base_lr)\n")
    assert not (tmp_path / "exported").exists()
