"""explain.py on a network that had to find an object to classify: each class is a shape (square, plus, frame) at a
random place on a textured background, so a right prediction needs the object and an honest heat map peaks on it.

Two FashionCNNs are trained here in-process (1 thread, a few seconds): one on the true labels, one on shuffled labels
(the control: the heat maps of a network that learned nothing about the shapes must not pass the localisation test).
Images are PNG files of other sizes than the network's input (40 x 40; 96 x 64 for the geometry), so every peak goes
through the real eval transform (resize 37, centre crop 32) and back.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image

from models import build_model, model_kwargs
from utils.checkpoint import save_checkpoint
from utils.data.preprocess import Preprocess, center_crop, normalize, resize_shorter
from utils.explain.geometry import CropMap, hottest_region

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread

SHAPES = ("square", "plus", "frame")
SIZE = 32  # the network's input
PRE = Preprocess.for_size(SIZE)  # resize 37, crop 32: every test image is resized and cropped
EVAL_SIDE = 40  # the localisation images: 40 x 40 -> 37 x 37 -> crop 32 (2 px cut on each side)
N_EVAL = 48
LOCALISED = 0.7  # share of right predictions whose peak is on the object that counts as localising


def scene(width: int, height: int, shape: int, x: int, y: int, side: int, rng: np.random.Generator,
          distractor: bool = True) -> np.ndarray:
    """(height, width, 3) uint8: a smooth random texture (20-150) with a bright shape (190-255) of side `side` whose
    top-left corner is (x, y)."""
    coarse = rng.uniform(20, 150, size=(height // 4 + 2, width // 4 + 2, 3))
    texture = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR), dtype=np.float64)
    img = np.clip(texture + rng.normal(0, 12, texture.shape), 0, 255)
    mask = np.zeros((side, side), bool)
    t = max(2, side // 4)
    if SHAPES[shape] == "square":
        mask[:] = True
    elif SHAPES[shape] == "plus":
        mask[(side - t) // 2:(side + t) // 2, :] = True
        mask[:, (side - t) // 2:(side + t) // 2] = True
    else:  # frame
        mask[:t, :] = mask[-t:, :] = mask[:, :t] = mask[:, -t:] = True
    img[y:y + side, x:x + side][mask] = rng.uniform(190, 255, size=3)
    if distractor:  # a bright shape of no class elsewhere (a disc or an X): as salient, no evidence for any class
        idx = np.arange(side)
        yy, xx = np.meshgrid(idx, idx, indexing="ij")
        c = (side - 1) / 2
        other = ((yy - c) ** 2 + (xx - c) ** 2 <= (side / 2) ** 2) if rng.random() < 0.5 else \
            (np.abs(yy - xx) < t / 2 + 0.5) | (np.abs(yy + xx - side + 1) < t / 2 + 0.5)
        for _ in range(100):
            dx, dy = (int(v) for v in rng.integers(0, [width - side + 1, height - side + 1]))
            if abs(dx - x) >= side or abs(dy - y) >= side:
                img[dy:dy + side, dx:dx + side][other] = rng.uniform(190, 255, size=3)
                break
    return img.astype(np.uint8)


def training_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPES)
    xs = []
    for k in labels:
        side = int(rng.integers(9, 12))
        x, y = (int(v) for v in rng.integers(0, SIZE - side, size=2))
        xs.append(normalize(Image.fromarray(scene(SIZE, SIZE, int(k), x, y, side, rng)), PRE))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(labels)


def train_checkpoint(path: Path, shuffle_labels: bool) -> Path:
    torch.manual_seed(0)
    x, y = training_set(540, seed=1)
    if shuffle_labels:
        y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    kwargs = model_kwargs(SIZE)
    model = build_model("custom", len(SHAPES), **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        for idx in torch.randperm(len(y)).split(36):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint({"model_name": "custom", "num_classes": len(SHAPES), "classes": list(SHAPES),
                     "preprocess": PRE.to_dict(), "model_kwargs": kwargs, "model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory) -> Path:
    return train_checkpoint(tmp_path_factory.mktemp("shapes") / "best.pth", shuffle_labels=False)


@pytest.fixture(scope="module")
def eval_images(tmp_path_factory) -> tuple[list[Path], dict[str, tuple[int, int, int, int, int]]]:
    return make_eval_images(tmp_path_factory.mktemp("shapes_eval"))


def make_eval_images(folder: Path) -> tuple[list[Path], dict[str, tuple[int, int, int, int, int]]]:
    """N_EVAL PNGs of EVAL_SIDE px, objects inside the part the crop keeps; name -> (class, x0, y0, x1, y1)."""
    rng = np.random.default_rng(7)
    truth = {}
    for i in range(N_EVAL):
        k, side = i % len(SHAPES), int(rng.integers(10, 13))
        x, y = (int(v) for v in rng.integers(3, EVAL_SIDE - 3 - side, size=2))
        path = folder / f"img{i:03d}.png"
        Image.fromarray(scene(EVAL_SIDE, EVAL_SIDE, k, x, y, side, rng)).save(path)
        truth[path.name] = (k, x, y, x + side - 1, y + side - 1)
    return sorted(folder.glob("*.png")), truth


def explain_rows(ckpt: Path, images: list[Path], tmp_path: Path, *flags: str) -> list[dict]:
    out = tmp_path / f"rows{len(list(tmp_path.glob('rows*')))}.csv"
    r = run_main("explain.py", "--weights", str(ckpt), "--image", *map(str, images), "--output", str(out),
                 "--out_dir", str(tmp_path / "overlays"), "--quiet", *flags)
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def inside(row: dict, box: tuple[int, int, int, int], margin: int = 2) -> bool:
    x0, y0, x1, y1 = box
    return x0 - margin <= int(row["peak_x"]) <= x1 + margin and y0 - margin <= int(row["peak_y"]) <= y1 + margin


def localisation(rows: list[dict], truth: dict) -> tuple[float, int]:
    """(share of the correctly classified images whose peak is in the object's box (2 px margin), how many)."""
    right = [r for r in rows if r["top1_class"] == SHAPES[truth[Path(r["path"]).name][0]] and r["peak_x"]]
    hits = sum(inside(r, truth[Path(r["path"]).name][1:]) for r in right)
    return hits / max(1, len(right)), len(right)


def test_heat_map_peaks_fall_on_the_object_and_a_shuffled_label_network_fails(
        shapes_ckpt, eval_images, tmp_path):
    images, truth = eval_images
    gradcam = explain_rows(shapes_ckpt, images, tmp_path)
    rate, right = localisation(gradcam, truth)
    occlusion = explain_rows(shapes_ckpt, images, tmp_path, "--method", "occlusion")
    occ_rate, _ = localisation(occlusion, truth)
    ig_rate, _ = localisation(explain_rows(shapes_ckpt, images, tmp_path, "--method", "integrated_gradients"), truth)

    def agree(a, b):  # peaks within 6 px (about half an object)
        return np.hypot(int(a["peak_x"]) - int(b["peak_x"]), int(a["peak_y"]) - int(b["peak_y"])) <= 6
    same = np.mean([agree(a, b) for a, b in zip(gradcam, occlusion)])
    chance = np.mean([agree(a, b) for a, b in zip(gradcam, occlusion[1:] + occlusion[:1])])  # pairs of different images
    control = train_checkpoint(tmp_path / "shuffled.pth", shuffle_labels=True)
    shuffled_rate, shuffled_right = localisation(explain_rows(control, images, tmp_path), truth)
    print(f"Grad-CAM {rate:.2f} of {right}, occlusion {occ_rate:.2f}, integrated gradients {ig_rate:.2f}, agreement "
          f"{same:.2f} (chance {chance:.2f}), shuffled labels: Grad-CAM {shuffled_rate:.2f} of {shuffled_right}")
    # measured 2026-12-06 (1 thread): Grad-CAM 0.85 of 41 right, occlusion 0.90, integrated gradients 0.95, agreement
    # 0.73 vs 0.15 by chance; shuffled labels 0.50 of 18 (the distractor is as bright as the object: only the class says which to look at)
    assert right >= 0.75 * N_EVAL and rate >= LOCALISED, (rate, right)
    assert occ_rate >= LOCALISED and ig_rate >= LOCALISED, (occ_rate, ig_rate)
    assert same >= chance + 0.4, (same, chance)
    assert shuffled_rate < LOCALISED, shuffled_rate
    assert all(r["method"] == "gradcam" and r["target_class"] == r["top1_class"] for r in gradcam)
    assert all(int(r["box_x0"]) <= int(r["peak_x"]) <= int(r["box_x1"]) for r in gradcam + occlusion)
    assert len(list((tmp_path / "overlays").glob("*_gradcam.png"))) == N_EVAL


def test_the_same_object_moved_on_a_non_square_image_moves_the_peak(shapes_ckpt, tmp_path):
    # 96 x 64: resized to 55 x 37, cropped at x 12..43: the network sees original x 21-76, y 3-59
    side = 18  # about 10 px after the resize, like the training objects
    positions = [(24, 8), (50, 36)]
    paths = []
    for i, (x, y) in enumerate(positions):  # the same background (same seed), no distractor
        path = tmp_path / f"moved{i}.png"
        Image.fromarray(scene(96, 64, 1, x, y, side, np.random.default_rng(3), distractor=False)).save(path)
        paths.append(path)
    rows = explain_rows(shapes_ckpt, paths, tmp_path)
    for row, (x, y) in zip(rows, positions):
        assert row["top1_class"] == "plus"
        assert inside(row, (x, y, x + side - 1, y + side - 1), margin=3), row
    with Image.open(tmp_path / "overlays" / "moved0_gradcam.png") as overlay:  # the original's aspect, 4x (>= 224 px)
        assert overlay.width == 96 * 4 and 64 * 4 < overlay.height <= 64 * 4 + 80
    dx = int(rows[1]["peak_x"]) - int(rows[0]["peak_x"])
    dy = int(rows[1]["peak_y"]) - int(rows[0]["peak_y"])
    assert abs(dx - 26) <= 6 and abs(dy - 28) <= 6, (dx, dy)


@pytest.mark.parametrize("width,height", [(40, 40), (96, 64), (64, 96), (20, 30), (37, 200)])
def test_crop_coordinates_map_back_to_the_original_pixels_exactly(width, height):
    """A bright block drawn in the original image, found in the real transform's crop, mapped back by CropMap."""
    crop = CropMap.of(width, height, PRE)
    for bx, by in ((width // 2 - 2, height // 2 - 2), (width // 2 + 3, height // 2 - 4)):
        img = np.zeros((height, width), np.uint8)
        img[by:by + 5, bx:bx + 5] = 255
        seen = np.asarray(center_crop(resize_shorter(Image.fromarray(img), PRE.resize), PRE.img_size), np.float64)
        ys, xs = np.indices(seen.shape)
        cx, cy = (xs * seen).sum() / seen.sum() + 0.5, (ys * seen).sum() / seen.sum() + 0.5  # centroid, pixel centres at .5
        ox, oy = crop.to_original(cx, cy)
        assert abs(ox - (bx + 2.5)) < 0.35 and abs(oy - (by + 2.5)) < 0.35, (ox, oy, bx, by)
        heat = np.zeros((SIZE, SIZE))
        heat[int(cy), int(cx)] = 1.0
        back = crop.heat_on_original(heat)
        py, px = np.unravel_index(np.nanargmax(back), back.shape)
        assert abs(px - (bx + 2)) <= 1 and abs(py - (by + 2)) <= 1


def test_hottest_region_is_the_connected_part_around_the_peak():
    heat = np.zeros((10, 10))
    heat[2:5, 3:6] = 1.0
    heat[3, 4] = 2.0
    heat[8, 8] = 1.5  # hot but not connected to the peak
    assert hottest_region(heat, 0.1) == (3, 2, 5, 4)
    assert hottest_region(np.ones((4, 4)), 0.2) is None


def test_bad_inputs_are_one_line_and_exit_2(shapes_ckpt, eval_images, tmp_path):
    good = eval_images[0][0]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "rows.jsonl"
    r = run_main("explain.py", "--weights", str(shapes_ckpt), "--image", str(good), str(tmp_path / "broken.png"),
                 str(tmp_path / "missing.png"), "--output", str(out), "--out_dir", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "broken.png" in errors[0] and "image not found" in errors[1], r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [bool(row["error"]) for row in rows] == [False, True, True] and rows[0]["peak_x"] is not None
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [good.stem + "_gradcam.png"]
    w = ("--weights", str(shapes_ckpt), "--image", str(good), "--out_dir", str(tmp_path / "o"))
    for flags, message in [
        (("--target_class", "circle"), "--target_class 'circle' is not a class of this model; choose from: square, plus, frame"),
        (("--layer", "features.99"), "--layer features.99: no such layer with a spatial map; choose from: features.0 (32x32)"),
        (("--method", "occlusion", "--layer", "features.6"), "--layer and --receptive_field belong to --method gradcam"),
        (("--output", str(out)), f"--output {out} already exists"),
        (("--output", str(tmp_path / "rows.txt")), "unknown format .txt; use a .csv or .jsonl file name"),
    ]:
        r = run_main("explain.py", *w, *flags)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and message in r.stderr, (flags, r.stderr)
    r = run_main("explain.py", "--weights", str(tmp_path / "none.pth"), "--image", str(good))
    assert r.returncode == 2 and r.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'none.pth'}", r.stderr


def test_target_class_layer_and_receptive_field(shapes_ckpt, eval_images, tmp_path):
    images = eval_images[0][:2]
    rows = explain_rows(shapes_ckpt, images, tmp_path, "--target_class", "frame", "--layer", "features.6",
                        "--receptive_field", "--method", "gradcam")
    assert [r["target_class"] for r in rows] == ["frame", "frame"]
    overlay = Image.open(tmp_path / "overlays" / f"{images[0].stem}_gradcam.png")
    assert overlay.width == EVAL_SIDE * 6  # 40 px drawn 6x larger (>= 224 px), the band above
    pixels = np.asarray(overlay.convert("RGB")).reshape(-1, 3)
    assert ((pixels == (0, 255, 255)).all(1)).sum() > 100  # the cyan receptive field is drawn
