"""Malformed inputs are one line on stderr, exit 2, no traceback: a checkpoint that would run code when unpickled
(the line names the code; torch's advice to load it with weights_only=False is never repeated), a checkpoint without
the network's description, a truncated checkpoint, a file that is no checkpoint, and truncated or corrupt
Fashion-MNIST files and .gz archives.

The scripts run in this process (conftest.run_main: main(argv) through utils.cli.run, as a real process runs it);
one case per script (eval.py, export.py, predict_ckpoint.py) runs as a real process, so the whole stderr of a fresh
interpreter is checked to be the one line too."""

from __future__ import annotations

import gzip
import os

import pytest
import torch
from conftest import make_fashion_root, run_main, run_script
from PIL import Image

from utils.checkpoint import load_checkpoint
from utils.errors import InputError


class RunsAShellCommand:
    """Unpickling this calls os.system (posix.system on Linux): what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def assert_one_line(result, *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "weights_only=False" not in lines[0] and "weights_only` set to `False" not in lines[0]
    return lines[0]


def test_checkpoint_with_code_is_refused_and_names_the_code(tmp_path, trained_ckpt):
    marker = tmp_path / "pwned"
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    ckpt["history"] = [RunsAShellCommand(marker)]
    evil = tmp_path / "evil.pth"
    torch.save(ckpt, evil)
    # the file really runs the command when unpickled without weights_only (proving the test's payload is live)
    torch.load(evil, map_location="cpu", weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(InputError, match=r"^refusing to load .*evil.pth: it contains code: posix.system "):
        load_checkpoint(evil)
    # a real process: nothing else (no warning of torch's) reaches stderr either
    assert_one_line(run_script("eval.py", "--weights", str(evil), "--device", "cpu"), "it contains code: posix.system",
                    str(evil))
    for argv in (["export.py", "--weights", str(evil)],
                 ["train.py", "--resume", str(evil), "--path_to_save", str(tmp_path / "runs")]):
        assert_one_line(run_main(*argv), "it contains code: posix.system", str(evil))
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_truncated_checkpoint_and_non_checkpoints_are_one_line(tmp_path, trained_ckpt):
    data = trained_ckpt.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint\n")
    partial = tmp_path / "partial.pth"
    torch.save({"model_name": "custom", "model": {}}, partial)  # no classes, preprocessing, ...
    cases = {truncated: "the file is truncated or corrupt", junk: "it is not a PyTorch checkpoint",
             partial: "it lacks num_classes, classes, preprocess"}
    for path, needle in cases.items():
        with pytest.raises(InputError, match=needle):
            load_checkpoint(path)
    # real processes for export.py and predict_ckpoint.py; train.py in this process
    assert_one_line(run_script("export.py", "--weights", str(truncated)), "the file is truncated or corrupt", str(truncated))
    Image.new("L", (28, 28), 128).save(tmp_path / "shirt.png")
    assert_one_line(run_script("predict_ckpoint.py", "--weights", str(partial), "--image", str(tmp_path / "shirt.png")),
                    "lacks num_classes, classes, preprocess")
    assert_one_line(run_main("train.py", "--resume", str(junk), "--path_to_save", str(tmp_path / "runs")),
                    "not a PyTorch checkpoint")


def gzipped_fashion_root(tmp_path):
    root = make_fashion_root(tmp_path / "fm", n_train=64, n_test=32)
    raw = root / "FashionMNIST" / "raw"
    for path in list(raw.iterdir()):
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    return root, raw


TRAIN = ["train.py", "--img_size", "28", "--max_epoch", "1", "--num_workers", "0", "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("damage", ["cut_archive", "garbage_archive", "short_idx"])
def test_truncated_or_corrupt_fashion_mnist_file_is_one_line(tmp_path, damage):
    root, raw = gzipped_fashion_root(tmp_path)
    target = raw / "train-images-idx3-ubyte.gz"
    if damage == "cut_archive":  # a download or copy that stopped early
        target.write_bytes(target.read_bytes()[:300])
        needle = "EOFError"
    elif damage == "garbage_archive":
        target.write_bytes(b"\x1f\x8b" + os.urandom(200))
        needle = "truncated or corrupt"
    else:  # a complete archive holding a cut IDX file
        target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:1000]))
        needle = "1000 bytes of data where its header (64 x 28 x 28) needs 50192"
    out = tmp_path / "runs"
    line = assert_one_line(run_main(*TRAIN, "--data_root", str(root), "--path_to_save", str(out)),
                           f"Fashion-MNIST file {target} is truncated or corrupt", needle)
    assert "fix: " in line
    assert not out.exists()  # the directories the run made are removed again


def test_extracted_fashion_mnist_file_of_the_wrong_size_is_one_line(tmp_path):
    root = make_fashion_root(tmp_path / "fm", n_train=64, n_test=32)
    labels = root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-5])
    assert_one_line(run_main(*TRAIN, "--data_root", str(root), "--path_to_save", str(tmp_path / "runs")),
                    f"Fashion-MNIST file {labels} is truncated or corrupt (35 bytes of data where its header (32) needs 40)")
    assert not (tmp_path / "runs").exists()
