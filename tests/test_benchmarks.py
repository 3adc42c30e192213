"""Both benchmarks run end to end with the tiniest settings: table, command and JSON have the promised structure.

Speeds are never asserted (they depend on the machine); only that they were measured and are consistent.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks import bench_infer, bench_train
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread


def test_bench_train_tiny(fashion_root, tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["--models", "custom", "--img_sizes", "28", "--precisions", "bf16", "--memory_formats", "channels_last",
            "--pipelines", "tensor", "pil", "--batch_size", "6", "--baseline_batch_size", "4",
            "--steps", "1", "--warmup", "1", "--repeats", "2",
            "--num_workers", "0", "--data_root", str(fashion_root), "--device", "cpu", "--out", str(out)]
    assert bench_train.main(argv) == 0
    text = capsys.readouterr().out
    assert "| model | img px | precision | memory | pipeline |" in text
    assert "python benchmarks/bench_train.py --models custom" in text
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    # the seed baseline (PIL workers, 224 px, fp32, NCHW) comes first, then the 2-row grid
    assert [(r["img_size"], r["precision"], r["memory_format"], r["pipeline"], r["baseline"]) for r in rows] == [
        (224, "fp32", "nchw", "pil", True), (28, "bf16", "channels_last", "tensor", False),
        (28, "bf16", "channels_last", "pil", False)]
    assert rows[0]["vs_seed"] == 1.0
    assert [r["batch_size"] for r in rows] == [4, 6, 6]
    for r in rows:
        assert len(r["repeats_images_per_s"]) == 2 and all(v > 0 for v in r["repeats_images_per_s"])
        assert r["images_per_s"] == pytest.approx(sorted(r["repeats_images_per_s"])[0] / 2 + sorted(r["repeats_images_per_s"])[1] / 2)
        assert r["vs_seed"] == pytest.approx(r["images_per_s"] / rows[0]["images_per_s"])
    assert payload["machine"]["cores"] >= 1 and payload["command"].startswith(("python", "OMP"))


def test_bench_train_bad_flag_is_an_input_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:  # refused by the flag's range type, before anything runs
        bench_train.main(["--warmup", "-1", "--data_root", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert exited.value.code == 2 and "argument --warmup: must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(InputError, match="one per --img_sizes"):
        bench_train.main(["--img_sizes", "28", "32", "64", "--batch_size", "8", "16", "--data_root", str(tmp_path)])
    assert not (tmp_path / "x.json").exists()


def test_bench_infer_tiny(tmp_path, capsys):
    out = tmp_path / "infer.json"
    argv = ["--models", "custom", "--img_sizes", "28", "--batch_size", "4", "--warmup", "1", "--repeats", "2",
            "--peak_size", "128", "--calibration_batches", "1", "--workdir", str(tmp_path / "artifacts"), "--out", str(out)]
    assert bench_infer.main(argv) == 0
    text = capsys.readouterr().out
    assert "| model | img px | engine | compute | MMACs/img |" in text and "python benchmarks/bench_infer.py --models custom" in text
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert [r["engine"] for r in rows] == list(bench_infer.ENGINES)
    # FashionCNN at 28 px: convs 3*16*9*28^2 + 16*32*9*14^2 + 32*64*9*7^2 and linears 576*256 + 256*10 MACs
    expected_macs = 3 * 16 * 9 * 28 ** 2 + 16 * 32 * 9 * 14 ** 2 + 32 * 64 * 9 * 7 ** 2 + 576 * 256 + 256 * 10
    assert all(r["macs_per_image"] == expected_macs and r["flops_per_image"] == 2 * expected_macs for r in rows)
    for r in rows:
        assert r["latency_ms"] > 0 and r["throughput_img_s"] > 0 and r["speed_batch_size"] == 4
        assert r["achieved_gflops"] == pytest.approx(r["throughput_img_s"] * 2 * expected_macs / 1e9)
        assert r["percent_of_peak"] == pytest.approx(100 * r["achieved_gflops"] / payload["peaks_gflops"][r["compute"]])
    assert {r["compute"] for r in rows} == {"fp32", "bf16", "int8"}
    int8 = (tmp_path / "artifacts" / "custom_28_int8.onnx")
    fp32 = (tmp_path / "artifacts" / "custom_28.onnx")
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size  # int8 weights: about a quarter of the fp32 file


def test_bench_verify_tiny(tmp_path, capsys):
    from benchmarks import bench_verify

    assert bench_verify.main(["--images", "6", "--threads", "2", "--out", str(tmp_path / "v.json")]) == 0
    text = capsys.readouterr().out
    assert "| method | images | threads | s | images/s | x verify+EOI |" in text
    rows = json.loads((tmp_path / "v.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["verify+EOI", "draft decode", "full decode"] and all(r["images"] == 6 for r in rows)


def test_bench_photos_tiny(tmp_path, capsys):
    """The photo benchmark end to end on 20 JPEGs: the folder it makes, the rows, the reuse of the folder."""
    from benchmarks import bench_photos, photo_folder

    out, workdir = tmp_path / "photos.json", tmp_path / "work"
    argv = ["--images", "20", "--epochs", "2", "--models", "custom", "resnet18", "--img_sizes", "32", "--batch_size", "4",
            "--timed_batches", "1", "--num_workers", "0", "--precision", "fp32", "--workdir", str(workdir),
            "--out", str(out), "--quiet", "--device", "cpu"]
    assert bench_photos.main(argv) == 0
    text = capsys.readouterr().out
    assert "| model | px | pipeline | train img/s | x PIL |" in text and "python benchmarks/bench_photos.py --images 20" in text
    photos = sorted((workdir / "folder").rglob("*.jpg"))
    assert len(photos) == 20 and {p.parent.name for p in photos} == set(photo_folder.CLASSES)
    assert len(list((workdir / "folder" / "val").rglob("*.jpg"))) == 10  # one per class held out
    with Image.open(photos[0]) as img:
        assert img.format == "JPEG" and img.size == (500, 375)
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    pipelines = ["network only", "PIL (workers)", "cache cold", "cache warm"]
    assert [(r["model"], r["px"], r["pipeline"]) for r in rows] == [
        ("(data only)", 32, "PIL (workers)"), ("(data only)", 32, "cache warm"),
        *[(model, 32, pipeline) for model in ("custom", "resnet18") for pipeline in pipelines]]
    runs = payload["runs"]["32"]  # JSON keys are strings
    for model in ("custom", "resnet18"):
        ceiling, pil, cold, warm = [r for r in rows if r["model"] == model]
        assert cold["build_s"] > 0 and cold["epoch_s"] > cold["build_s"]
        for r in (ceiling, cold, warm):
            assert r["vs_pil"] == pytest.approx(r["images_per_s"] / pil["images_per_s"])
        for r in (cold, warm):
            assert r["images_per_s"] == pytest.approx(runs[model]["pil"]["images"] / r["epoch_s"])
        network = runs[model]["network_only"]
        assert ceiling["images_per_s"] == pytest.approx(network["timed_images"] / network["timed_s"])
    # the ceiling of FashionCNN (an accuracy model) runs as many batches as an epoch, minus the untimed first
    assert runs["custom"]["network_only"]["timed_images"] == runs["custom"]["pil"]["images"] - 4
    assert runs["resnet18"]["network_only"]["timed_images"] == 4  # --timed_batches 1 of 4 images
    custom = runs["custom"]
    assert [len(custom[p]["epoch_s"]) for p in ("pil", "cache")] == [2, 2]
    assert all(0 <= custom[p]["val_acc1"] <= 1 and custom[p]["val_images"] == 10 for p in ("pil", "cache"))
    assert "val_acc1" not in runs["resnet18"]["pil"]  # timed batches only, no accuracy
    assert payload["machine"]["cpu"] and "bf16_native" in payload["machine"]
    # a second call with the same parameters reuses the folder
    before = {p: p.stat().st_mtime_ns for p in photos}
    photo_folder.make_photo_folder(workdir / "folder", 20, 0.15, 0, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in photos} == before


def test_bench_photos_bad_flags_are_input_errors(tmp_path, capsys):
    from benchmarks import bench_photos

    with pytest.raises(SystemExit) as exited:
        bench_photos.main(["--val_fraction", "1.5", "--workdir", str(tmp_path)])
    assert exited.value.code == 2 and "argument --val_fraction: must be in (0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(InputError, match="--images must be at least 20"):
        bench_photos.main(["--images", "12", "--workdir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_bench_techniques_tiny(small_fashion_root, tmp_path, capsys):
    """Each row is a real train.py process of the recipe with one change; the table's figures are its results.csv's."""
    import csv

    from benchmarks import bench_techniques

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: custom\nimg_size: 28\nin_channels: 1\nbatch_size: 16\nema: true\ntta: flip\n"
                      "precision: fp32\nmemory_format: nchw\n", encoding="utf-8")
    out = tmp_path / "techniques.json"
    argv = ["--recipe", str(recipe), "--only", "recipe", "no_ema", "--epochs", "2", "--target", "0.0",
            "--data_root", str(small_fashion_root), "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    assert bench_techniques.main(argv) == 0
    text = capsys.readouterr().out
    assert "| technique | epochs to 0 % |" in text and "python benchmarks/bench_techniques.py --recipe" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["id"] for r in rows] == ["recipe", "no_ema"]
    for row in rows:
        run = bench_techniques.ROOT / row["run_dir"]
        with open(run / "results.csv", newline="") as f:
            csv_rows = list(csv.DictReader(f))
        args = json.loads((run / "args.json").read_text())
        assert args["ema"] is (row["id"] == "recipe") and args["max_epoch"] == 2 and args["time_budget"] == 0
        assert row["epochs"] == 2 and row["epochs_to_target"] == 1  # any accuracy reaches 0 % after epoch 1
        assert row["minutes_to_target"] == round(float(csv_rows[0]["seconds"]) / 60, 2)
        assert row["val_acc1"] == float(csv_rows[-1]["val_acc1"]) and 0 <= row["val_acc1"] <= 1
        assert row["val_acc1_tta"] == float(csv_rows[-1]["val_acc1_tta"])
        assert row["images_per_s"] == round(64 * 2 / sum(float(r["seconds"]) for r in csv_rows))
        assert row["precision_chosen"] == "fp32 nchw"  # the recipe's flags, as the run recorded them


def test_bench_vs_ultralytics_runs_our_rows_as_a_user_starts_them(tmp_path, capsys):
    """Without --yolo_python the Ultralytics row is left out; the two train.py rows are real processes on the generated
    folder, stopped after --epochs epochs, and the table's epoch seconds are their results.csv's (epoch 1 untimed)."""
    import csv

    from benchmarks import bench_vs_ultralytics

    out = tmp_path / "vs.json"
    argv = ["--images", "20", "--epochs", "2", "--img_size", "32", "--batch_size", "4", "--workdir", str(tmp_path / "w"),
            "--out", str(out)]
    assert bench_vs_ultralytics.main(argv) == 0
    assert "python benchmarks/bench_vs_ultralytics.py --images 20" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["flags"] for r in rows] == ["--precision fp32 --memory_format nchw", "(none)"]
    for row in rows:
        with open(tmp_path / "w" / "runs" / "folder" / row["run_dir"].rsplit("/", 1)[1] / "results.csv", newline="") as f:
            seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
        assert row["epoch_s"] == seconds[:2] and row["epoch_s_mean"] == pytest.approx(seconds[1])
    assert rows[0]["setup"].startswith("fp32 nchw (flags)")
    assert max(r["x_slowest"] for r in rows) == pytest.approx(max(r["epoch_s_mean"] for r in rows) / min(r["epoch_s_mean"] for r in rows))
