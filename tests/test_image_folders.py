"""Image folders are exactly their files (utils/data/folders.py): every Pillow format, no junk, links only inside their
class and never twice, every unreadable file in one report before training, structural problems as one-line errors,
and checkpoints never silently applied to another dataset's classes (--resume, eval.py --weights, --init_from)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder, run_main
from image_files import GOOD_FILES, jpeg_bytes, picture, write_bomb_png, write_good_files, write_truncated_jpeg
from PIL import Image
from torchvision import datasets

from utils.data.datasets import CheckedImageFolder, DataSpec, build_datasets
from utils.data.folders import check_image, image_extensions, report_bad_images, scan_folder
from utils.data.preprocess import Preprocess
from utils.errors import InputError


def two_classes(root: Path, per_class: int = 3) -> Path:
    """root/a and root/b with `per_class` small PNGs each."""
    for ci, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            picture(20 + j, 24, seed=10 * ci + j).save(root / name / f"{name}{j}.png")
    return root


# ----------------------------------------------------------------------------- what counts


def test_extensions_come_from_pillow():
    exts = image_extensions()
    for ext in (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".tif", ".tiff", ".webp", ".bmp", ".ppm", ".pgm"):
        assert ext in exts
    for ext in (".h5", ".grib", ".bufr", ".wmf", ".mpg", ".pdf", ".txt"):  # identified but not decodable, or not images
        assert ext not in exts
    assert (".heic" in exts) == (".heic" in Image.registered_extensions())


def test_every_format_and_mode_is_used(tmp_path):
    root = tmp_path / "train"
    write_good_files(root / "mixed")
    two_classes(root)
    scan = scan_folder(root)
    assert scan.classes == ["a", "b", "mixed"]
    assert scan.bad == [] and scan.ignored == []
    assert scan.counts() == ([3, 3, len(GOOD_FILES)], [0, 0, 0])
    ds = CheckedImageFolder(root, channels=3)
    assert len(ds) == 6 + len(GOOD_FILES) == 19
    modes = {Path(p).name: Image.open(p).mode for p, _ in ds.samples}
    assert modes["cmyk.jpg"] == "CMYK" and modes["sixteen_bit.png"] == "I;16" and modes["palette.png"] == "P"
    assert modes["rgba.png"] == "RGBA" and modes["gray.jpeg"] == "L"
    for i in range(len(ds)):
        img, target = ds[i]
        assert img.mode == "RGB" and target == ds.targets[i]
    # torchvision's ImageFolder leaves out the GIF, .jpe and .jfif files of the same folder
    assert len(datasets.ImageFolder(str(root)).samples) == len(ds) - 3


def test_hidden_files_and_os_junk_are_ignored(tmp_path):
    root = two_classes(tmp_path / "train")
    (root / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "a" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "a" / "._a0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork beside a real image
    (root / "a" / ".ipynb_checkpoints").mkdir()
    picture(20, 20).save(root / "a" / ".ipynb_checkpoints" / "a0-checkpoint.png")  # a valid image, but hidden
    (root / "b" / "notes.txt").write_text("labels checked by hand")
    (root / ".git").mkdir()
    (root / "README.md").write_text("my dataset")
    scan = scan_folder(root)
    assert scan.classes == ["a", "b"]  # .git is not a class
    assert [Path(p).name for p, _ in scan.samples] == ["a0.png", "a1.png", "a2.png", "b0.png", "b1.png", "b2.png"]
    assert scan.bad == []
    reasons = sorted((Path(p).name, r) for p, r in scan.ignored)
    assert reasons == [(".DS_Store", "hidden or system files"), ("._a0.png", "hidden or system files"),
                       (".ipynb_checkpoints", "hidden or system files"), ("README.md", "files outside the class folders"),
                       ("Thumbs.db", "hidden or system files"), ("notes.txt", "files without an image extension")]
    text = scan.describe("train", skipped=True)
    assert text.endswith("ignored 6 files: hidden or system files (4), files outside the class folders (1), "
                         "files without an image extension (1)")


def test_symbolic_links_never_count_twice_or_cross_classes(tmp_path):
    root = two_classes(tmp_path / "train")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    picture(30, 30).save(outside / "stray.png")
    a = root / "a"
    os.symlink("a0.png", a / "again.png")  # a second name for a file of the same class
    os.symlink(a / "a1.png", a / "zz_absolute.png")  # the same, by absolute path
    os.symlink("../b/b0.png", a / "from_b.png")  # another class's image
    os.symlink(outside / "stray.png", a / "stray.png")  # outside the dataset
    os.symlink(outside, a / "outside_dir")  # a folder outside
    os.symlink(".", a / "loop")  # a folder loop
    (a / "sub").mkdir()
    picture(21, 21).save(a / "sub" / "deep.png")
    os.symlink("sub", a / "sub_again")  # a folder already listed
    (a / ".hidden").mkdir()
    picture(22, 22).save(a / ".hidden" / "only_via_link.png")
    os.symlink(".hidden/only_via_link.png", a / "visible.png")  # the only listed name of a file inside the class
    os.symlink("cycle2.png", a / "cycle1.png")  # a link loop between two names
    os.symlink("cycle1.png", a / "cycle2.png")
    scan = scan_folder(root)
    names = sorted(os.path.relpath(p, root) for p, t in scan.samples if t == 0)
    assert names == ["a/a0.png", "a/a1.png", "a/a2.png", "a/sub/deep.png", "a/visible.png"]
    assert len(scan.samples) == 8
    assert len({os.path.realpath(p) for p, _ in scan.samples}) == 8  # no file twice
    ignored = {os.path.relpath(p, root): r for p, r in scan.ignored}
    assert ignored == {"a/.hidden": "hidden or system files", "a/again.png": "links repeating a file already listed",
                       "a/zz_absolute.png": "links repeating a file already listed",
                       "a/from_b.png": "links leaving their class folder", "a/stray.png": "links leaving their class folder",
                       "a/outside_dir": "links leaving their class folder",
                       "a/loop": "links repeating a folder already listed",
                       "a/sub_again": "links repeating a folder already listed"}
    assert sorted((os.path.relpath(b.path, root), b.reason) for b in scan.bad) == [
        ("a/cycle1.png", "broken symbolic link (its target does not exist or the links loop)"),
        ("a/cycle2.png", "broken symbolic link (its target does not exist or the links loop)")]
    assert "ignored links: " in scan.describe("train", skipped=True)


def test_class_folder_links(tmp_path):
    store = two_classes(tmp_path / "store")
    root = tmp_path / "train"
    root.mkdir()
    os.symlink(store / "a", root / "cats")  # a class folder that is a link: its target is the class
    os.symlink(store / "b", root / "dogs")
    scan = scan_folder(root)
    assert scan.classes == ["cats", "dogs"] and scan.counts()[0] == [3, 3]
    os.symlink(store / "a", root / "kittens")  # the same folder under two class names
    with pytest.raises(InputError, match=r"class folders .*cats and .*kittens are the same folder or one holds the other"):
        scan_folder(root)


# ----------------------------------------------------------------------------- unreadable files


def test_unreadable_files_are_listed_in_one_report(tmp_path, capsys):
    root = two_classes(tmp_path / "train", per_class=4)
    write_truncated_jpeg(root / "a" / "cut.jpg")
    (root / "a" / "letter.jpg").write_text("Dear user, this is not a picture.")
    (root / "b" / "empty.png").write_bytes(b"")
    write_bomb_png(root / "b" / "bomb.png")  # over 2x the limit: Pillow's DecompressionBombError
    write_bomb_png(root / "b" / "big.png", side=10000)  # 1x-2x the limit: Pillow only warns; refused here too
    scan = scan_folder(root)
    bad = {Path(b.path).name: b.reason for b in scan.bad}
    assert bad["cut.jpg"].startswith("OSError: image file is truncated")
    assert bad["letter.jpg"] == "not an image Pillow can read"
    assert bad["empty.png"] == "empty file (0 bytes)"
    assert bad["bomb.png"].startswith("refused by Pillow's decompression-bomb check: Image size (179560000 pixels) exceeds limit")
    assert bad["big.png"] == ("10000x10000 = 100000000 pixels, over Pillow's decompression-bomb limit of 89478485 "
                              "(PIL.Image.MAX_IMAGE_PIXELS)")
    assert len(bad) == 5 and scan.counts() == ([4, 4], [2, 3])
    with pytest.raises(InputError) as info:
        report_bad_images([scan], skip=False)
    assert str(info.value) == ("5 image files cannot be read (listed above); fix: remove or replace them, or pass "
                               "--skip_bad_images to leave them out")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "5 image files Pillow cannot read:" and len(err) == 6
    assert f"  {root / 'a' / 'letter.jpg'}: not an image Pillow can read" in err
    report = report_bad_images([scan], skip=True)
    err = capsys.readouterr().err
    assert report in err and err.endswith("(--skip_bad_images: left out)\n")
    text = scan.describe("train", skipped=True)
    assert "8 images in 2 classes, 5 unreadable skipped" in text
    assert [line.split() for line in text.splitlines()[1:4]] == [["class", "used", "skipped"], ["a", "4", "2"], ["b", "4", "3"]]


def test_one_bad_file_is_one_line(tmp_path):
    root = two_classes(tmp_path / "train")
    cut = write_truncated_jpeg(root / "b" / "cut.jpg")
    with pytest.raises(InputError, match=rf"^cannot read image {cut}: OSError: image file is truncated .*--skip_bad_images"):
        CheckedImageFolder(root)
    assert len(CheckedImageFolder(root, skip_bad=True)) == 6


def test_check_image_accepts_a_jpeg_with_trailing_bytes(tmp_path):
    path = tmp_path / "padded.jpg"
    path.write_bytes(jpeg_bytes() + b"\x00" * 100)  # some cameras pad after the end-of-image marker
    assert check_image(path) is None
    path.write_bytes(jpeg_bytes()[:-2])  # the last marker missing: decoded fully to find out, and refused
    assert check_image(path).startswith("OSError: image file is truncated")


# ----------------------------------------------------------------------------- structural errors


@pytest.mark.parametrize("case,message", [
    ("empty", r"no class folders in .*train: expected .*train/<class_name>/<image files>"),
    ("one_class", r"train has one class folder only \(a\): a classifier needs at least two classes"),
    ("no_image", r"class folder .*train/c has no images \(files with an image extension Pillow reads"),
    ("case", r"class folders .*train/A and .*train/a differ only by case"),
    ("all_bad", r"class folder .*train/c has no usable image \(every image in it is unreadable"),
])
def test_structural_errors(tmp_path, case, message):
    root = tmp_path / "ds"
    train = root / "train"
    make_image_folder(root, classes=("a", "b"), per_class=2)
    if case == "empty":
        shutil.rmtree(train)
        train.mkdir()
        (train / ".DS_Store").write_bytes(b"junk")
    elif case == "one_class":
        shutil.rmtree(train / "b")
    elif case == "no_image":
        (train / "c").mkdir()
        (train / "c" / "notes.txt").write_text("todo")
        (train / "c" / ".hidden.png").write_bytes(jpeg_bytes())
    elif case == "case":
        shutil.copytree(train / "a", train / "A")
    elif case == "all_bad":
        (train / "c").mkdir()
        (train / "c" / "x.jpg").write_text("not a picture")
        shutil.copytree(train / "c", root / "val" / "c")
    with pytest.raises(InputError, match=message):
        build_datasets(DataSpec(str(root), skip_bad_images=True), Preprocess.for_size(32))


def test_val_classes_must_equal_train_classes(tmp_path):
    root = make_image_folder(tmp_path / "ds", classes=("a", "b", "c"), per_class=2)
    shutil.rmtree(root / "val" / "c")
    shutil.copytree(root / "val" / "b", root / "val" / "d")
    with pytest.raises(InputError, match=r"differ: only in .*train: \['c'\]; only in .*val: \['d'\]; fix: give both"):
        build_datasets(DataSpec(str(root)), Preprocess.for_size(32))


def test_a_file_in_both_splits_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "ds", classes=("a", "b"), per_class=2)
    shutil.rmtree(root / "val" / "b")
    os.symlink(root / "train" / "b", root / "val" / "b")  # val/b is train/b: its images would be validated on
    with pytest.raises(InputError, match=r"^2 image files are in both .*train and .*val \(through symbolic links; first: "
                                         r".*train/b/b_0.png = .*val/b/b_0.png\): validation must not see training images"):
        build_datasets(DataSpec(str(root)), Preprocess.for_size(32))


# ----------------------------------------------------------------------------- end to end through train.py


def test_train_reports_every_bad_file_then_skips_them(tmp_path):
    root = make_image_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=4)
    cut = write_truncated_jpeg(root / "train" / "cat" / "cut.jpg")
    text = root / "val" / "dog" / "readme.jpg"
    text.write_text("not an image")
    write_good_files(root / "train" / "dog" / "more")
    common = ["--model", "custom", "--img_size", "32", "--max_epoch", "1", "--batch_size", "8", "--num_workers", "0",
              "--device", "cpu", "--quiet", "--path_to_save", str(tmp_path / "runs"), "--dataset", str(root)]
    proc = run_main("train.py", *common)  # main(argv) in this process, as `python train.py` runs it
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "2 image files Pillow cannot read:",
        f"  {cut}: OSError: image file is truncated (51 bytes not processed)",
        f"  {text}: not an image Pillow can read",
        "error: 2 image files cannot be read (listed above); fix: remove or replace them, or pass --skip_bad_images "
        "to leave them out"]
    assert not (tmp_path / "runs").exists()
    proc = run_main("train.py", *common, "--skip_bad_images")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("Pillow cannot read") == 1 and "(--skip_bad_images: left out)" in proc.stderr
    n_dog = 4 + len(GOOD_FILES)
    assert f"train: {root / 'train'} - {4 + n_dog} images in 2 classes, 1 unreadable skipped" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["cat", "4", "1"] in rows and ["dog", str(n_dog), "0"] in rows and ["dog", "4", "1"] in rows  # val/dog
    assert f"val: {root / 'val'} - 8 images in 2 classes, 1 unreadable skipped" in proc.stdout
    assert f"{4 + n_dog} train / 8 val images" in proc.stdout
    run_dir = tmp_path / "runs" / "photos" / "custom"
    assert (run_dir / "skipped_images.txt").read_text().splitlines() == proc.stderr.splitlines()[:3]


# ----------------------------------------------------------------------------- checkpoints and other classes


def train_in_process(root: Path, out: Path, *extra: str) -> int:
    import train

    return train.main(["--model", "custom", "--img_size", "32", "--max_epoch", "1", "--wp_epoch", "0", "--batch_size", "4",
                       "--num_workers", "0", "--device", "cpu", "--quiet", "--dataset", str(root), "--path_to_save",
                       str(out), *extra])


@pytest.fixture(scope="module")
def animals_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("animals")
    root = make_image_folder(base / "animals", classes=("cat", "dog", "fish"), per_class=4)
    assert train_in_process(root, base / "runs") == 0
    return base / "runs" / "animals" / "custom"


def test_resume_and_eval_refuse_other_classes(tmp_path, animals_run):
    import eval as eval_script
    import train

    other = make_image_folder(tmp_path / "vehicles", classes=("bus", "car", "cat"), per_class=2)  # same count, other names
    with pytest.raises(InputError) as info:
        train.main(["--resume", str(animals_run / "last.pth"), "--dataset", str(other), "--device", "cpu", "--quiet",
                    "--num_workers", "0", "--max_epoch", "2"])
    assert str(info.value) == (
        f"the classes of checkpoint {animals_run / 'last.pth'} and dataset {other} differ: only in checkpoint "
        f"{animals_run / 'last.pth'}: ['dog', 'fish']; only in dataset {other}: ['bus', 'car']; fix: resume on the run's "
        f"own dataset ({animals_run.parents[2] / 'animals'}); to fine-tune on another dataset start a new run with "
        f"--init_from {animals_run / 'last.pth'}")
    with pytest.raises(InputError, match=r"the classes of model .*best.pth and dataset .*vehicles differ: only in model "
                                         r".*best.pth: \['dog', 'fish'\]; only in dataset .*vehicles: \['bus', 'car'\]"):
        eval_script.main(["--weights", str(animals_run / "best.pth"), "--dataset", str(other), "--device", "cpu",
                          "--quiet", "--num_workers", "0", "--speed_repeats", "0", "--output", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("classes,head", [(("bus", "car", "van", "tram"), "new"), (("bus", "car", "van"), "new"),
                                          (("cat", "dog", "fish"), "kept")])
def test_init_from_fine_tunes_on_other_classes(tmp_path, animals_run, capsys, classes, head):
    from utils.checkpoint import head_keys as head_keys_of
    from utils.checkpoint import inference_state, load_checkpoint

    source = load_checkpoint(animals_run / "best.pth")
    root = make_image_folder(tmp_path / "vehicles", classes=classes, per_class=2)
    out = tmp_path / "runs"
    # no --model/--img_size: the network flags come from the checkpoint
    code = train_in_process(root, out, "--init_from", str(animals_run / "best.pth"), "--max_epoch", "1", "--base_lr", "1e-12")
    assert code == 0
    stdout = capsys.readouterr().out
    n_tensors = len(source["model"])
    line = next(x for x in stdout.splitlines() if x.startswith("initialised from"))
    if head == "new":
        head_keys = sorted(head_keys_of("custom", len(classes), source["model_kwargs"]))
        assert len(head_keys) == 2  # the last Linear layer's weight and bias
        assert f"loaded {n_tensors - 2} tensors, skipped 2 ({', '.join(head_keys)})" in line, line
        assert f"new head for {len(classes)} classes" in line
    else:
        assert line == f"initialised from {animals_run / 'best.pth'}: loaded {n_tensors} tensors, skipped 0"
    run_dir = out / "vehicles" / "custom"
    ckpt = load_checkpoint(run_dir / "last.pth")
    assert ckpt["classes"] == sorted(classes) and ckpt["epoch"] == 0  # a new run: its own classes, epoch 1 only
    assert ckpt["args"]["init_from"] == str(animals_run / "best.pth")
    assert json.loads((run_dir / "args.json").read_text())["init_from"] == str(animals_run / "best.pth")
    # with a learning rate of 1e-12 the loaded convolution weights are unchanged after the epoch
    first_conv = next(k for k, v in source["model"].items() if v.ndim == 4)
    assert torch.allclose(ckpt["model"][first_conv], inference_state(source)[first_conv], atol=1e-6)


def test_init_from_refuses_a_network_it_does_not_fit(tmp_path, animals_run):
    root = make_image_folder(tmp_path / "vehicles", classes=("bus", "car"), per_class=2)
    with pytest.raises(InputError, match=r"--init_from .*best.pth: none of its tensors fits --model resnet9 \(it holds a "
                                         r"'custom'\)"):
        train_in_process(root, tmp_path / "runs", "--init_from", str(animals_run / "best.pth"), "--model", "resnet9")
    with pytest.raises(InputError, match="--init_from starts a new run from a checkpoint's weights: drop --resume"):
        train_in_process(root, tmp_path / "runs", "--init_from", str(animals_run / "best.pth"), "--resume",
                         str(animals_run / "last.pth"))


def test_eval_reports_or_skips_bad_images(tmp_path, animals_run, capsys):
    import eval as eval_script

    root = make_image_folder(tmp_path / "animals", classes=("cat", "dog", "fish"), per_class=4)
    cut = write_truncated_jpeg(root / "val" / "dog" / "cut.jpg")
    argv = ["--weights", str(animals_run / "best.pth"), "--dataset", str(root), "--device", "cpu", "--quiet", "--num_workers",
            "0", "--speed_repeats", "0", "--output", str(tmp_path / "r.json")]
    with pytest.raises(InputError, match=rf"^cannot read image {cut}: OSError: image file is truncated"):
        eval_script.main(argv)
    assert not (tmp_path / "r.json").exists()
    assert eval_script.main([*argv, "--skip_bad_images"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 12
    assert f"  {cut}: OSError: image file is truncated" in capsys.readouterr().err
