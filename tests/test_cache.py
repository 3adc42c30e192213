"""The decode-once image cache: bit-identical to decoding with utils.data.preprocess, rebuilt on any file change,
never trusting a killed or damaged build, augmenting like the PIL pipeline, and used by train.py end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_image_folder, run_main
from matplotlib import cbook
from PIL import Image

import train
from utils.data.augment import resolve_augment
from utils.data.batch_augment import augment_batch, normalize_batch, sample_params
from utils.data.cache import CacheLayout, cache_path, choose_cache, open_cache
from utils.data.datasets import DataSpec, build_datasets, build_transform
from utils.data.preprocess import Preprocess, center_crop, eval_transform, load_image, resize_shorter
from utils.errors import InputError

PHOTO = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))  # a real photograph shipped with matplotlib


def write_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0, jitter: int = 30) -> list[Path]:
    """JPEG crops of the Grace Hopper photograph (near one position, so the mean image keeps her asymmetric
    structure), brightness varied, resized to `size` (width, height)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(PHOTO) as img:
        photo = img.convert("RGB")
    paths = []
    for k in range(count):
        x, y = rng.integers(0, jitter + 1, 2)
        crop = photo.crop((40 + x, 80 + y, 40 + x + 420, 80 + y + 420 * size[1] // size[0])).resize(size, Image.BILINEAR)
        arr = np.clip(np.asarray(crop, dtype=np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
        path = folder / f"photo_{k:03d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def expected_pixels(path: Path, layout: CacheLayout) -> np.ndarray:
    """What the cache must hold for one file: utils.data.preprocess's functions applied directly."""
    img = center_crop(resize_shorter(load_image(path, layout.channels), layout.resize, layout.interpolation), layout.side)
    arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def test_cache_is_bit_identical_to_decoding_and_resizing_the_files(tmp_path):
    paths = write_photos(tmp_path / "img", 3, (120, 90))  # landscape JPEGs
    portrait = tmp_path / "img" / "portrait.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (97, 61, 3), dtype=np.uint8)).save(portrait)
    gray = tmp_path / "img" / "gray.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (50, 70), dtype=np.uint8), "L").save(gray)
    rgba = tmp_path / "img" / "alpha.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(rgba)
    paths += [portrait, gray, rgba]
    pre = Preprocess.for_size(56)  # resize 64
    for kind in ("train", "val"):
        layout = CacheLayout.for_split(kind, pre)
        images, info = open_cache(paths, layout, tmp_path / "cache", show_progress=False, workers=2)
        assert info.built and images.shape == (6, 3, layout.side, layout.side)
        assert layout.side == (64 if kind == "train" else 56)  # train: the eval resize's square; val: the eval crop
        for k, path in enumerate(paths):
            np.testing.assert_array_equal(images[k], expected_pixels(path, layout), err_msg=f"{kind} {path.name}")
        if kind == "val":  # normalised batches of the cached val crops equal the shared eval transform, bit for bit
            batch = normalize_batch(torch.from_numpy(np.ascontiguousarray(images)), pre).numpy()
            for k, path in enumerate(paths):
                np.testing.assert_array_equal(batch[k], eval_transform(load_image(path), pre))
    # grayscale models: one channel, from the same functions
    layout = CacheLayout.for_split("train", Preprocess.for_size(56, channels=1))
    images, _ = open_cache(paths, layout, tmp_path / "cache", show_progress=False)
    assert images.shape == (6, 1, 64, 64)
    np.testing.assert_array_equal(images[4], expected_pixels(gray, layout))


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    paths = write_photos(tmp_path / "img", 4, (80, 60))
    layout, cache_dir = CacheLayout.for_split("train", Preprocess.for_size(32)), tmp_path / "cache"
    first, info = open_cache(paths, layout, cache_dir, show_progress=False)
    assert info.built
    again, info2 = open_cache(paths, layout, cache_dir, show_progress=False)
    assert not info2.built and info2.path == info.path and np.array_equal(first, again)

    # touched (same content, new modification time): a new key, rebuilt
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    touched, info3 = open_cache(paths, layout, cache_dir, show_progress=False)
    assert info3.built and info3.path != info.path and np.array_equal(touched, first)

    # replaced by another picture with the same size in bytes and the old modification time: the size and
    # mtime key cannot see that (as make and rsync), so replace = write a new file, as every editor does
    Image.fromarray(np.full((60, 80, 3), (255, 0, 0), np.uint8)).save(paths[2], quality=90)
    replaced, info4 = open_cache(paths, layout, cache_dir, show_progress=False)
    assert info4.built and info4.path not in (info.path, info3.path)
    np.testing.assert_array_equal(replaced[2], expected_pixels(paths[2], layout))
    assert replaced[2, 0].mean() > 240 and np.array_equal(replaced[[0, 1, 3]], first[[0, 1, 3]])

    # one file more, or a different geometry: other keys too
    extra = write_photos(tmp_path / "img2", 1, (80, 60), seed=5)
    assert cache_path(paths + extra, layout, cache_dir) != Path(info4.path)
    assert cache_path(paths, CacheLayout.for_split("train", Preprocess.for_size(40)), cache_dir) != Path(info4.path)
    # each rebuild removed the split's outdated file: one array (and its description) per split and geometry
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".npy"]
    assert json.loads(Path(info4.path).with_suffix(".json").read_text())["files"] == 4


def test_a_killed_build_is_not_trusted(tmp_path):
    """SIGKILL in the middle of a build (no Python clean-up runs): no cache file exists under the real name, the next
    run builds a complete one and removes the dead build's temporary file; a damaged (truncated) file is rebuilt."""
    paths = write_photos(tmp_path / "img", 6, (80, 60))
    cache_dir = tmp_path / "cache"
    # the build hangs at the 4th image (standing in for a slow disk), so the kill lands mid-build every time
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import utils.data.cache as cache
from utils.data.preprocess import Preprocess
decode = cache.decode
def slow(path, layout):
    if str(path).endswith("photo_003.jpg"):
        time.sleep(600)
    return decode(path, layout)
cache.decode = slow
cache.open_cache({[str(p) for p in paths]!r}, cache.CacheLayout.for_split("train", Preprocess.for_size(32)),
                 {str(cache_dir)!r}, show_progress=False, workers=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(6000):  # until the temporary file exists and the first three images are written
            temps = list(cache_dir.glob(".*.tmp*.npy")) if cache_dir.is_dir() else []
            try:
                if temps and np.load(temps[0], mmap_mode="r")[2].any():
                    break
            except (ValueError, OSError, EOFError):  # the header is not written yet
                pass
            assert proc.poll() is None, "the build ended before it was killed"
            time.sleep(0.01)
        else:
            pytest.fail("the build never started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [p for p in cache_dir.glob("*.npy") if not p.name.startswith(".")]  # nothing under a real name
    assert len(list(cache_dir.glob(".*.tmp*.npy"))) == 1  # the dead build's half-written temporary file

    layout = CacheLayout.for_split("train", Preprocess.for_size(32))
    images, info = open_cache(paths, layout, cache_dir, show_progress=False)
    assert info.built and not list(cache_dir.glob(".*.tmp*"))
    for k, path in enumerate(paths):
        np.testing.assert_array_equal(images[k], expected_pixels(path, layout))

    # a damaged file under the real name (truncated copy, full disk elsewhere) is rebuilt, not read
    del images
    data = Path(info.path).read_bytes()
    Path(info.path).write_bytes(data[: len(data) // 2])
    images, info2 = open_cache(paths, layout, cache_dir, show_progress=False)
    assert info2.built and info2.path == info.path and images[5].any()
    np.testing.assert_array_equal(images[5], expected_pixels(paths[5], layout))


def test_a_bad_image_stops_the_build_without_leaving_a_file(tmp_path):
    paths = write_photos(tmp_path / "img", 3, (80, 60))
    paths[1].write_bytes(paths[1].read_bytes()[:300])  # cut short
    with pytest.raises(InputError, match="photo_001.jpg"):
        open_cache(paths, CacheLayout.for_split("train", Preprocess.for_size(32)), tmp_path / "cache", show_progress=False)
    assert not [p for p in (tmp_path / "cache").iterdir()]


def _two_pipelines(n: int, tmp_path: Path):
    """Per-pixel mean images of the PIL pipeline (two seeds: the noise) and of the cache + tensor pipeline."""
    pre = Preprocess.for_size(48)  # resize 55
    augment = resolve_augment("seed", 48)  # RandomResizedCrop(0.8-1) + rotation 15 + flip
    paths = write_photos(tmp_path / "sq", n, (160, 160))  # square photos: the cache keeps all of each image
    layout = CacheLayout.for_split("train", pre)
    images, _ = open_cache(paths, layout, tmp_path / "cache", show_progress=False)
    pil_transform = build_transform(pre, train=True, augment=augment)
    originals = [load_image(p) for p in paths]

    def pil_run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.stack([pil_transform(img) for img in originals])

    def cache_run(seed: int, source=images, augment=augment, pre=pre) -> torch.Tensor:
        torch.manual_seed(seed)
        source = torch.from_numpy(np.ascontiguousarray(source))
        params = sample_params(len(source), source.shape[-2], source.shape[-1], augment=augment, out_size=pre.img_size)
        return augment_batch(source, params, pre, augment)

    return pil_run, cache_run, images, augment, pre


def test_augmentation_from_the_cache_matches_the_pil_pipeline(tmp_path):
    """On the same photographs: the mean image and the per-image means of the cache + tensor pipeline agree with
    the PIL pipeline on the original files as closely as two PIL runs agree with each other, the per-image contrast
    (std) within 5% (measured: 3% lower, as the cached square is resampled once more: slightly softer; the in-memory
    tensor pipeline on the full-size files is 4% higher, from aliasing); the same statistics catch a wrong crop
    scale, a wrong flip probability and a wrong normalisation."""
    pil_run, cache_run, images, augment, pre = _two_pipelines(160, tmp_path)
    pil_a, pil_b, ours = pil_run(0), pil_run(1), cache_run(2)
    assert ours.shape == pil_a.shape == (160, 3, 48, 48)

    def distances(x: torch.Tensor) -> tuple[float, float, float]:
        """mean |difference| of the mean images, |difference| of the mean per-image means, |relative difference|
        of the mean per-image stds (all in normalised units)."""
        return ((x.mean(0) - pil_a.mean(0)).abs().mean().item(),
                abs(x.mean((1, 2, 3)).mean() - pil_a.mean((1, 2, 3)).mean()).item(),
                abs(x.std((1, 2, 3)).mean() / pil_a.std((1, 2, 3)).mean() - 1).item())

    noise = distances(pil_b)
    limits = (1.5 * noise[0] + 0.01, 3 * noise[1] + 0.01, 0.05)
    got = distances(ours)
    assert all(g < lim for g, lim in zip(got, limits)), (got, limits, noise)

    # what each statistic would say about a wrong pipeline (each fails the same limits)
    zoomed = cache_run(2, source=np.ascontiguousarray(images[:, :, 12:-12, 12:-12]))  # crops from too small a square
    always_flipped = cache_run(2, augment=resolve_augment("seed", 48).__class__(**{**augment.to_dict(), "flip": 1.0}))
    wrong_std = cache_run(2, pre=Preprocess(**{**pre.to_dict(), "std": (0.5, 0.5, 0.5)}))
    assert distances(zoomed)[0] > limits[0], (distances(zoomed), limits)
    assert distances(always_flipped)[0] > limits[0], (distances(always_flipped), limits)
    assert distances(wrong_std)[2] > limits[2], (distances(wrong_std), limits)


def test_choose_cache_decisions(tmp_path, fashion_root):
    pre = Preprocess.for_size(32)
    folder = make_image_folder(tmp_path / "mixed")  # images of several sizes
    train_set, val_set, _ = build_datasets(DataSpec(str(folder)), pre)
    use, reason = choose_cache("auto", "auto", train_set, val_set, pre, tmp_path / "c")
    assert use and "decoded once into" in reason and str(tmp_path / "c") in reason
    assert choose_cache("auto", "tensor", train_set, val_set, pre, tmp_path / "c")[0]
    assert choose_cache("auto", "pil", train_set, val_set, pre, tmp_path / "c") == (False, "--data_pipeline pil")
    assert choose_cache("off", "auto", train_set, val_set, pre, tmp_path / "c") == (False, "--cache off")
    fm_train, fm_val, _ = build_datasets(DataSpec(None, str(fashion_root)), Preprocess.for_size(28))
    use, reason = choose_cache("auto", "auto", fm_train, fm_val, Preprocess.for_size(28), tmp_path / "c")
    assert not use and "one uint8 tensor" in reason
    # uniform images no larger than the cached square: kept as they are (exact, and no bigger)
    small = tmp_path / "small"
    for split in ("train", "val"):
        for k in range(2):
            (small / split / f"c{k}").mkdir(parents=True)
            for n in range(2):
                Image.fromarray(np.full((24, 30, 3), 60 * k + n, np.uint8)).save(small / split / f"c{k}" / f"{n}.png")
    s_train, s_val, _ = build_datasets(DataSpec(str(small)), pre)
    use, reason = choose_cache("auto", "auto", s_train, s_val, pre, tmp_path / "c")
    assert not use and "no larger than the cache" in reason
    with pytest.raises(InputError, match="--cache"):
        choose_cache("on", "auto", train_set, val_set, pre, tmp_path / "c")


def _results(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_train_py_builds_then_reuses_the_cache_and_learns_like_pil(tmp_path, capsys):
    """--cache auto (the default, here on a CPU) on a folder of images of several sizes: the first run builds (and
    says so), the second finds it warm and trains identically; both reach the PIL pipeline's val accuracy; the
    checkpoint records the cache used."""
    folder = make_image_folder(tmp_path / "ds", per_class=8)
    # 2 epochs: both pipelines reach val acc@1 1.0 after the first (measured), and results.csv has two rows to compare
    common = ["--dataset", str(folder), "--model", "custom", "--img_size", "32", "--max_epoch", "2", "--batch_size", "8",
              "--num_workers", "0", "--device", "cpu", "--cache_dir", str(tmp_path / "cache"), "--base_lr", "3e-3"]

    def run(name: str, *extra: str) -> tuple[str, Path]:
        assert train.main([*common, "--path_to_save", str(tmp_path / name), *extra]) == 0
        captured = capsys.readouterr()
        return captured.out + captured.err, tmp_path / name / "ds" / "custom"

    out1, cold = run("cold", "--quiet")
    out2, warm = run("warm", "--quiet")
    out3, pil = run("pil", "--quiet", "--data_pipeline", "pil")
    assert "data pipeline: tensor (images decoded once into" in out1
    assert "caching train images" not in out1  # --quiet: no progress bar
    assert f"data: cache {tmp_path / 'cache'}/train-37px-" in out1 and "(built in " in out1
    assert out2.count("(warm;") == 2 and "built in" not in out2
    assert "data pipeline: pil" in out3 and "data: cache" not in out3
    metrics = [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in _results(cold)]
    assert metrics == [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in _results(warm)]
    acc_cache, acc_pil = float(_results(cold)[-1]["val_acc1"]), float(_results(pil)[-1]["val_acc1"])
    # 24 val images of 3 colour classes: both pipelines learn them; one image = 0.042
    assert acc_cache >= 0.9 and acc_pil >= 0.9 and abs(acc_cache - acc_pil) <= 0.09, (acc_cache, acc_pil)
    ckpt = torch.load(warm / "last.pth", map_location="cpu", weights_only=True)
    used = ckpt["args"]["data_used"]
    assert used["pipeline"] == "tensor" and [c["kind"] for c in used["cache"]] == ["train", "val"]
    assert [c["built"] for c in used["cache"]] == [False, False] and Path(used["cache"][0]["path"]).is_file()
    assert json.loads((cold / "args.json").read_text())["data_used"]["cache"][0]["built"] is True
    assert torch.load(pil / "last.pth", map_location="cpu", weights_only=True)["args"]["data_used"] == {"pipeline": "pil", "cache": []}
    # the progress bar while building: tests/test_run_control.py watches it on a terminal (bars need a tty)


def test_unwritable_cache_dir_is_one_line_exit_2(tmp_path):
    folder = make_image_folder(tmp_path / "ds")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    proc = run_main("train.py", "--dataset", str(folder), "--img_size", "32", "--max_epoch", "1", "--num_workers", "0",
                    "--device", "cpu", "--quiet", "--cache_dir", str(blocker), "--path_to_save", str(tmp_path / "runs"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the image cache" in lines[0] and "--cache off" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.cuda
def test_cache_feeds_the_gpu(tmp_path):
    """Training on a GPU: the cached uint8 images move to the GPU once and are augmented there; the val crops come
    out equal to the CPU's eval transform (CUDA_TESTS_DEVICE=cpu: a dry run on the CPU)."""

    from conftest import CUDA_TESTS_DEVICE

    from utils.data.loaders import build_train_loaders

    device = torch.device(CUDA_TESTS_DEVICE)
    folder = make_image_folder(tmp_path / "ds")
    pre = Preprocess.for_size(32)
    augment = resolve_augment("seed", 32)
    train_set, val_set, _ = build_datasets(DataSpec(str(folder)), pre, augment=augment)
    loaders = build_train_loaders(train_set, val_set, pre, augment, pipeline="auto", batch_size=4, num_workers=0,
                                  device=device, seed=0, cache="auto", cache_dir=tmp_path / "cache", show_progress=False)
    assert loaders.pipeline == "tensor" and [c.built for c in loaders.caches] == [True, True]
    assert loaders.train.images.device.type == device.type
    loaders.set_epoch(0)
    images, targets = next(iter(loaders.train))
    assert images.device.type == device.type and images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
    val_images, _ = next(iter(loaders.val))
    for k, (path, _) in enumerate(val_set.samples[:len(val_images)]):
        expected = torch.from_numpy(eval_transform(load_image(path), pre))
        assert torch.allclose(val_images[k].cpu(), expected, atol=1e-6), path
    again = build_train_loaders(train_set, val_set, pre, augment, pipeline="auto", batch_size=4, num_workers=0,
                                device=device, seed=0, cache="auto", cache_dir=tmp_path / "cache", show_progress=False)
    assert [c.built for c in again.caches] == [False, False]
