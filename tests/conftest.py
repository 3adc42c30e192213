"""Shared fixtures: synthetic data written in the real formats, and a checkpoint the tests train themselves.

- `fashion_root`: a data root whose FashionMNIST/raw/ holds IDX files torchvision's FashionMNIST reads
  (uncompressed, so torchvision finds them and never downloads). The images are learnable: each class
  is a bright bar at its own position plus noise.
- `image_folder`: an ImageFolder tree (train/ and val/, 3 classes, PNG and JPEG, non-square images).
- `trained_ckpt`: best.pth of FashionCNN trained by train.py for 2 epochs at 28 px on `fashion_root`.

Tests marked `cuda` run only where torch sees a GPU and are skipped with the reason elsewhere (the hook below).
CUDA_TESTS_DEVICE=cpu runs them on the CPU instead: a dry run that checks the tests' own logic on a machine
without a GPU (it proves nothing about CUDA).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs one pytest-xdist worker per core: each worker's torch (and the scripts it starts, through
    # the environment) then computes on one intra-op thread, so workers never spin-wait for each other's cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

FMNIST_TRAIN, FMNIST_TEST = 320, 160
CUDA_TESTS_DEVICE = os.environ.get("CUDA_TESTS_DEVICE", "cuda")  # "cpu": dry run of the cuda-marked tests


# the files whose tests take minutes in all: scheduled first, so no pytest-xdist worker is left with one of them at the end
HEAVY_FIRST = ("tests/test_docs.py", "tests/test_gpu_check.py", "tests/test_resume.py", "tests/test_distributed.py")


def pytest_collection_modifyitems(config, items):
    """The heaviest files first (scripts/test.sh hands whole files to its workers: --dist loadfile); then skip the
    tests marked `cuda`, with the reason, where torch sees no GPU (and no dry run was asked for)."""
    items.sort(key=lambda item: next((i for i, f in enumerate(HEAVY_FIRST) if item.nodeid.startswith(f)), len(HEAVY_FIRST)))
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked or CUDA_TESTS_DEVICE == "cpu":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch {torch.__version__} sees none "
                                   "(scripts/gpu_check.sh runs these on a GPU machine: pytest -m cuda)")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _repository_cache_left_clean():
    """Scripts run from the repository root write their decode-once cache to data/.cache (the default --cache_dir);
    the tests' image folders live in temporary directories, so their cache files are removed after the session
    (files that were there before are the user's and stay)."""
    cache = ROOT / "data" / ".cache"
    before = set(cache.iterdir()) if cache.is_dir() else set()
    yield
    if cache.is_dir():
        for entry in set(cache.iterdir()) - before:
            if entry.is_file():
                entry.unlink(missing_ok=True)


def synthetic_fashion_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28) images and int labels 0-9: class k is a bright 4-px bar at row 2 + 2k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        row = 2 + 2 * int(k)
        images[i, row:row + 4, 4:24] = rng.integers(180, 255)
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (the MNIST format): magic, dimensions (big-endian), then raw uint8 data."""
    magic = 0x0800 + array.ndim
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def make_fashion_root(root: Path, n_train: int = FMNIST_TRAIN, n_test: int = FMNIST_TEST) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_fashion_images(n, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


def make_image_folder(root: Path, classes=("cat", "dog", "fish"), per_class: int = 6, splits=("train", "val")) -> Path:
    """Class-coloured images (red / green / blue dominant) of varied sizes, PNG and JPEG."""
    rng = np.random.default_rng(0)
    for split in splits:
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                h, w = 30 + 4 * (j % 3), 40 - 2 * (j % 4)
                arr = rng.integers(0, 80, size=(h, w, 3)).astype(np.uint8)
                arr[..., ci % 3] = rng.integers(170, 255)
                ext = "png" if j % 2 == 0 else "jpg"
                Image.fromarray(arr).save(folder / f"{name}_{j}.{ext}")
    return root


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory) -> Path:
    return make_fashion_root(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "folder_ds")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, fashion_root) -> Path:
    """Run directory of a 2-epoch FashionCNN training at 28 px (in-process, CPU, no workers)."""
    import train

    out = tmp_path_factory.mktemp("trained")
    code = train.main(["--model", "custom", "--img_size", "28", "--max_epoch", "2", "--wp_epoch", "0",
                       "--batch_size", "32", "--num_workers", "0", "--data_root", str(fashion_root),
                       "--path_to_save", str(out), "--quiet", "--device", "cpu", "--base_lr", "3e-3"])
    assert code == 0
    return out / "FashionMNIST" / "custom"


@pytest.fixture(scope="session")
def trained_ckpt(trained_run) -> Path:
    return trained_run / "best.pth"


def train_config(*argv: str, **values):
    """train.py's TrainConfig for `argv` (its defaults otherwise), with `values` replacing fields."""
    from dataclasses import replace

    import train
    from utils.training.config import TrainConfig

    return replace(TrainConfig(**vars(train.get_args_parser().parse_args(list(argv)))), **values)


def script_module(script: str):
    """A repository script (`train.py`, `benchmarks/bench_train.py`, ...) imported once into this process."""
    import importlib
    import importlib.util

    if "/" not in script:
        return importlib.import_module(script.removesuffix(".py"))
    name = "script_" + script.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_main(script: str, *args: str, cwd: Path | None = None):
    """Run a script's main(argv) in this process as `python script args...` runs it (through utils.cli.run: exit code,
    one-line errors on stderr), for tests where the process boundary is not what is tested: no interpreter start and
    torch import per call. Returns a CompletedProcess (returncode, stdout, stderr), like run_script."""
    import contextlib
    import io
    import signal
    import subprocess

    from utils import cli

    module = script_module(script)
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)  # train.py installs its own handler
    argv0, sys.argv = sys.argv, [script, *args]  # argparse names the program after sys.argv[0]
    code = 0
    with contextlib.chdir(cwd or ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run(lambda: module.main(list(args)))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            signal.signal(signal.SIGTERM, sigterm)
            sys.argv = argv0
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def run_script(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run a repository script in a fresh Python process; returns CompletedProcess with text output."""
    import subprocess

    full_env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_valid_png(path, min_side: int = 50) -> None:
    """A complete PNG file (signature, chunks and CRCs verified by Pillow) of at least min_side pixels."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_side, (path, img.size)


# ----------------------------------------------------------------------------- shared by the data/training test files
# (test_bad_inputs, test_run_safety, test_training_options, test_tensor_pipeline, ...): built once per session


@pytest.fixture(scope="session")
def small_fashion_root(tmp_path_factory) -> Path:
    """A Fashion-MNIST root of 64 train / 32 test images (same classes and format as `fashion_root`), for trainings
    whose assertions need a run, not a learned model: an epoch is two or four batches."""
    return make_fashion_root(tmp_path_factory.mktemp("fmnist_small"), n_train=64, n_test=32)


# ---- Built once per session, read-only for the tests (copy a file before changing it): the session checkpoint's
# exports and a random resnet18 checkpoint. Used by test_export, test_eval_artifacts, test_predict, test_predict_folder
# (exports) and test_fcn, test_complexity, test_receptive_field, test_analysis_many_images (resnet18).

class Exported:
    """What the `exported` fixture built: the trained FashionCNN (as build_from_checkpoint returned it), its ModelInfo,
    the folder holding custom.onnx, custom_fp16.onnx and custom.pt, and each file's ExportResult."""

    def __init__(self, model, info, folder: Path, results: dict):
        self.model, self.info, self.folder, self.results = model, info, folder, results


@pytest.fixture(scope="session")
def exported(trained_ckpt, tmp_path_factory) -> Exported:
    """The session checkpoint exported once by the project's exporter (utils.deploy.export.export_artifact): ONNX FP32,
    ONNX FP16, .pt2 and TorchScript, each verified by the exporter's parity check."""
    from utils.checkpoint import build_from_checkpoint, load_checkpoint
    from utils.deploy.export import export_artifact

    out = tmp_path_factory.mktemp("exported")
    model, info = build_from_checkpoint(load_checkpoint(trained_ckpt))
    results = {name: export_artifact(model, info, trained_ckpt, engine, out / name, half=half, log=lambda *_: None,
                                     note=lambda *_: None)
               for name, engine, half in (("custom.onnx", "onnx", False), ("custom_fp16.onnx", "onnx", True),
                                          ("custom.pt2", "pt2", False), ("custom.pt", "torchscript", False))}
    return Exported(model, info, out, results)


@pytest.fixture(scope="session")
def random_resnet18_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised resnet18 (3 classes, 64 px, large-input stem) in the project checkpoint format."""
    from test_fcn import save_random_resnet18_checkpoint

    return save_random_resnet18_checkpoint(tmp_path_factory.mktemp("resnet18") / "r18.pth", img_size=64)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's intra-op threads set to 1 for a test module, restored after. The modules that use it run many small
    forward passes, exports and model builds in this process; on 2 cores shared with other work, a second intra-op
    thread spin-waits at every op: measured on such a machine, test_complexity took 61-70 s of CPU with 2 threads and
    9 s with 1, test_export 106-118 s and 34 s, for no gain at these input sizes (as utils/data/batch_augment.py found
    for small images). Subprocesses and ONNX Runtime's own threads are not affected."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
