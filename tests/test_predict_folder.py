"""Prediction over folders (predict.py, predict_ckpoint.py): batched rows streamed to CSV / JSON Lines equal
single-image predictions, bad files are reported and skipped, NaN scores and mismatched ONNX inputs are one-line
errors, outputs are never replaced by accident, a progress bar is drawn on a terminal, and memory stays flat."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import zlib

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, run_main, run_script, synthetic_fashion_images
from PIL import Image

from utils.data.preprocess import Preprocess, preprocess_file
from utils.deploy.metadata import write_onnx_metadata
from utils.deploy.predict import softmax, topk
from utils.deploy.runtime import OnnxModel
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread


@pytest.fixture(scope="module")
def onnx_model(exported):
    """The trained FashionCNN, its info and its ONNX export (the session's, written by the project's exporter)."""
    return exported.model, exported.info, exported.folder / "custom.onnx"


def make_photos(folder, n: int, seed: int = 0) -> list:
    """n images of mixed sizes, modes and formats in two sub-folders: half are the training data's kind (a bright bar
    per class) scaled up, half are noise of random shapes."""
    rng = np.random.default_rng(seed)
    fashion, _ = synthetic_fashion_images(n, seed=seed + 100)
    paths = []
    for i in range(n):
        if i % 2:
            side = int(rng.integers(28, 90))
            img = Image.fromarray(fashion[i], "L").resize((side, side), Image.NEAREST)
        else:
            h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            img = Image.fromarray(rng.integers(0, 255, size=(h, w)).astype(np.uint8), "L")
        sub = folder / ("a" if i % 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        kind = i % 4
        if kind == 0:
            path = sub / f"img{i:04d}.png"
            img.save(path)
        elif kind == 1:
            path = sub / f"img{i:04d}.jpg"
            img.convert("RGB").save(path, quality=90)
        elif kind == 2:
            path = sub / f"img{i:04d}.webp"
            img.convert("RGB").save(path, lossless=True)
        else:
            path = sub / f"img{i:04d}.gif"
            img.convert("P").save(path)
        paths.append(path)
    return sorted(paths)


def decompression_bomb_png(path, side: int = 20_000) -> None:
    """A PNG whose header claims side x side pixels (> 2 x Pillow's MAX_IMAGE_PIXELS): Pillow refuses it on open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def bad_files(folder) -> dict[str, str]:
    """Bad inputs written into `folder` -> a word their error line must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8))
    good.save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "whole.jpg").unlink()
    (folder / "notes.png").write_text("this is a text file, not an image")
    (folder / "empty.jpg").write_bytes(b"")
    decompression_bomb_png(folder / "bomb.png")
    cases = {"truncated.jpg": "truncated", "notes.png": "not an image", "empty.jpg": "not an image",
             "bomb.png": "decompression bomb"}
    if os.geteuid() != 0:  # root reads any file whatever its mode
        good.save(folder / "locked.png")
        (folder / "locked.png").chmod(0)
        cases["locked.png"] = "Permission denied"
    return cases


def single_image_top(model: OnnxModel, path, pre: Preprocess, classes, k: int):
    """Batch-1 ONNX Runtime on one image, top-k by the formula (an independent path from the folder loop)."""
    probs = softmax(model(preprocess_file(path, pre)[None]).astype(np.float64)[0])
    return [(classes[i], p) for i, p in topk(probs, k)]


def read_csv_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_and_jsonl_rows_equal_single_image_predictions(onnx_model, trained_ckpt, tmp_path, capsys):
    import predict_ckpoint

    model, info, onnx_path = onnx_model
    paths = make_photos(tmp_path / "photos", 37)
    out_csv = tmp_path / "pred.csv"
    proc = run_main("predict.py", "--model", str(onnx_path), "--image", str(tmp_path / "photos"), "--topk", "3",
                    "--batch_size", "8", "--num_workers", "2", "--output", str(out_csv))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 37 row(s) to {out_csv} (csv)" in proc.stdout and "Top 3" not in proc.stdout
    assert "median inference" in proc.stdout and "(batch 8," in proc.stdout
    rows = read_csv_rows(out_csv)
    assert list(rows[0]) == ["path", "top1_class", "top1_prob", "top2_class", "top2_prob", "top3_class", "top3_prob", "error"]
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # every image once, in sorted input order
    session = OnnxModel(onnx_path, "cpu")
    top1 = [float(r["top1_prob"]) for r in rows]
    for row, path in zip(rows, paths):
        expected = single_image_top(session, path, info.preprocess, info.classes, 3)
        assert [row[f"top{r}_class"] for r in (1, 2, 3)] == [c for c, _ in expected], path
        assert [float(row[f"top{r}_prob"]) for r in (1, 2, 3)] == pytest.approx([p for _, p in expected], abs=1e-5)
        assert row["error"] == ""
    # the comparison covers varied answers: several classes, confident and unsure
    assert len({r["top1_class"] for r in rows}) >= 3 and max(top1) - min(top1) > 0.3, top1

    # predict_ckpoint.py: the same loop with a torch forward, to JSON Lines; equal to PyTorch on each image alone
    out_jsonl = tmp_path / "pred.jsonl"
    assert predict_ckpoint.main(["--weights", str(trained_ckpt), "--image", str(tmp_path / "photos"), "--topk", "2",
                                 "--batch_size", "5", "--output", str(out_jsonl), "--device", "cpu", "--quiet"]) == 0
    lines = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in paths]
    model.eval()
    for line, path in zip(lines, paths):
        with torch.inference_mode():
            probs = model(torch.from_numpy(preprocess_file(path, info.preprocess))[None]).double().softmax(1)[0]
        values, indices = probs.topk(2)
        assert [t["class"] for t in line["top"]] == [info.classes[i] for i in indices.tolist()]
        assert [t["index"] for t in line["top"]] == indices.tolist()
        assert [t["prob"] for t in line["top"]] == pytest.approx(values.tolist(), abs=1e-5)
        assert line["error"] is None
    capsys.readouterr()


def test_bad_files_are_reported_skipped_and_listed_in_the_output(onnx_model, trained_ckpt, tmp_path):
    _, info, onnx_path = onnx_model
    good = make_photos(tmp_path / "mixed", 6)
    cases = bad_files(tmp_path / "mixed" / "junk")
    missing = tmp_path / "missing.png"
    out = tmp_path / "rows.csv"
    proc = run_main("predict.py", "--model", str(onnx_path), "--image", str(tmp_path / "mixed"), str(missing),
                    "--output", str(out), "--batch_size", "4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(cases) + 1, errors
    for name, reason in {**cases, "missing.png": "not found"}.items():
        line = next(e for e in errors if name in e)
        assert reason in line, (name, line)
    assert f"{len(cases) + 1} of {len(good) + len(cases) + 1} image(s) could not be predicted" in proc.stderr
    rows = read_csv_rows(out)
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert len(rows) == len(good) + len(cases) + 1
    for path in good:
        assert by_name[path.name]["error"] == "" and by_name[path.name]["top1_class"] in info.classes
    for name, reason in {**cases, "missing.png": "not found"}.items():
        assert reason in by_name[name]["error"] and by_name[name]["top1_class"] == "" == by_name[name]["top1_prob"]

    # text mode and predict_ckpoint.py: the good images are printed, the bad ones are one line each, exit 2
    proc = run_main("predict_ckpoint.py", "--weights", str(trained_ckpt), "--image", str(tmp_path / "mixed"),
                    "--device", "cpu", "--topk", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stdout.count("Top 1 predictions:") == len(good)
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == len(cases)


class NaNForDarkImages(torch.nn.Module):
    """Two scores: log of the mean normalised pixel (NaN for dark images, whose mean is negative) and its negation."""

    def forward(self, x):
        m = torch.log(x.mean(dim=(1, 2, 3)))
        return torch.stack([m, -m], 1)


def export_tiny(module: torch.nn.Module, shape: tuple, path, dynamic_batch: bool = True) -> None:
    """The torch.export-based exporter (the project's default), batch axis dynamic through dynamic_shapes."""
    dims = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    program = torch.onnx.export(module.eval(), (torch.randn(*shape),), None, dynamo=True, opset_version=18, input_names=["input"],
                                output_names=["logits"], dynamic_shapes=dims, verbose=False)
    program.save(str(path))


def test_nan_scores_are_an_error_never_nan_percent(tmp_path):
    export_tiny(NaNForDarkImages(), (1, 3, 8, 8), tmp_path / "nan.onnx")
    Image.new("RGB", (10, 10), (250, 250, 250)).save(tmp_path / "bright.png")
    Image.new("RGB", (10, 10), (5, 5, 5)).save(tmp_path / "dark.png")
    base = ["predict.py", "--model", str(tmp_path / "nan.onnx"), "--image", str(tmp_path / "bright.png"),
            str(tmp_path / "dark.png"), "--img_size", "8", "--classes", "light,shadow", "--topk", "2"]
    proc = run_main(*base)
    percents = re.findall(r"^\s+\d\. \S+\s+(\S+)%$", proc.stdout, re.M)
    assert proc.returncode == 2 and len(percents) == 2, proc.stdout  # bright.png only, never "nan%"
    assert 50 < float(percents[0]) < 100 and float(percents[0]) + float(percents[1]) == pytest.approx(100, abs=0.02)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model produced NaN probabilities" in errors[0] and "dark.png" in errors[0]
    assert "bright.png" in proc.stdout and "dark.png" not in proc.stdout
    proc = run_main(*base, "--output", str(tmp_path / "nan.jsonl"))
    assert proc.returncode == 2
    lines = [json.loads(line) for line in (tmp_path / "nan.jsonl").read_text().splitlines()]
    assert lines[0]["error"] is None and lines[0]["top"][0]["class"] == "light"
    assert "NaN" in lines[1]["error"] and lines[1]["top"] == []


class TinyNet(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 4, 3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def with_metadata(path, pre: Preprocess) -> None:
    proto = onnx.load(str(path))
    write_onnx_metadata(proto, {"preprocess": pre.to_json(), "classes": json.dumps(["a", "b", "c"])})
    onnx.save(proto, str(path))


def test_onnx_input_that_does_not_match_the_images_is_one_line(tmp_path):
    Image.new("RGB", (40, 30), (120, 30, 200)).save(tmp_path / "x.png")
    # a 1-channel model whose metadata describes RGB preprocessing
    export_tiny(TinyNet(1), (1, 1, 16, 16), tmp_path / "gray.onnx")
    with_metadata(tmp_path / "gray.onnx", Preprocess.for_size(16, channels=3))
    # a model with a fixed 32 px input whose metadata says 16 px
    export_tiny(TinyNet(3), (1, 3, 32, 32), tmp_path / "fixed.onnx")
    with_metadata(tmp_path / "fixed.onnx", Preprocess.for_size(16, channels=3))
    for name, words in (("gray.onnx", "expects 1-channel images but its preprocessing makes 3x16x16"),
                        ("fixed.onnx", "expects a fixed input height of 32 px but its preprocessing makes 3x16x16")):
        out = tmp_path / f"{name}.csv"
        proc = run_main("predict.py", "--model", str(tmp_path / name), "--image", str(tmp_path / "x.png"),
                        "--output", str(out))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
        assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
    # a fixed batch size of 1 is not a mismatch: the loop runs one image at a time
    export_tiny(TinyNet(3), (1, 3, 16, 16), tmp_path / "batch1.onnx", dynamic_batch=False)
    with_metadata(tmp_path / "batch1.onnx", Preprocess.for_size(16, channels=3))
    Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "y.png")
    proc = run_main("predict.py", "--model", str(tmp_path / "batch1.onnx"), "--image", str(tmp_path / "x.png"),
                    str(tmp_path / "y.png"), "--json", "--batch_size", "64")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["summary"]["batch_size"] == 1 and len(doc["predictions"]) == 2


def test_output_never_replaced_without_exist_ok_and_bad_names(onnx_model, tmp_path):
    import predict

    _, _, onnx_path = onnx_model
    make_photos(tmp_path / "p", 3)
    out = tmp_path / "keep.csv"
    out.write_text("earlier results\n")
    args = ["--model", str(onnx_path), "--image", str(tmp_path / "p"), "--output", str(out), "--quiet"]
    with pytest.raises(InputError, match="already exists.*--exist_ok"):
        predict.main(args)
    assert out.read_text() == "earlier results\n"
    assert predict.main([*args, "--exist_ok"]) == 0
    assert len(read_csv_rows(out)) == 3 and not list(tmp_path.glob(".keep.tmp*"))
    with pytest.raises(InputError, match=r"use a \.csv or \.jsonl"):
        predict.main([*args[:4], "--output", str(tmp_path / "rows.txt")])
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        predict.main([*args[:4], "--output", str(tmp_path / "dir.csv")])
    with pytest.raises(InputError, match="keep.csv is a file, not a folder"):
        predict.main([*args[:4], "--output", str(out / "rows.csv")])


def test_progress_bar_on_a_terminal(onnx_model, tmp_path):
    """stderr on a pseudo-terminal (as in an interactive shell): the bar counts the images; --quiet draws none."""
    _, _, onnx_path = onnx_model
    make_photos(tmp_path / "p", 12)

    def stderr_on_tty(*extra: str) -> tuple[int, str]:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "predict.py", "--model", str(onnx_path), "--image", str(tmp_path / "p"),
                                 "--batch_size", "4", *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")

    code, text = stderr_on_tty("--output", str(tmp_path / "a.csv"))
    assert code == 0 and "predict:" in text and "12/12" in text and "img/s" in text, text
    assert (tmp_path / "a.csv").is_file()
    code, text = stderr_on_tty("--output", str(tmp_path / "b.csv"), "--quiet")
    assert code == 0 and "predict:" not in text and (tmp_path / "b.csv").is_file()


MEMORY_PROBE = r"""
import json, sys, tracemalloc
from utils.deploy.predict import LoopOptions, iter_predictions, RowWriter
from utils.deploy.runtime import OnnxModel
from utils.data.preprocess import list_images

model = OnnxModel(sys.argv[1], "cpu")
pre, classes = model.preprocess, model.metadata["classes"]
# The file list is the caller's and grows with the folder (~0.3 kB a file: the Path objects, the string pathlib
# caches on each the first time it is printed, the names the interpreter interns when load_image does Path(path)).
# One untraced pass over all files pays those, so the traced passes measure the loop's own memory.
paths = list_images(sys.argv[2])
out = {}
for workers, n, traced in ((0, len(paths), False), (0, 500, True), (0, 2000, True), (2, 500, True), (2, 2000, True)):
    opts = LoopOptions(batch_size=8, workers=workers, warmup=0)
    if traced:
        tracemalloc.start()
    with open(sys.argv[3], "w", newline="") as f:
        sink = RowWriter(f, "csv", 5)
        for p in iter_predictions(model, paths[:n], pre, classes, 5, opts):
            sink.write(p)
    if traced:
        out[f"workers{workers}_{n}"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
tracemalloc.start()
held = list(iter_predictions(model, paths[:1000], pre, classes, 5, LoopOptions(batch_size=8, workers=0, warmup=0)))
out["held_1000"] = tracemalloc.get_traced_memory()[0]
tracemalloc.stop()
print(json.dumps(out))
"""


def test_streaming_memory_stays_flat(onnx_model, tmp_path):
    """Peak traced memory (tracemalloc, which counts numpy's buffers too) of the streaming loop on 500 and on
    2,000 files, decoding in the main thread and in 2 threads: the growth per 1,000 files must be small next to
    what holding 1,000 results costs. Measured on a loaded machine: 10-14 kB (main thread) and 11-27 kB (2 threads)
    more peak per 1,000 files, against 708 kB to hold 1,000 top-5 results; allowed: a tenth of that. Thousands of
    files are the point, hence ~10-30 s."""
    _, _, onnx_path = onnx_model
    folder = tmp_path / "many"
    rng = np.random.default_rng(3)
    for i in range(2000):
        sub = folder / f"{i // 500}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(sub / f"{i:05d}.png")
    proc = run_script("-c", MEMORY_PROBE, str(onnx_path), str(folder), str(tmp_path / "rows.csv"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    held = m["held_1000"]  # holding 1,000 top-5 results: about 0.7 MB
    assert held > 300_000, m
    for workers in (0, 2):  # decoding in the main thread, and in 2 threads (up to 2 batches + 2 images in flight)
        assert (m[f"workers{workers}_2000"] - m[f"workers{workers}_500"]) / 1.5 < 0.1 * held, (workers, m)
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 2001


def test_a_folder_lists_the_images_a_training_folder_would_use(tmp_path):
    """Prediction over a folder follows utils.data.folders: every Pillow format (.jfif, .gif), no hidden or junk files."""
    from PIL import Image

    from utils.deploy.predict import expand_images

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / ".ipynb_checkpoints").mkdir()
    img = Image.new("RGB", (12, 9), (200, 30, 30))
    for name in ("a.jpg", "b.jfif", "sub/c.gif", "._a.jpg", ".ipynb_checkpoints/d.png", "e.webp"):
        img.save(folder / name, format={"jfif": "JPEG", "jpg": "JPEG"}.get(name.rsplit(".", 1)[1], None))
    (folder / "Thumbs.db").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not an image")
    found = [p.relative_to(folder).as_posix() for p in expand_images([str(folder)])]
    assert found == ["a.jpg", "b.jfif", "e.webp", "sub/c.gif"]
