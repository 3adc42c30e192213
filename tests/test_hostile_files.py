"""Hostile files: each class of input that used to crash, hang or mislead is refused (or read) by one mechanism.

- images of extreme shape (a few kB, gigabytes once resized) and images over Pillow's pixel limit: one limit
  (preprocess.oversize_reason) for training's check and for predict;
- 16-bit, 32-bit integer and float images: scaled by their range, not clipped to white;
- ONNX files with malformed metadata and checkpoints with edited values or tensors: one line naming the key;
- file names with control characters or bytes that are not UTF-8: printed escaped, kept exact in CSV files.

Real files everywhere: Pillow images on disk, an ONNX file exported by export.py (metadata edited with the onnx
package), checkpoints written by train.py and edited with torch.save, one real process with a strict UTF-8 stdout.
"""

from __future__ import annotations

import csv
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_image_folder, run_main, run_script
from PIL import Image

from utils.analysis.many_images import analyse_each
from utils.data.folders import bad_images_report, check_image, scan_folder
from utils.data.preprocess import Preprocess, load_image, oversize_reason, preprocess_file, resize_shorter, resized_size
from utils.errors import InputError
from utils.io import display_path

LIMIT = Image.MAX_IMAGE_PIXELS  # 89,478,485
CKPT_FIX = "; fix: use the checkpoint as train.py wrote it (it was edited or damaged), or its run's other checkpoint"
PRE_FIX = "; fix: use the file as train.py or export.py wrote it (it was edited or damaged)"
META_FIX = "; fix: re-export the model with export.py (its metadata was edited or damaged)"


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory, trained_ckpt) -> Path:
    """The 28 px FashionCNN exported by export.py (preprocessing: RGB, crop_pct 1.0: resize 28, crop 28)."""
    out = tmp_path_factory.mktemp("onnx") / "custom.onnx"
    proc = run_main("export.py", "--weights", str(trained_ckpt), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def gray_png(path: Path, width: int, height: int, value: int = 128) -> Path:
    Image.new("L", (width, height), value).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height but whose pixel data is cut off: decoding it would fail."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


# ----------------------------------------------------------------------------- extreme shapes and pixel limits


def test_the_limit_counts_the_pixels_after_the_resize():
    assert oversize_reason(1, 1_000_000) is None  # decoding it takes 1 MB
    assert oversize_reason(1, 1_000_000, 32) == (
        "1x1000000 pixels: resized to 32 px on the shorter side it would be 32x32000000 = 1024000000 pixels, over the "
        f"limit of {LIMIT} (PIL.Image.MAX_IMAGE_PIXELS; its sides are too unequal)")
    assert oversize_reason(300_000, 2, 256) == (
        "300000x2 pixels: resized to 256 px on the shorter side it would be 38400000x256 = 9830400000 pixels, over the "
        f"limit of {LIMIT} (PIL.Image.MAX_IMAGE_PIXELS; its sides are too unequal)")
    assert oversize_reason(4000, 3000, 256) is None and oversize_reason(1, 1000, 256) is None  # 256 x 256,000 px fits
    assert oversize_reason(10_000, 9_000) == (f"10000x9000 = 90000000 pixels, over Pillow's decompression-bomb limit of "
                                              f"{LIMIT} (PIL.Image.MAX_IMAGE_PIXELS)")
    # the size the limit computes is the size the pipeline's resize makes
    assert resize_shorter(Image.new("L", (3, 700)), 32).size == resized_size(3, 700, 32) == (32, 7466)


def test_predict_skips_an_extreme_shape_with_one_line_and_exit_2(onnx_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    gray_png(folder / "a_good.png", 28, 28)
    thin = gray_png(folder / "thin.png", 1, 1_000_000)  # 1 MB decoded, a few kB on disk
    assert thin.stat().st_size < 10_000
    # the header claims 1 x 50,000,000 px and the data is cut off: refused from the header, never decoded
    cut = png_header_only(folder / "tall_cut.png", 1, 50_000_000)
    out = tmp_path / "pred.csv"
    proc = run_main("predict.py", "--model", str(onnx_model), "--image", str(folder), "--output", str(out), "--quiet")
    assert proc.returncode == 2
    fix = "; fix: crop or shrink the file, or leave it out"
    assert proc.stderr.splitlines() == [
        f"error: cannot use image {cut}: {oversize_reason(1, 50_000_000, 28)}{fix}",
        f"error: cannot use image {thin}: {oversize_reason(1, 1_000_000, 28)}{fix}",
        "2 of 3 image(s) could not be predicted (see the error lines above)"]
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(folder / "a_good.png"), str(cut), str(thin)]
    assert rows[0]["error"] == "" and float(rows[0]["top1_prob"]) > 0 and "28x28000000" in rows[2]["error"]


def test_training_reports_an_extreme_shape_with_the_unreadable_files(tmp_path):
    root = make_image_folder(tmp_path / "ds", per_class=2)
    thin = gray_png(root / "train" / "cat" / "thin.png", 1, 1_000_000)
    (root / "val" / "dog" / "notes.png").write_text("not an image")
    proc = run_main("train.py", "--dataset", str(root), "--img_size", "28", "--device", "cpu", "--num_workers", "0",
                    "--quiet", "--path_to_save", str(tmp_path / "runs"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "2 image files Pillow cannot read:",
        f"  {thin}: {oversize_reason(1, 1_000_000, 32)}",
        f"  {root / 'val' / 'dog' / 'notes.png'}: not an image Pillow can read",
        "error: 2 image files cannot be read (listed above); fix: remove or replace them, or pass --skip_bad_images to "
        "leave them out"]
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_training_and_predict_apply_the_same_limit(onnx_model, tmp_path, monkeypatch):
    """With a (real) pixel limit of 1,100: a 40x40 image is over it but under Pillow's own 2x refusal (Pillow only
    warns), and a 40x26 image decodes within it but not once resized to 28 px (43 x 28 = 1,204). Before, predict read
    both while training refused the first."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1100)
    big, wide = gray_png(tmp_path / "big.png", 40, 40), gray_png(tmp_path / "wide.png", 40, 26)
    small = gray_png(tmp_path / "small.png", 28, 28)
    with warnings.catch_warnings():  # Pillow's own warning on opening big.png (check_images filters it the same way)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        reasons = {p.name: check_image(p, resize=28) for p in (big, wide, small)}
    assert reasons == {"big.png": "40x40 = 1600 pixels, over Pillow's decompression-bomb limit of 1100 "
                                  "(PIL.Image.MAX_IMAGE_PIXELS)",
                       "wide.png": "40x26 pixels: resized to 28 px on the shorter side it would be 43x28 = 1204 pixels, "
                                   "over the limit of 1100 (PIL.Image.MAX_IMAGE_PIXELS; its sides are too unequal)",
                       "small.png": None}
    proc = run_main("predict.py", "--model", str(onnx_model), "--image", str(big), str(wide), str(small), "--quiet")
    assert proc.returncode == 2
    fix = "; fix: crop or shrink the file, or leave it out"
    assert proc.stderr.splitlines() == [f"error: cannot use image {big}: {reasons['big.png']}{fix}",
                                        f"error: cannot use image {wide}: {reasons['wide.png']}{fix}",
                                        "2 of 3 image(s) could not be predicted (see the error lines above)"]
    assert proc.stdout.count("Top 5 predictions:") == 1 and str(small) in proc.stdout


# ----------------------------------------------------------------------------- 16-bit, 32-bit integer and float images


def _write(path: Path, mode: str, values) -> Path:
    arr = np.asarray(values)
    if mode == "I;16B":
        Image.frombytes("I;16B", arr.shape[::-1], arr.astype(">u2").tobytes()).save(path)
    elif mode == "I;16":
        Image.fromarray(arr.astype(np.uint16)).save(path)
    else:
        Image.fromarray(arr.astype(np.int32 if mode == "I" else np.float32), mode).save(path)
    return path


# mode, file, pixel values (2x2), the (black, white) values that scaling must map to 0 and 255
SCALING = [
    ("I", "int32_wide.tif", [[0, 100_000], [550_000, 1_100_000]], (0, 1_100_000)),  # a real 32-bit range: min-max
    ("I", "int32_negative.tif", [[-1000, 0], [1000, 3000]], (-1000, 3000)),
    ("I", "int32_16bit.tif", [[0, 1000], [30_000, 65_535]], (0, 65_535)),  # 16-bit levels in a 32-bit container
    ("I", "int32_8bit.tif", [[0, 10], [128, 255]], (0, 255)),
    ("F", "float_unit.tif", [[0.0, 0.25], [0.5, 1.0]], (0, 1)),
    ("F", "float_8bit.tif", [[0.0, 2.5], [100.0, 255.0]], (0, 255)),
    ("F", "float_wide.tif", [[-5.0, 0.0], [100.0, 300.0]], (-5, 300)),
    ("I;16", "sixteen.png", [[0, 1000], [30_000, 65_535]], (0, 65_535)),
    ("I;16B", "sixteen_big_endian.tif", [[0, 1000], [30_000, 50_000]], (0, 65_535)),
]


@pytest.mark.parametrize("mode,name,values,black_white", SCALING, ids=[s[1] for s in SCALING])
def test_integer_and_float_images_are_scaled_by_their_range(tmp_path, mode, name, values, black_white):
    path = _write(tmp_path / name, mode, values)
    with Image.open(path) as img:
        assert img.mode == mode  # the file really is of that mode
    low, high = black_white
    expected = np.floor((np.asarray(values, np.float64) - low) / (high - low) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(path, channels=1)), expected)
    # the model input (scale to [0, 1], mean 0, std 1) is those levels / 255, and the training check accepts the file
    x = preprocess_file(path, Preprocess(img_size=2, resize=2, mean=(0.0,), std=(1.0,), channels=1))
    np.testing.assert_array_equal(x, (expected.astype(np.float32) / np.float32(255))[None])
    assert check_image(path) is None


def test_images_whose_values_have_no_grey_level_are_refused_everywhere(tmp_path):
    const = _write(tmp_path / "const.tif", "I", [[100_000, 100_000], [100_000, 100_000]])
    nan = _write(tmp_path / "nan.tif", "F", [[0.0, np.nan], [0.5, 1.0]])
    why_const = ("every pixel of this 32-bit integer image has the value 100000, outside 0-255 and 0-65535, so no grey "
                 "level follows from it; fix: save it as an 8- or 16-bit image")
    why_nan = ("its float pixels include NaN or infinite values, which have no grey level; fix: save the image with "
               "finite values (or as 8/16-bit)")
    assert check_image(const) == why_const and check_image(nan) == why_nan  # training's check
    for path, why in ((const, why_const), (nan, why_nan)):
        with pytest.raises(InputError) as info:
            load_image(path, channels=1)
        assert str(info.value) == f"cannot use image {path}: {why}"
    # a constant image inside 0-255 is just a grey picture
    flat = _write(tmp_path / "flat.tif", "I", [[77, 77], [77, 77]])
    assert np.asarray(load_image(flat, channels=1)).tolist() == [[77, 77], [77, 77]]


# ----------------------------------------------------------------------------- ONNX metadata


def _with_metadata(source: Path, target: Path, key: str, value: str) -> Path:
    model = onnx.load(str(source))
    entry = next(p for p in model.metadata_props if p.key == key)
    entry.value = value
    onnx.save(model, str(target))
    return target


def _edited_preprocess(onnx_model: Path, **changes) -> str:
    text = next(p.value for p in onnx.load(str(onnx_model)).metadata_props if p.key == "preprocess")
    return Preprocess.from_json(text).to_json().replace('"img_size": 28', f'"img_size": {changes["img_size"]}')


METADATA_CASES = [
    ("classes", "not json",
     "metadata key 'classes' is not valid JSON (Expecting value: line 1 column 1 (char 0)): 'not json'" + META_FIX),
    ("classes", '{"a": 1}', "metadata key 'classes' must be a JSON list of class names, got '{\"a\": 1}'" + META_FIX),
    ("preprocess", '{"img_size": 28, "resize": 3',
     "metadata key 'preprocess': its preprocessing is not valid JSON (Expecting ',' delimiter: line 1 column 29 "
     "(char 28))" + PRE_FIX),
    ("preprocess", '"abc"', "metadata key 'preprocess': preprocess key 'img_size' must be a positive integer (pixels), got "
                            "'abc'" + PRE_FIX),
    ("preprocess", "0", "metadata key 'preprocess': preprocess key 'img_size' must be a positive integer (pixels), got 0"
     + PRE_FIX),
    ("model_kwargs", "[1, 2]", "metadata key 'model_kwargs' must be a JSON object, got '[1, 2]'" + META_FIX),
    ("num_classes", "ten", "metadata key 'num_classes' must be an integer >= 1, got 'ten'" + META_FIX),
]


@pytest.mark.parametrize("key,value,message", METADATA_CASES, ids=[f"{c[0]}={c[1]}" for c in METADATA_CASES])
def test_malformed_onnx_metadata_is_one_line_naming_the_key(onnx_model, tmp_path, fashion_root, key, value, message):
    if key == "preprocess" and not value.startswith("{"):
        value = _edited_preprocess(onnx_model, img_size=value)
    bad = _with_metadata(onnx_model, tmp_path / "edited.onnx", key, value)
    gray_png(tmp_path / "x.png", 28, 28)
    pred = run_main("predict.py", "--model", str(bad), "--image", str(tmp_path / "x.png"))
    report = tmp_path / "report.json"
    ev = run_main("eval.py", "--weights", str(bad), "--data_root", str(fashion_root), "--output", str(report),
                  "--device", "cpu", "--quiet")
    for proc in (pred, ev):
        assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {bad}: {message}\n")
    assert not report.exists() and not list(tmp_path.glob("*confusion_matrix*"))


# ----------------------------------------------------------------------------- edited checkpoints


@pytest.fixture()
def run_copy(trained_run, tmp_path) -> Path:
    """A copy of the trained run's directory (its last.pth is edited by the tests)."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def _edit(path: Path, change) -> Path:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("value", [0, -3, "abc", 2.5])
def test_a_checkpoint_with_a_bad_img_size_is_one_line_for_every_consumer(run_copy, fashion_root, tmp_path, value):
    ckpt = _edit(run_copy / "last.pth", lambda c: c["preprocess"].update(img_size=value))
    before = sorted(os.listdir(run_copy))
    expected = (f"error: checkpoint {ckpt}: preprocess key 'img_size' must be a positive integer (pixels), got "
                f"{value!r}{PRE_FIX}\n")
    gray_png(tmp_path / "x.png", 28, 28)
    calls = [("eval.py", "--weights", str(ckpt), "--data_root", str(fashion_root), "--output", str(tmp_path / "r.json")),
             ("export.py", "--weights", str(ckpt), "--output", str(tmp_path / "m.onnx")),
             ("predict_ckpoint.py", "--weights", str(ckpt), "--image", str(tmp_path / "x.png")),
             ("train.py", "--resume", str(ckpt), "--data_root", str(fashion_root), "--device", "cpu", "--quiet",
              "--max_epoch", "3")]
    for script, *args in calls:
        proc = run_main(script, *args)
        assert (proc.returncode, proc.stderr) == (2, expected), script
    assert sorted(os.listdir(run_copy)) == before and not (tmp_path / "r.json").exists() and not (tmp_path / "m.onnx").exists()


def test_resume_with_an_edited_saved_flag_is_one_line(run_copy, fashion_root):
    ckpt = _edit(run_copy / "last.pth", lambda c: c["args"].update(img_size="abc"))
    proc = run_main("train.py", "--resume", str(ckpt), "--data_root", str(fashion_root), "--device", "cpu", "--quiet")
    assert (proc.returncode, proc.stderr) == (2, f"error: --resume {ckpt}: saved flag img_size: expected an integer, got "
                                                 "'abc'\n")


@pytest.mark.parametrize("part", ["weights", "optimizer"])
def test_resume_with_a_tensor_of_another_shape_is_one_line(run_copy, fashion_root, part):
    def shrink(c):
        if part == "weights":
            c["model"]["features.0.weight"] = torch.zeros(8, 3, 3, 3)
        else:  # AdamW's first moment of the first parameter (features.0.weight)
            c["optimizer"]["state"][0]["exp_avg"] = torch.zeros(16, 3, 5, 5)

    ckpt = _edit(run_copy / "last.pth", shrink)
    before = {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir()}
    proc = run_main("train.py", "--resume", str(ckpt), "--data_root", str(fashion_root), "--device", "cpu", "--quiet",
                    "--max_epoch", "3", "--num_workers", "0")
    what = ("tensor 'features.0.weight' has shape [8, 3, 3, 3], the network's has [16, 3, 3, 3]" if part == "weights" else
            "optimizer state 'exp_avg' of 'features.0.weight' has shape [16, 3, 5, 5], the parameter's is [16, 3, 3, 3]")
    assert proc.returncode == 2
    assert proc.stderr == f"error: --resume {ckpt}: {what}{CKPT_FIX}\n"
    assert {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir()} == before  # nothing written or replaced
    if part == "weights":  # the other consumers name the same tensor
        proc = run_main("export.py", "--weights", str(ckpt), "--output", str(run_copy / "m.onnx"))
        assert proc.stderr == f"error: checkpoint {ckpt}: tensor 'features.0.weight' has shape [8, 3, 3, 3], the network's " \
                              f"has [16, 3, 3, 3]{CKPT_FIX}\n" and not (run_copy / "m.onnx").exists()


# ----------------------------------------------------------------------------- names with control characters


def test_display_path_escapes_what_a_terminal_would_obey():
    cases = {
        "plain/photo.jpg": "plain/photo.jpg",
        "été/ünïcode.png": "été/ünïcode.png",  # printable text stays as it is
        "a\nerror: forged.png": "a\\nerror: forged.png",
        "x\r100.00% cat.png": "x\\r100.00% cat.png",
        "\x1b[2J\x1b[31mred.png": "\\x1b[2J\\x1b[31mred.png",
        "tab\there.png": "tab\\there.png",
        "back\\slash.png": "back\\\\slash.png",  # so an escaped name and a literal one never look alike
        "rtl\u202egnp.exe": "rtl\\u202egnp.exe",
        os.fsdecode(b"latin1-\xe9\xff.png"): "latin1-\\xe9\\xff.png",  # bytes that are not UTF-8
    }
    assert {name: display_path(name) for name in cases} == cases
    assert display_path(b"raw-\xff.png") == "raw-\\xff.png"


def _hostile_folder(root: Path) -> dict[str, Path]:
    root.mkdir()
    names = {"newline": "a\nerror: forged.png", "carriage": "b\r  1. Sneaker  100.00%.png", "ansi": "c\x1b[2Jclear.png"}
    paths = {k: gray_png(root / v, 28, 28, 40 * i) for i, (k, v) in enumerate(names.items(), 1)}
    paths["bad"] = root / "d\x1b[31m\nnot an image.png"
    paths["bad"].write_text("text, not pixels")
    return paths


def test_predict_prints_hostile_names_escaped_and_writes_them_exactly(onnx_model, tmp_path):
    paths = _hostile_folder(tmp_path / "imgs")
    proc = run_main("predict.py", "--model", str(onnx_model), "--image", str(tmp_path / "imgs"), "--quiet")
    assert proc.returncode == 2
    assert "\x1b" not in proc.stdout + proc.stderr and "\r" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for key in ("newline", "carriage", "ansi"):  # each image's header line is its escaped name, then its top-5
        i = lines.index(display_path(paths[key]))
        assert lines[i + 1] == "Top 5 predictions:"
    assert not any(line.startswith(("error: forged", "  1. Sneaker  100.00%")) for line in lines)
    err = proc.stderr.splitlines()
    assert len(err) == 2 and err[0].startswith(f"error: not an image file: {display_path(paths['bad'])} (")
    out = tmp_path / "rows.csv"
    proc = run_main("predict.py", "--model", str(onnx_model), "--image", str(tmp_path / "imgs"), "--output", str(out),
                    "--quiet")
    rows = list(csv.DictReader(out.open(newline="")))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in paths.values())  # exact names in the file
    assert proc.returncode == 2 and "\x1b" not in proc.stdout + proc.stderr


def test_non_utf8_names_on_a_strict_utf8_stdout(onnx_model, tmp_path):
    """A real process whose stdout and stderr refuse anything but UTF-8: names that are not UTF-8 are printed escaped
    (before, the text output crashed with UnicodeEncodeError in the middle of the list)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    good, bad = os.fsdecode(b"caf\xe9.png"), os.fsdecode(b"broken-\xff.png")
    gray_png(folder / "a.png", 28, 28)
    gray_png(folder / good, 28, 28, 200)
    (folder / bad).write_bytes(b"not an image")
    proc = run_script("predict.py", "--model", str(onnx_model), "--image", str(folder), "--quiet",
                      env={"PYTHONIOENCODING": "utf-8:strict"}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stdout.count("Top 5 predictions:") == 2 and f"{folder}/caf\\xe9.png\nTop 5" in proc.stdout
    assert proc.stderr.splitlines() == [
        f"error: not an image file: {folder}/broken-\\xff.png (use JPEG, PNG, BMP, TIFF, WebP or GIF)",
        "1 of 3 image(s) could not be predicted (see the error lines above)"]


def test_training_reports_print_hostile_names_escaped(tmp_path):
    root = make_image_folder(tmp_path / "ds", per_class=2)
    bad = root / "train" / "cat" / "x\n  dog_ok.png: fine\x1b[0m.png"
    bad.write_text("not an image")
    proc = run_main("train.py", "--dataset", str(root), "--img_size", "28", "--device", "cpu", "--quiet",
                    "--path_to_save", str(tmp_path / "runs"))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: cannot read image {display_path(bad)}: not an image Pillow can read; fix: remove or "
                           "replace the file, or pass --skip_bad_images to leave it out\n")
    second = root / "val" / "dog" / os.fsdecode(b"\xff\r.png")
    second.write_text("not an image either")
    scans = [scan_folder(root / "train", show_progress=False), scan_folder(root / "val", show_progress=False)]
    assert bad_images_report(scans).splitlines() == [  # also the text of the run's skipped_images.txt
        "2 image files Pillow cannot read:",
        f"  {display_path(bad)}: not an image Pillow can read",
        f"  {root}/val/dog/\\xff\\r.png: not an image Pillow can read"]


def test_analysis_error_lines_are_escaped(tmp_path, capsys):
    good = gray_png(tmp_path / "good.png", 8, 8)
    bad = tmp_path / "bad\n1 of 1 image(s) analysed.png"
    bad.write_text("no pixels")
    seen = []
    code = analyse_each([good, bad], load_image, lambda image, img: seen.append((image, img.size)))
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and seen == [(good, (8, 8))]
    assert err == [f"error: not an image file: {display_path(bad)} (use JPEG, PNG, BMP, TIFF, WebP or GIF)",
                   "1 of 2 image(s) could not be analysed (see the error lines above)"]
