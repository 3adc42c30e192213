"""predict.py / predict_ckpoint.py: image modes, metadata round trip, bad inputs, and a torch-free ONNX path."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from conftest import run_main, run_script, synthetic_fashion_images
from PIL import Image
from torchvision import transforms

from utils.data.fashion_mnist import FASHION_MNIST_CLASSES
from utils.data.preprocess import load_image
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread


@pytest.fixture(scope="module")
def deployed(exported):
    """The trained FashionCNN, its info, and the folder of its ONNX + TorchScript exports (the session's)."""
    return exported.model, exported.info, exported.folder


def save_exif_rotated(upright: np.ndarray, path) -> None:
    """Store the image turned 90 degrees counter-clockwise with EXIF orientation 6 ("rotate 90 CW to view")."""
    img = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif)


@pytest.fixture(scope="module")
def mode_images(tmp_path_factory, fashion_root):
    """One image per input kind, and the pixels a user would expect the model to see (RGB uint8)."""
    folder = tmp_path_factory.mktemp("modes")
    gray, _ = synthetic_fashion_images(8, seed=11)
    expected = {}

    def rgb(a):
        return np.repeat(a[:, :, None], 3, axis=2)

    Image.fromarray(rgb(gray[0])).save(folder / "rgb.png")
    expected["rgb.png"] = rgb(gray[0])
    Image.fromarray(rgb(gray[1])).save(folder / "photo.jpg", quality=95)
    Image.fromarray(gray[2], "L").save(folder / "gray.png")
    expected["gray.png"] = rgb(gray[2])
    alpha = np.full((28, 28), 255, np.uint8)
    alpha[:, :3] = 0  # a transparent strip: composited onto white
    Image.fromarray(np.dstack([rgb(gray[3]), alpha]), "RGBA").save(folder / "rgba.png")
    rgba_expected = rgb(gray[3]).copy()
    rgba_expected[:, :3] = 255
    expected["rgba.png"] = rgba_expected
    Image.fromarray(rgb(gray[4])).convert("P", palette=Image.ADAPTIVE, colors=64).save(folder / "palette.png")
    Image.fromarray(rgb(gray[5])).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(gray[6].astype(np.uint16) * 257).save(folder / "deep16.png")  # 16-bit grayscale PNG
    assert Image.open(folder / "deep16.png").mode.startswith("I")
    expected["deep16.png"] = rgb(gray[6])
    save_exif_rotated(rgb(gray[7]), folder / "exif_rotated.png")
    expected["exif_rotated.png"] = rgb(gray[7])
    # Lossy or palette formats: what the user expects is Pillow's own decoding of the file.
    for name in ("photo.jpg", "palette.png", "cmyk.jpg"):
        expected[name] = np.asarray(Image.open(folder / name).convert("RGB"))
    # Real test images written by `python save_test_images.py` (the demo's way to get inputs).
    import save_test_images

    assert save_test_images.main(["--out", str(folder / "saved"), "--count", "3", "--data_root", str(fashion_root)]) == 0
    for path in sorted((folder / "saved").iterdir()):
        expected[f"saved/{path.name}"] = np.asarray(Image.open(path).convert("RGB"))
    return folder, expected


def reference_top1(model, pre, pixels: np.ndarray) -> int:
    """PyTorch on the expected pixels through torchvision's own transforms (an independent pipeline)."""
    tf = transforms.Compose([transforms.Resize(pre.resize), transforms.CenterCrop(pre.img_size), transforms.ToTensor(),
                             transforms.Normalize(pre.mean, pre.std)])
    with torch.inference_mode():
        return int(model(tf(Image.fromarray(pixels))[None]).argmax(1))


def top1_by_image(doc: dict, folder) -> dict[str, str]:
    return {str(p["image"]).replace(str(folder) + "/", ""): p["top"][0]["class"] for p in doc["predictions"]}


def test_loader_applies_exif_and_modes(mode_images):
    folder, expected = mode_images
    for name in ("rgb.png", "gray.png", "rgba.png", "deep16.png", "exif_rotated.png"):
        assert np.array_equal(np.asarray(load_image(folder / name)), expected[name]), name


def test_onnx_predict_is_torch_free_and_matches_pytorch(deployed, mode_images):
    model, info, out = deployed
    folder, expected = mode_images
    proc = run_script("-X", "importtime", "predict.py", "--model", str(out / "custom.onnx"), "--image", str(folder),
                      "--json", "--topk", "3")
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and "PIL" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "the ONNX path imported torch"
    doc = json.loads(proc.stdout)
    assert doc["summary"]["num_images"] == len(expected) and doc["summary"]["num_failed"] == 0
    assert doc["summary"]["median_inference_ms"] > 0 and doc["summary"]["load_ms"] > 0
    got = top1_by_image(doc, folder)
    for name, pixels in expected.items():
        assert got[name] == info.classes[reference_top1(model, info.preprocess, pixels)], name
    for p in doc["predictions"]:  # class names came from the artifact (no --classes given)
        probs = [t["prob"] for t in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"] in FASHION_MNIST_CLASSES for t in p["top"])


def test_every_model_file_predicts_the_same(deployed, mode_images, trained_ckpt, capsys):
    """predict.py on the .onnx, .pt2, TorchScript .pt and the .pth checkpoint, and predict_ckpoint.py (its alias for
    checkpoints): the same top-1 for every image, the same output shape, the engine named from the file."""
    import predict
    import predict_ckpoint

    model, info, out = deployed
    folder, expected = mode_images
    answers, engines = [], []
    for script, args in ((predict, ["--model", str(out / "custom.onnx")]), (predict, ["--model", str(out / "custom.pt2")]),
                         (predict, ["--model", str(out / "custom.pt")]), (predict, ["--model", str(trained_ckpt)]),
                         (predict_ckpoint, ["--weights", str(trained_ckpt)])):
        assert script.main([*args, "--image", str(folder), "--json", "--device", "cpu", "--topk", "3"]) == 0
        doc = json.loads(capsys.readouterr().out)
        answers.append(top1_by_image(doc, folder))
        engines.append(doc["summary"]["engine"])
        assert set(doc["summary"]) == {"model", "engine", "precision", "device", "load_ms", "warmup", "num_images",
                                       "num_failed", "median_inference_ms", "batch_size"}
    assert all(a == answers[0] for a in answers) and len(answers[0]) == len(expected)
    assert engines == ["onnxruntime", "torch.export", "torchscript", "pytorch", "pytorch"]
    # Text output: the "Top 5 predictions" list and the timing lines.
    assert predict.main(["--model", str(out / "custom.onnx"), "--image", str(folder / "rgb.png")]) == 0
    text = capsys.readouterr().out
    assert "Top 5 predictions:" in text and len(re.findall(r"^\s+\d\. .+%$", text, re.M)) == 5
    assert "median inference" in text and "loaded in" in text


def test_bad_images_reported_one_line_each_and_rest_predicted(deployed, mode_images, tmp_path):
    _, _, out = deployed
    folder, _ = mode_images
    (tmp_path / "notes.png").write_text("this is not an image")
    data = (folder / "rgb.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    proc = run_main("predict.py", "--model", str(out / "custom.onnx"), "--image", str(folder / "gray.png"),
                    str(tmp_path / "missing.png"), str(tmp_path / "notes.png"), str(tmp_path / "truncated.png"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "Traceback" not in proc.stderr
    for name in ("missing.png", "notes.png", "truncated.png"):
        assert sum(name in line for line in errors) == 1, (name, errors)
    assert proc.stdout.count("Top 5 predictions:") == 1 and "gray.png" in proc.stdout


def test_bad_model_paths_are_input_errors(deployed, trained_ckpt, mode_images, tmp_path):
    import predict

    folder, _ = mode_images
    with pytest.raises(InputError, match="not found"):
        predict.main(["--model", str(tmp_path / "nope.onnx"), "--image", str(folder)])
    with pytest.raises(InputError, match="no images found"):
        predict.main(["--model", str(deployed[2] / "custom.onnx"), "--image", str(tmp_path / "*.png")])


def test_artifact_without_names_needs_classes(deployed, mode_images, tmp_path, capsys):
    import predict

    _, info, out = deployed
    folder, _ = mode_images
    proto = onnx.load(str(out / "custom.onnx"))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "classes"]
    del proto.metadata_props[:]
    for key, value in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp_path / "anonymous.onnx"))
    image = str(folder / "rgb.png")
    assert predict.main(["--model", str(tmp_path / "anonymous.onnx"), "--image", image, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["predictions"][0]["top"][0]["class"].startswith("class_")
    assert "--classes" in captured.err
    (tmp_path / "classes.txt").write_text("\n".join(info.classes) + "\n")
    assert predict.main(["--model", str(tmp_path / "anonymous.onnx"), "--image", image, "--json",
                         "--classes", str(tmp_path / "classes.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["top"][0]["class"] in info.classes
    with pytest.raises(InputError, match="10 outputs"):
        predict.main(["--model", str(tmp_path / "anonymous.onnx"), "--image", image, "--classes", "a,b,c"])
