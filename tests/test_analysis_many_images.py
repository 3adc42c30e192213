"""fcn_resnet18.py and receptive_field_backprop.py on several images: the network is loaded once, each good image
gets its own result folder, and each bad one (truncated, not an image, a decompression bomb, missing) is one error
line and is skipped, with exit code 2 at the end. A single bad image stays the plain one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_fcn import assert_png
from test_predict_folder import decompression_bomb_png

import fcn_resnet18
import receptive_field_backprop
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, random_resnet18_ckpt):
    """Good and bad images (read-only for the tests), what each bad one's error must say, and a resnet18 checkpoint."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)).save(folder / "first.png")
    Image.fromarray(rng.integers(0, 255, (100, 130, 3), dtype=np.uint8)).save(folder / "second.jpg", quality=90)
    data = (folder / "second.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 3])
    (folder / "readme.png").write_text("not an image")
    decompression_bomb_png(folder / "bomb.png")
    bad = {"cut.jpg": "truncated", "readme.png": "not an image", "bomb.png": "decompression bomb",
           "gone.png": "not found"}
    return folder, bad, random_resnet18_ckpt


@pytest.mark.parametrize("script,files", [(fcn_resnet18, ("overlay.png", "score_map.png", "result.json")),
                                          (receptive_field_backprop, ("receptive_field.png", "effective_grad.npy",
                                                                      "result.json"))])
def test_several_images_bad_ones_reported_and_skipped(script, files, mixed_folder, tmp_path, capsys):
    folder, bad, ckpt = mixed_folder
    out = tmp_path / "out"
    argv = ["--image", str(folder), str(folder / "gone.png"), "--weights", str(ckpt), "--out_dir", str(out),
            "--device", "cpu", "--max_side", "160"]
    assert script.main([*argv, "--json"]) == 2
    captured = capsys.readouterr()
    results = [json.loads(line) for line in captured.out.splitlines()]
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in results) == ["first.png", "second.jpg"]
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad), errors
    for name, reason in bad.items():
        assert reason in next(e for e in errors if name in e), (name, errors)
    assert f"{len(bad)} of {len(bad) + 2} image(s) could not be analysed" in captured.err
    for stem in ("first", "second"):
        for name in files:
            assert (out / stem / name).is_file(), (stem, name)
        assert_png(out / stem / files[0])
    assert not (out / "cut").exists() and not (out / "bomb").exists()
    # one bad image alone: the usual one-line error (cli.run prints it, exit 2)
    with pytest.raises(InputError, match="decompression bomb"):
        script.main(["--image", str(folder / "bomb.png"), "--weights", str(ckpt), "--out_dir", str(out), "--device", "cpu"])
