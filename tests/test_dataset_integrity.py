"""Dataset integrity: what a run trains and validates on, and what it reads back, is what the user's files say.

- hard links are the same file: refused between splits (like symbolic links), counted once inside a class, an error
  across classes;
- a folder whose split layout changed since the run started (a val/ added to a folder the run split itself, or a
  val/ gone) is refused on --resume instead of training on the held-out files;
- the decode-once cache notices pixels overwritten in its file and images edited in place with size and mtime kept,
  and its folder never becomes a class, wherever --cache_dir puts it;
- temporary files of a killed cache build or a killed predict --output (real processes, SIGKILL) are removed by the
  next run that uses the same folder;
- analysis outputs of two inputs with the same name, and eval figures of two reports in one folder, never collide.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_valid_png, make_image_folder, run_main
from PIL import Image
from test_fcn import save_random_resnet18_checkpoint
from test_hostile_files import onnx_model  # noqa: F401  (the session's exported ONNX file)

from utils.analysis.many_images import output_names
from utils.data.cache import CacheLayout, decode, open_cache
from utils.data.folders import scan_folder
from utils.data.formats import CACHE_FILE
from utils.data.preprocess import Preprocess
from utils.errors import InputError
from utils.io import file_sha256, path_tag

TRAIN = ("--img_size", "28", "--max_epoch", "1", "--wp_epoch", "0", "--batch_size", "8", "--num_workers", "0",
         "--device", "cpu", "--quiet")


def photos(folder: Path, n: int, size: tuple[int, int] = (40, 30), fmt: str = "png", seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:03d}.{fmt}"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60.0):
    """Poll until condition() is truthy while `proc` still runs; returns its value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"the process ended before {what}"
        time.sleep(0.002)
    pytest.fail(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- hard links


def test_a_training_image_hard_linked_into_val_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "ds", per_class=2)
    source, link = root / "train" / "cat" / "cat_0.png", root / "val" / "cat" / "copy.png"
    os.link(source, link)
    proc = run_main("train.py", "--dataset", str(root), *TRAIN, "--path_to_save", str(tmp_path / "runs"))
    assert (proc.returncode, proc.stderr) == (2, (
        f"error: 1 image file is in both {root / 'train'} and {root / 'val'} (through hard links; first: {source} = "
        f"{link}): validation must not see training images; fix: make the two splits hold different files\n"))
    assert not (tmp_path / "runs").exists()
    # a hard-link copy of the whole tree (cp -al, rsync --link-dest) as val/: every file is shared
    shutil.rmtree(root / "val")
    shutil.copytree(root / "train", root / "val", copy_function=os.link)
    proc = run_main("train.py", "--dataset", str(root), *TRAIN, "--path_to_save", str(tmp_path / "runs"))
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"error: 6 image files are in both {root / 'train'} and {root / 'val'} (through hard links; first: "
        f"{root / 'train' / 'cat' / 'cat_0.png'} = {root / 'val' / 'cat' / 'cat_0.png'}): ")


def test_hard_links_count_once_inside_a_class_and_never_in_two(tmp_path):
    root = make_image_folder(tmp_path / "ds", per_class=2, splits=("train",)) / "train"
    os.link(root / "cat" / "cat_0.png", root / "cat" / "zz_same.png")
    os.link(root / "cat" / "cat_1.jpg", root / "cat" / "sub_same.jpg")
    scan = scan_folder(root, show_progress=False)
    assert [Path(p).name for p, _ in scan.samples] == ["cat_0.png", "cat_1.jpg", "dog_0.png", "dog_1.jpg", "fish_0.png",
                                                       "fish_1.jpg"]
    assert sorted((Path(p).name, why) for p, why in scan.ignored) == [
        ("sub_same.jpg", "hard links repeating a file already listed"),
        ("zz_same.png", "hard links repeating a file already listed")]
    os.link(root / "cat" / "cat_0.png", root / "dog" / "looks_like_a_dog.png")
    with pytest.raises(InputError) as info:
        scan_folder(root, show_progress=False)
    assert str(info.value) == (f"{root / 'dog' / 'looks_like_a_dog.png'} and {root / 'cat' / 'cat_0.png'} are the same file "
                               "(hard links): one image cannot belong to two classes (cat and dog); fix: keep it in one "
                               "class folder only")


# ----------------------------------------------------------------------------- split layout on --resume, cache folder


def test_resume_refuses_a_val_folder_added_to_a_folder_the_run_split(tmp_path):
    root = make_image_folder(tmp_path / "flat", per_class=4, splits=("",))
    cache = root / "cache"  # inside the class-folder root, not hidden
    runs = tmp_path / "runs"
    proc = run_main("train.py", "--dataset", str(root), *TRAIN, "--path_to_save", str(runs), "--cache_dir", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert "3 classes" in proc.stdout and len([p for p in cache.iterdir() if CACHE_FILE.match(p.name)]) == 4
    # another consumer, without this run's --cache_dir: the folder holding cache files is still no class
    scan = scan_folder(root, show_progress=False)
    assert scan.classes == ["cat", "dog", "fish"] and (str(cache), "cache folders") in scan.ignored

    last = runs / "flat" / "custom" / "last.pth"
    sha, split = file_sha256(last), (last.parent / "split.json").read_text()
    make_image_folder(root, per_class=1, splits=("val",))
    proc = run_main("train.py", "--resume", str(last), "--dataset", str(root), *TRAIN[2:], "--max_epoch", "2")
    record_root = root.resolve()
    assert (proc.returncode, proc.stderr) == (2, (
        f"error: --resume: the run split {record_root} itself (its held-out files are recorded in the checkpoint), but "
        f"{root} now has a val/ (or test/) folder, which would drop that split and train on the held-out files; fix: keep "
        f"the recorded split (move the new val/ folder out of {root}), or start a new run to use it\n"))
    assert file_sha256(last) == sha and (last.parent / "split.json").read_text() == split


def test_resume_refuses_a_val_folder_that_is_gone(tmp_path):
    root = make_image_folder(tmp_path / "ds", per_class=2)
    runs = tmp_path / "runs"
    assert run_main("train.py", "--dataset", str(root), *TRAIN, "--path_to_save", str(runs)).returncode == 0
    last = runs / "ds" / "custom" / "last.pth"
    sha = file_sha256(last)
    shutil.rmtree(root / "val")
    proc = run_main("train.py", "--resume", str(last), "--dataset", str(root), *TRAIN[2:], "--max_epoch", "2")
    assert (proc.returncode, proc.stderr) == (2, (
        f"error: --resume: the run validated on the val/ (or test/) folder of {root}, which is gone: a new split of the "
        "folder would hold out images the run trained on; fix: restore the val/ folder, or start a new run\n"))
    assert file_sha256(last) == sha


def test_a_cache_folder_is_never_a_class(tmp_path):
    root = make_image_folder(tmp_path / "flat", per_class=2, splits=("",))
    (root / "fresh").mkdir()  # this run's --cache_dir, still empty
    scan = scan_folder(root, show_progress=False, cache_dir=root / "fresh")
    assert scan.classes == ["cat", "dog", "fish"] and (str(root / "fresh"), "cache folders") in scan.ignored
    with pytest.raises(InputError) as info:  # a class folder as --cache_dir would silently drop that class
        scan_folder(root, show_progress=False, cache_dir=root / "dog")
    assert str(info.value) == (f"--cache_dir {root / 'dog'} holds images (dog_0.png), so it is part of the dataset {root}: "
                               "give the cache a folder of its own (e.g. <dataset>/.cache, or the default data/.cache)")
    paths = sorted((root / "cat").iterdir())
    with pytest.raises(InputError, match=r"^--cache_dir .*flat holds the dataset's image .*cat_0\.png: choose a folder"):
        open_cache(paths, CacheLayout.for_split("train", Preprocess.for_size(28)), root, show_progress=False)


# ----------------------------------------------------------------------------- what the cache serves


def test_pixels_overwritten_in_the_cache_file_are_decoded_again(tmp_path):
    paths = photos(tmp_path / "img", 4)
    layout = CacheLayout.for_split("train", Preprocess.for_size(28))
    expected = np.stack([decode(p, layout) for p in paths])
    images, info = open_cache(paths, layout, tmp_path / "cache", show_progress=False)
    assert info.built and np.array_equal(images, expected)
    assert CACHE_FILE.match(Path(info.path).name) and CACHE_FILE.match(Path(info.path).with_suffix(".json").name)
    del images
    on_disk = np.load(info.path, mmap_mode="r+")  # another program writes into the cache file
    on_disk[2, :, 5:9, 5:9] = 0
    on_disk[2, 0, 0, 0] ^= 1
    on_disk.flush()
    del on_disk
    assert not np.array_equal(np.load(info.path)[2], expected[2])
    images, again = open_cache(paths, layout, tmp_path / "cache", show_progress=False)
    assert (again.built, again.repaired, again.path) == (False, 1, info.path)
    assert "warm, 1 damaged image decoded again" in again.describe()
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(np.load(info.path), expected)  # repaired in the file itself
    assert open_cache(paths, layout, tmp_path / "cache", show_progress=False)[1].repaired == 0


def test_an_image_edited_in_place_with_size_and_mtime_kept_is_decoded_again(tmp_path):
    paths = photos(tmp_path / "img", 3, fmt="bmp")  # uncompressed: another picture of the same size has the same bytes
    layout = CacheLayout.for_split("val", Preprocess.for_size(28))
    first, info = open_cache(paths, layout, tmp_path / "cache", show_progress=False)
    before = os.stat(paths[1])
    Image.fromarray(np.full((30, 40, 3), (250, 10, 10), np.uint8)).save(paths[1])  # edited in place (same inode)
    os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -r` or an editor keeping the time
    after = os.stat(paths[1])
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    images, info2 = open_cache(paths, layout, tmp_path / "cache", show_progress=False)
    assert info2.built and info2.path != info.path
    np.testing.assert_array_equal(images[1], decode(paths[1], layout))
    assert images[1][0].mean() > 240 and np.array_equal(images[[0, 2]], first[[0, 2]])
    assert [p.suffix for p in sorted((tmp_path / "cache").iterdir())] == [".json", ".npy"]  # the stale one removed


# ----------------------------------------------------------------------------- killed writers


def test_a_killed_cache_build_leaves_a_temp_file_the_next_run_removes(tmp_path):
    paths = photos(tmp_path / "img", 300, size=(32, 32))
    cache_dir = tmp_path / "cache"
    pre = "Preprocess.for_size(336)"  # 300 images to 384 x 384 px, one thread: the build takes a while
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from utils.data.cache import CacheLayout, open_cache\nfrom utils.data.preprocess import Preprocess\n"
              f"open_cache({[str(p) for p in paths]!r}, CacheLayout.for_split('train', {pre}, 1), {str(cache_dir)!r}, "
              "show_progress=False, workers=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        temp = wait_for(lambda: next(iter(cache_dir.glob(f".*.tmp-{proc.pid}.npy")), None) if cache_dir.is_dir() else None,
                        proc, "the build started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert temp.is_file() and [p.name for p in cache_dir.iterdir()] == [temp.name]  # only the dead build's temp
    layout = CacheLayout.for_split("train", Preprocess.for_size(336), 1)
    images, info = open_cache(paths[:2], layout, cache_dir, show_progress=False)  # another build in that folder
    assert info.built and not temp.exists()
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".npy"]
    np.testing.assert_array_equal(images[1], decode(paths[1], layout))


def test_a_killed_predict_output_leaves_a_temp_file_the_next_run_removes(onnx_model, tmp_path):  # noqa: F811
    folder = tmp_path / "imgs"
    photos(folder, 150, size=(28, 28))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "predict.py", "--model", str(onnx_model), "--image", str(folder), "--output",
                             str(out / "preds.csv"), "--batch_size", "1", "--repeats", "50", "--num_workers", "0",
                             "--quiet"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        temp = wait_for(lambda: (out / f".preds.tmp-{proc.pid}.csv").is_file() and out / f".preds.tmp-{proc.pid}.csv",
                        proc, "predict.py opened its output")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p.name for p in out.iterdir()] == [temp.name]  # the half-written rows, under a temporary name only
    proc2 = run_main("predict.py", "--model", str(onnx_model), "--image", str(folder / "img_000.png"), "--output",
                     str(out / "other.csv"), "--quiet")
    assert proc2.returncode == 0
    assert proc2.stderr == f"removed {temp} (the partial output of a killed run)\n"
    assert [p.name for p in out.iterdir()] == ["other.csv"]
    rows = list(csv.DictReader((out / "other.csv").open()))
    assert [r["path"] for r in rows] == [str(folder / "img_000.png")] and rows[0]["error"] == ""


# ----------------------------------------------------------------------------- outputs that must not collide


def test_analysis_outputs_of_inputs_with_the_same_name_never_collide(tmp_path):
    a, b = photos(tmp_path / "a", 1, size=(64, 64))[0], photos(tmp_path / "b", 1, size=(64, 64), seed=1)[0]
    out = tmp_path / "out"
    assert output_names([a], out) == {a: "img_000"}  # alone: the simple name
    names = output_names([a, b], out)
    assert names == {a: f"img_000-{path_tag(a)}", b: f"img_000-{path_tag(b)}"} and path_tag(a) != path_tag(b)
    ckpt = save_random_resnet18_checkpoint(tmp_path / "r18.pth", img_size=64)
    import fcn_resnet18

    assert fcn_resnet18.main(["--image", str(a), str(b), "--weights", str(ckpt), "--out_dir", str(out), "--device", "cpu",
                              "--max_side", "64", "--json"]) == 0
    sources = {name: json.loads((out / name / "result.json").read_text())["source"] for name in names.values()}
    assert sources == {names[a]: str(a.resolve()), names[b]: str(b.resolve())}
    # later runs of one image each: a's folder is its own again, b never overwrites it
    (out / "img_000").mkdir()
    (out / "img_000" / "result.json").write_text(json.dumps({"source": str(a.resolve())}))
    assert output_names([a], out) == {a: "img_000"} and output_names([b], out) == {b: f"img_000-{path_tag(b)}"}


def test_eval_reports_in_one_folder_keep_their_own_figures(tmp_path, trained_run, fashion_root):
    results = tmp_path / "results"
    for name, ckpt in (("best", "best.pth"), ("last", "last.pth")):
        proc = run_main("eval.py", "--weights", str(trained_run / ckpt), "--data_root", str(fashion_root), "--output",
                        str(results / f"{name}.json"), "--speed_repeats", "0", "--device", "cpu", "--quiet",
                        "--num_workers", "0")
        assert proc.returncode == 0, proc.stderr
        assert f"confusion matrix: {results / f'{name}_confusion_matrix.png'}" in proc.stdout
    assert sorted(p.name for p in results.iterdir()) == ["best.json", "best_confusion_matrix.png", "best_reliability.png",
                                                         "last.json", "last_confusion_matrix.png", "last_reliability.png"]
    for name in ("best", "last"):
        assert_valid_png(results / f"{name}_confusion_matrix.png")
