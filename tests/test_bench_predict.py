"""benchmarks/bench_predict.py end to end with the tiniest settings: the folder it makes, the table, the command and
the JSON. Speeds are never asserted, only that they were measured and are consistent with each other."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks import bench_predict


def test_bench_predict_tiny(tmp_path, capsys):
    out, folder = tmp_path / "predict.json", tmp_path / "photos"
    argv = ["--configs", "custom:28", "--num_images", "10", "--width", "50", "--height", "40", "--batch_size", "4",
            "--num_workers", "2", "--raw_images", "6", "--repeats", "2", "--folder", str(folder), "--out", str(out)]
    assert bench_predict.main(argv) == 0
    text = capsys.readouterr().out
    assert "| model | img px | images | batch | decode threads | predict loop img/s | raw ORT img/s |" in text
    assert "python benchmarks/bench_predict.py --configs custom:28" in text and "grace_hopper.jpg" in text
    jpegs = sorted(folder.rglob("*.jpg"))
    assert len(jpegs) == 10
    with Image.open(jpegs[0]) as img:
        assert img.format == "JPEG" and img.size == (50, 40)
    payload = json.loads(out.read_text())
    assert payload["machine"]["cores"] >= 1 and "lscpu_model" in payload["machine"]
    (row,) = payload["rows"]
    assert (row["model"], row["img_size"], row["images"], row["batch_size"], row["workers"]) == ("custom", 28, 10, 4, 2)
    assert len(row["loop_repeats_img_s"]) == len(row["raw_repeats_img_s"]) == len(row["loop_spinning_repeats_img_s"]) == 2
    assert row["ratio_spinning"] == pytest.approx(row["loop_spinning_img_s"] / row["raw_img_s"], abs=1e-3)
    assert all(v > 0 for v in [*row["loop_repeats_img_s"], *row["raw_repeats_img_s"], row["decode_img_s"]])
    assert row["ratio"] == pytest.approx(row["loop_img_s"] / row["raw_img_s"], abs=1e-3)
    # a second run reuses the folder it made (same spec): the files are not rewritten
    stamp = jpegs[0].stat().st_mtime_ns
    assert bench_predict.main([*argv, "--repeats", "1"]) == 0
    assert jpegs[0].stat().st_mtime_ns == stamp


def test_bench_predict_bad_config_is_an_error():
    with pytest.raises(SystemExit) as exc:
        bench_predict.parse_args(["--configs", "custom"])
    assert exc.value.code == 2
