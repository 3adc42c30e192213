"""The tensor data pipeline: same augmentation as the PIL recipe, bit-equal validation, sharding, resume equality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from conftest import make_image_folder, synthetic_fashion_images
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torchvision.transforms import InterpolationMode

from utils.data.augment import resolve_augment
from utils.data.batch_augment import AugmentParams, augment_batch, sample_crop_boxes, sample_erase_boxes, sample_params
from utils.data.datasets import CheckedImageFolder, DataSpec, EvalTransform, build_datasets, build_transform
from utils.data.fashion_mnist import fashion_mnist
from utils.data.preprocess import Preprocess
from utils.data.tensor_pipeline import (
    TensorEvalLoader,
    TensorTrainLoader,
    build_tensor_loaders,
    choose_pipeline,
    eval_images_tensor,
    train_images_tensor,
)
from utils.errors import InputError


def _histogram(values: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(values.long(), minlength=size + 1).double() / len(values)


def test_crop_boxes_follow_torchvision_distribution():
    """Crop width/height histograms, scale and offsets match RandomResizedCrop.get_params (same rejection sampling)."""
    n = 3000
    torch.manual_seed(0)
    image = torch.zeros(1, 28, 28)
    ref = torch.tensor([T.RandomResizedCrop.get_params(image, [0.8, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], dtype=torch.float64)
    i, j, h, w = sample_crop_boxes(n, 28, 28)
    for ours, theirs in ((h, ref[:, 2]), (w, ref[:, 3])):
        total_variation = 0.5 * (_histogram(ours, 28) - _histogram(theirs, 28)).abs().sum().item()
        assert total_variation < 0.06
    assert abs((h * w / 784).mean().item() - (ref[:, 2] * ref[:, 3] / 784).mean().item()) < 0.006
    # offsets are uniform over the valid range: i / (28 - h) averages 0.5 where the range is non-empty
    room = (28 - h) > 0
    assert abs((i[room] / (28 - h[room])).mean().item() - 0.5) < 0.03
    assert ((i >= 0) & (j >= 0) & (i + h <= 28) & (j + w <= 28)).all()
    # a 20x40 image never admits a crop in range, so both take the same fallback: the central 3:4 box
    wide = torch.zeros(1, 20, 40)
    fallback = T.RandomResizedCrop.get_params(wide, [0.8, 1.0], [3 / 4, 4 / 3])
    boxes = torch.stack(sample_crop_boxes(50, 20, 40), 1)
    assert (boxes == torch.tensor(fallback, dtype=torch.float64)).all()


def test_angles_and_flips_follow_the_recipe():
    torch.manual_seed(1)
    params = sample_params(20000, 28, 28)
    assert params.angle.abs().max().item() <= 15.0
    assert abs(params.angle.mean().item()) < 0.3
    assert abs(params.angle.std().item() - 15 / math.sqrt(3)) < 0.15  # uniform(-15, 15)
    assert abs(params.flip.double().mean().item() - 0.5) < 0.015


def _pil_reference(img: Image.Image, box, angle: float, flip: bool, pre: Preprocess) -> torch.Tensor:
    """The PIL recipe with given parameters: resized crop -> rotate (nearest, fill 0) -> flip -> centre crop."""
    i, j, h, w = box
    out = TF.resized_crop(img, i, j, h, w, [pre.resize, pre.resize], InterpolationMode.BILINEAR)
    out = TF.rotate(out, angle, InterpolationMode.NEAREST, fill=0)
    out = TF.hflip(out) if flip else out
    out = TF.center_crop(out, pre.img_size)
    return TF.normalize(TF.to_tensor(out.convert("RGB")), pre.mean, pre.std)


def _params(box, angle: float, flip: bool) -> AugmentParams:
    values = [torch.tensor([float(v)], dtype=torch.float64) for v in (*box, angle)]
    return AugmentParams(*values, torch.tensor([flip]))


@pytest.mark.parametrize("img_size", [28, 56])
def test_affine_equals_pil_ops_for_fixed_parameters(img_size):
    """One affine resampling reproduces crop + rotation + flip + centre crop; a wrong angle or flip does not."""
    yy, xx = np.mgrid[0:28, 0:28]
    array = (200 * np.exp(-((xx - 8) ** 2 / 30 + (yy - 19) ** 2 / 12)) + 2 * xx).astype(np.uint8)  # asymmetric
    pil, tensor = Image.fromarray(array, "L"), torch.from_numpy(array)[None, None]
    pre = Preprocess.for_size(img_size)
    pixel_scale = 0.226  # normalised units -> [0, 1] pixel units
    for box, angle, flip in (((0, 0, 28, 28), 0.0, False), ((2, 1, 25, 26), 12.0, False), ((1, 3, 24, 22), -14.0, True)):
        ref = _pil_reference(pil, box, angle, flip, pre)
        error = ((augment_batch(tensor, _params(box, angle, flip), pre)[0] - ref).abs().mean() * pixel_scale).item()
        assert error < 0.015, (box, angle, flip, error)
        wrong = augment_batch(tensor, _params(box, -angle if angle else 10.0, not flip), pre)[0]
        assert ((wrong - ref).abs().mean() * pixel_scale).item() > 3 * error + 0.02


@pytest.mark.parametrize("policy, erasing, padding, auto", [
    ("seed", 0.0, 0, "none"), ("light", 0.0, 0, "none"), ("light", 0.5, 0, "none"), ("light", 0.0, 3, "none"),
    ("none", 0.0, 0, "ra"), ("none", 0.0, 0, "ta_wide"), ("none", 0.0, 0, "augmix"), ("light", 0.0, 2, "autoaugment"),
])
def test_augmented_images_have_pil_pipeline_statistics(policy, erasing, padding, auto):
    """Per-image mean/std and the mean image agree with the PIL recipe as closely as two PIL runs agree (the
    auto-augment policies run on PIL images there and on uint8 tensors here, image by image in both)."""
    n = 150 if auto == "augmix" else 300  # AugMix costs ~10x the others per image
    images, _ = synthetic_fashion_images(n, 3)
    pre = Preprocess.for_size(28)
    augment = resolve_augment(policy, 28, erasing, padding, auto)
    pil_transform = build_transform(pre, train=True, augment=augment)

    def pil_run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            return torch.stack([pil_transform(Image.fromarray(a, "L")) for a in images])
        finally:
            torch.set_num_threads(threads)

    pil_a, pil_b = pil_run(0), pil_run(1)
    torch.manual_seed(2)
    ours = augment_batch(torch.from_numpy(images)[:, None], sample_params(len(images), 28, 28, augment=augment, out_size=28), pre,
                         augment)
    assert ours.shape == pil_a.shape == (n, 3, 28, 28)
    for stat in (lambda x: x.mean((1, 2, 3)), lambda x: x.std((1, 2, 3))):
        noise = abs(stat(pil_a).mean() - stat(pil_b).mean()).item()
        assert abs(stat(ours).mean() - stat(pil_a).mean()).item() < 3 * noise + 0.005
    noise = (pil_a.mean(0) - pil_b.mean(0)).abs().mean().item()
    assert (ours.mean(0) - pil_a.mean(0)).abs().mean().item() < 1.5 * noise + 0.002


def test_policies_resolve_and_describe():
    assert resolve_augment("auto", 28).name == "light" and resolve_augment("auto", 64).name == "light"
    assert resolve_augment("auto", 224).name == "seed" and resolve_augment("auto", 65).name == "seed"
    seed = resolve_augment("seed", 28)
    assert (seed.crop_scale, seed.rotation, seed.flip, seed.erasing) == ((0.8, 1.0), 15.0, 0.5, 0.0)
    assert resolve_augment("none", 28, 0.25).describe() == "none: RandomErasing(p=0.25)"
    assert "RandomRotation(15)" in seed.describe()
    for bad in (("flips", 0.0), ("light", 1.5)):
        with pytest.raises(InputError):
            resolve_augment(bad[0], 28, bad[1])


def test_no_augmentation_equals_the_eval_transform():
    """Policy none: the PIL train transform IS the eval transform; the tensor pipeline's single bilinear
    resampling matches PIL's resize + centre crop to within rounding (non-square RGB too)."""
    rng = np.random.default_rng(5)
    pre = Preprocess.for_size(28)
    none = resolve_augment("none", 28)
    pil_train, pil_eval = build_transform(pre, True, none), EvalTransform(pre)
    for shape in ((28, 28), (24, 36)):
        array = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
        array = (array.astype(np.float64) * 0.3 + 120).astype(np.uint8)  # smooth-ish: bilinear variants agree closely
        img = Image.fromarray(array, "RGB")
        expected = pil_eval(img)
        assert torch.equal(pil_train(img), expected)
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
        ours = augment_batch(tensor, sample_params(1, *shape, augment=none, out_size=28), pre)[0]
        assert (ours - expected).abs().mean().item() * 0.226 < 0.01


def test_random_erasing_boxes_follow_torchvision():
    """Erased-area fraction and the probability of erasing match torchvision's RandomErasing(value=0)."""
    n, size = 4000, 28
    torch.manual_seed(0)
    eraser = T.RandomErasing(p=0.5, value=0)
    ones = torch.ones(1, size, size)
    ref = torch.stack([(eraser(ones) == 0).double().mean() for _ in range(n)])
    boxes = sample_erase_boxes(n, size, 0.5)
    ours = boxes[:, 2] * boxes[:, 3] / size**2
    assert abs((ours > 0).double().mean() - (ref > 0).double().mean()).item() < 0.04
    assert abs(ours.mean() - ref.mean()).item() < 0.01
    assert ((boxes[:, 0] + boxes[:, 2] <= size) & (boxes[:, 1] + boxes[:, 3] <= size)).all()
    # the batch really zeroes exactly the box (value 0 after Normalize)
    pre = Preprocess.for_size(28)
    params = sample_params(1, 28, 28, augment=resolve_augment("none", 28, 1.0), out_size=28)
    params.erase = torch.tensor([[3.0, 5.0, 10.0, 7.0]], dtype=torch.float64)
    out = augment_batch(torch.full((1, 1, 28, 28), 200, dtype=torch.uint8), params, pre)[0]
    zero = out == 0
    assert zero[:, 3:13, 5:12].all() and zero.sum().item() == 3 * 10 * 7


@pytest.mark.parametrize("img_size", [28, 40])
def test_eval_loader_equals_shared_eval_transform_fashion(fashion_root, img_size):
    pre = Preprocess.for_size(img_size)
    dataset = fashion_mnist(fashion_root, train=False, transform=EvalTransform(pre))
    images, targets = eval_images_tensor(dataset, pre)
    loader = TensorEvalLoader(images, targets, pre, batch_size=64)
    got = torch.cat([x for x, _ in loader])
    expected = torch.stack([dataset[k][0] for k in range(len(dataset))])
    assert got.shape == (len(dataset), 3, img_size, img_size)
    assert torch.equal(got, expected)
    assert torch.equal(torch.cat([y for _, y in loader]), torch.as_tensor(dataset.targets))


def test_eval_loader_equals_shared_eval_transform_image_folder(image_folder):
    """Non-square RGB images of several sizes, PNG and JPEG."""
    pre = Preprocess.for_size(32)
    dataset = CheckedImageFolder(str(image_folder / "val"), EvalTransform(pre), pre.channels)
    images, targets = eval_images_tensor(dataset, pre)
    got = torch.cat([x for x, _ in TensorEvalLoader(images, targets, pre, batch_size=5)])
    assert torch.equal(got, torch.stack([dataset[k][0] for k in range(len(dataset))]))


class _IndexDataset:
    """Images whose targets are their own indices, so batches reveal which samples a loader visited."""

    def __init__(self, n: int):
        self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        self.targets = torch.arange(n)

    def __len__(self) -> int:
        return len(self.targets)


def test_train_loader_shards_like_distributed_sampler():
    dataset, pre = _IndexDataset(96), Preprocess.for_size(28)
    images, targets = train_images_tensor(dataset, pre)
    seen = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            loader = TensorTrainLoader(images, targets, pre, sampler, batch_size=16, drop_last=True)
            assert len(loader) == 3
            batches = list(loader)
            assert all(x.shape == (16, 3, 28, 28) and x.dtype == torch.float32 for x, _ in batches)
            seen[epoch, rank] = torch.cat([y for _, y in batches]).tolist()
    for epoch in (0, 1):
        assert not set(seen[epoch, 0]) & set(seen[epoch, 1])  # disjoint shards
        assert sorted(seen[epoch, 0] + seen[epoch, 1]) == list(range(96))
    assert seen[0, 0] != seen[1, 0]  # reshuffled per epoch


def test_train_loader_visits_the_pil_loaders_order_and_repeats_with_the_seed():
    """Same sampler -> same images in the same order as the PIL DataLoader; same torch seed -> same batches."""
    dataset, pre = _IndexDataset(50), Preprocess.for_size(28)
    images, targets = train_images_tensor(dataset, pre)
    generator = torch.Generator()
    generator.manual_seed(3)
    pil_order = torch.cat([y for _, y in DataLoader(dataset.targets, batch_size=8, sampler=RandomSampler(dataset, generator=generator),
                                                      drop_last=True, collate_fn=lambda b: (None, torch.stack(b)))])
    runs = []
    for _ in range(2):
        generator.manual_seed(3)
        torch.manual_seed(11)
        loader = TensorTrainLoader(images, targets, pre, RandomSampler(dataset, generator=generator), batch_size=8, drop_last=True)
        runs.append(list(loader))
    assert len(runs[0]) == 6
    assert torch.equal(torch.cat([y for _, y in runs[0]]), pil_order)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0][0], runs[0][1][0])


def test_choose_pipeline(fashion_root, tmp_path):
    pre = Preprocess.for_size(28)
    train_set, val_set, _ = build_datasets(DataSpec(None, str(fashion_root)), pre)
    assert choose_pipeline("auto", train_set, val_set, pre)[0] == "tensor"
    assert choose_pipeline("pil", train_set, val_set, pre)[0] == "pil"
    mixed = make_image_folder(tmp_path / "mixed", per_class=4)  # images of several sizes
    train_set, val_set, _ = build_datasets(DataSpec(str(mixed)), pre)
    pipeline, reason = choose_pipeline("auto", train_set, val_set, pre)
    assert pipeline == "pil" and "differ in size" in reason
    with pytest.raises(InputError, match="--data_pipeline pil"):
        choose_pipeline("tensor", train_set, val_set, pre)
    uniform = tmp_path / "uniform"
    for split in ("train", "val"):
        for k, name in enumerate(("a", "b")):
            (uniform / split / name).mkdir(parents=True)
            for n in range(3):
                Image.fromarray(np.full((24, 30, 3), 40 * k + n, np.uint8)).save(uniform / split / name / f"{n}.png")
    train_set, val_set, _ = build_datasets(DataSpec(str(uniform)), pre)
    assert choose_pipeline("auto", train_set, val_set, pre)[0] == "tensor"
    train_loader, val_loader = build_tensor_loaders(train_set, val_set, pre, list(range(6)), batch_size=4, eval_batch_size=8,
                                                    device=torch.device("cpu"), drop_last=False)
    x, y = next(iter(train_loader))
    assert x.shape == (4, 3, 28, 28) and len(train_loader) == 2
    assert next(iter(val_loader))[0].shape == (6, 3, 28, 28)


def test_train_py_resume_equals_uninterrupted_with_tensor_pipeline(small_fashion_root, tmp_path, capsys):
    """2 epochs in one go == 1 epoch + --resume for the second (constant LR, so both runs share one schedule);
    64 training images in batches of 16: four steps per epoch."""
    import train

    def run(out, epochs: int, *extra: str) -> None:
        assert train.main(["--model", "custom", "--img_size", "28", "--batch_size", "16", "--wp_epoch", "0",
                           "--base_lr", "2e-3", "--min_lr", "2e-3", "--max_epoch", str(epochs), "--ema",
                           "--data_root", str(small_fashion_root), "--quiet", "--device", "cpu", "--data_pipeline", "auto",
                           "--path_to_save", str(out), *extra]) == 0

    run(tmp_path / "full", 2)
    assert "data pipeline: tensor" in capsys.readouterr().out
    run(tmp_path / "half", 1)
    run(tmp_path / "half", 2, "--resume", str(tmp_path / "half/FashionMNIST/custom/last.pth"))
    full = torch.load(tmp_path / "full/FashionMNIST/custom/last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "half/FashionMNIST/custom/last.pth", weights_only=True)
    assert full["epoch"] == resumed["epoch"] == 1
    def metrics(ckpt: dict) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in ckpt["history"]]

    assert metrics(full) == metrics(resumed) and len(full["history"]) == 2
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in full["ema"]["module"].items():
        assert torch.equal(value, resumed["ema"]["module"][key]), key
