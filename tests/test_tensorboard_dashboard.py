"""The TensorBoard dashboard end to end, read back through the real `tensorboard` server's HTTP data API.

One log directory gets: a training run that is extended by --resume and then resumed again from an older
checkpoint with a changed flag (so the third leg repeats epoch 3 differently), a second training run with other
flags, eval.py --tensorboard on the run's best.pth (twice: the second replaces the first), and fcn_resnet18.py /
receptive_field_backprop.py --tensorboard. One server serves it all; the plugins checked are scalars, HParams
(experiment and session groups), images (tags and one decoded PNG), PR curves, text and graphs, and every value is
compared with results.csv, the eval JSON or a recomputation from the checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_fashion_root, synthetic_fashion_images, train_config, write_idx
from PIL import Image
from test_fcn import save_random_resnet18_checkpoint
from test_tensorboard_server import get_bytes, get_json, serve
from torch.utils.tensorboard.summary import compute_curve

import eval as eval_script
import fcn_resnet18
import receptive_field_backprop
import train
from utils.checkpoint import build_from_checkpoint, load_checkpoint
from utils.data.datasets import DataSpec, build_eval_dataset
from utils.data.fashion_mnist import FASHION_MNIST_CLASSES
from utils.evaluation.dashboard import tag_name
from utils.tensorboard import add_graph, open_writer
from utils.training.dashboard import HPARAMS, HPARAMS_SHOWN, METRICS, evaluation_details, image_epochs

N_TRAIN, N_VAL, BATCH, LOG_EVERY = 160, 80, 32, 2  # 5 iterations per epoch; log points at iterations 2, 4, 5
EPOCH_TAGS = {"train/loss": "train_loss", "train/acc1": "train_acc1", "val/loss": "val_loss", "val/acc1": "val_acc1",
              "val/acc5": "val_acc5", "lr": "lr", "time/epoch_seconds": "seconds"}
HPARAM_JSON_TYPES = {"DATA_TYPE_FLOAT64": float, "DATA_TYPE_STRING": str, "DATA_TYPE_BOOL": bool}
PLUGINS = ("scalars", "hparams", "images", "pr_curves", "text", "graphs")


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_args(root: Path, weights: Path, logs: Path | None, *extra: str) -> list[str]:
    board = ["--tensorboard", "--log_dir", str(logs)] if logs else []
    return ["--model", "custom", "--img_size", "28", "--batch_size", str(BATCH), "--num_workers", "0", "--wp_epoch", "0",
            "--data_root", str(root), "--path_to_save", str(weights), "--quiet", "--device", "cpu",
            "--log_every", str(LOG_EVERY), *board, *extra]


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict:
    """Everything the tests read back: the log directory and what each run wrote besides it."""
    tmp = tmp_path_factory.mktemp("dashboard")
    root = make_fashion_root(tmp / "data", n_train=N_TRAIN, n_test=N_VAL)
    images, labels = synthetic_fashion_images(N_VAL, seed=1)
    labels[::4] = (labels[::4] + 1) % 10  # every 4th validation label names the next class: mistakes to show
    write_idx(root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte", labels)
    logs, weights = tmp / "logs", tmp / "weights"
    run_dir = weights / "FashionMNIST" / "custom"

    assert train.main(train_args(root, weights, logs, "--max_epoch", "2", "--ema")) == 0
    shutil.copy(run_dir / "last.pth", tmp / "epoch2.pth")
    assert train.main(train_args(root, weights, logs, "--max_epoch", "3", "--ema", "--resume", str(run_dir / "last.pth"))) == 0
    extended = csv_rows(run_dir)
    # back to the epoch-2 checkpoint: epoch 3 again, now with label smoothing (other losses than the leg before);
    # put back in the run directory, since --resume continues in the checkpoint's own directory
    shutil.copy(tmp / "epoch2.pth", run_dir / "last.pth")
    assert train.main(train_args(root, weights, logs, "--max_epoch", "3", "--ema", "--label_smoothing", "0.1",
                                 "--resume", str(run_dir / "last.pth"))) == 0
    other_dir = tmp / "other" / "FashionMNIST" / "custom"
    other = train_args(root, tmp / "other", logs, "--max_epoch", "1", "--optimizer", "sgd", "--base_lr", "0.05")
    assert train.main(other) == 0
    plain = train_args(root, tmp / "plain", None, "--max_epoch", "1", "--optimizer", "sgd", "--base_lr", "0.05")
    assert train.main(plain) == 0

    report = tmp / "results" / "custom.json"
    for _ in range(2):  # the second evaluation replaces the first in TensorBoard
        assert eval_script.main(["--weights", str(run_dir / "best.pth"), "--data_root", str(root), "--output", str(report),
                                 "--speed_repeats", "0", "--num_workers", "0", "--device", "cpu", "--quiet",
                                 "--tensorboard", "--log_dir", str(logs)]) == 0

    r18 = save_random_resnet18_checkpoint(tmp / "r18.pth", img_size=64)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)).save(tmp / "scene.png")
    Image.fromarray(rng.integers(0, 255, (96, 480, 3), dtype=np.uint8)).save(tmp / "wide.png")
    assert fcn_resnet18.main(["--image", str(tmp / "scene.png"), "--weights", str(r18), "--out_dir", str(tmp / "fcn"),
                              "--device", "cpu", "--tensorboard", "--log_dir", str(logs)]) == 0
    assert receptive_field_backprop.main(["--image", str(tmp / "wide.png"), "--weights", str(r18), "--pixel", "0", "7",
                                          "--out_dir", str(tmp / "rf"), "--device", "cpu", "--tensorboard",
                                          "--log_dir", str(logs)]) == 0
    args = json.loads((run_dir / "args.json").read_text())
    return {"logs": logs, "root": root, "run_dir": run_dir, "rows": csv_rows(run_dir), "extended": extended,
            "other_rows": csv_rows(other_dir), "plain_rows": csv_rows(tmp / "plain" / "FashionMNIST" / "custom"),
            "run": Path(args["tensorboard_dir"]).relative_to(logs).as_posix(),
            "other_run": Path(json.loads((other_dir / "args.json").read_text())["tensorboard_dir"]).relative_to(logs).as_posix(),
            "report": json.loads(report.read_text())}


@pytest.fixture(scope="module")
def server(logged, tmp_path_factory):
    runs = {logged["run"], logged["other_run"], "eval/custom", "fcn/scene", "receptive_field/wide"}

    def ready(base: str) -> bool:
        images = get_json(base, "/data/plugin/images/tags")
        scalars = get_json(base, "/data/plugin/scalars/tags")
        return (runs <= set(get_json(base, "/data/runs")) and runs <= set(images)
                and {"best/val_acc1", "val/acc1"} <= set(scalars.get(logged["run"], {}))
                and "eval/acc1" in scalars.get("eval/custom", {})
                and {logged["run"], "eval/custom"} <= set(get_json(base, "/data/plugin/pr_curves/tags")))

    with serve(logged["logs"], tmp_path_factory.mktemp("server") / "tensorboard.log", ready) as base:
        yield base


def scalars(base: str, run: str, tag: str) -> list[tuple[int, float]]:
    return [(p[1], p[2]) for p in get_json(base, "/data/plugin/scalars/scalars", run=run, tag=tag)]


def hparams_request(base: str, path: str, **request):
    return get_json(base, f"/data/plugin/hparams/{path}", request=json.dumps({"experimentName": "", **request}))


def image_size(base: str, run: str, tag: str, step: int) -> tuple[int, int]:
    (entry,) = [e for e in get_json(base, "/data/plugin/images/images", run=run, tag=tag) if e["step"] == step]
    png = get_bytes(base, f"/data/plugin/images/individualImage?{entry['query']}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as img:
        return img.size


def grid_size(n: int, cols: int = 8) -> tuple[int, int]:
    """Pixels of utils.plots.examples_figure for n images (1.8 x 2.0 inches a cell, 100 dpi)."""
    cols = min(cols, n)
    return round(cols * 180), round(-(-n // cols) * 200)


def test_every_dashboard_plugin_is_active(server):
    listing = get_json(server, "/data/plugins_listing")
    assert all(listing[name]["enabled"] for name in PLUGINS), {name: listing[name]["enabled"] for name in PLUGINS}


def test_scalars_equal_results_csv_across_resumes(server, logged):
    run, rows = logged["run"], logged["rows"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for tag, column in EPOCH_TAGS.items():
        points = scalars(server, run, tag)
        assert [s for s, _ in points] == [1, 2, 3], tag  # each epoch once, after two resumes
        assert [v for _, v in points] == pytest.approx([float(r[column]) for r in rows], rel=1e-6, abs=1e-6), tag
    # the last leg's epoch 3 (label smoothing) replaced the earlier leg's
    assert float(logged["extended"][2]["val_loss"]) != pytest.approx(float(rows[2]["val_loss"]), rel=1e-3)
    val = [float(r["val_acc1"]) for r in rows]
    assert scalars(server, run, "best/val_acc1")[-1][1] == pytest.approx(max(val), rel=1e-6)
    assert scalars(server, run, "best/epoch")[-1][1] == val.index(max(val)) + 1
    assert scalars(server, run, "time/train_minutes")[-1][1] == pytest.approx(sum(float(r["seconds"]) for r in rows) / 60, rel=1e-5)
    assert [s for s, _ in scalars(server, run, "val_no_ema/acc1")] == [1, 2, 3]  # the raw model beside the EMA
    # per iteration: 5 per epoch, points at iterations 2, 4, 5 of each; every step once, across the purge
    steps = [2, 4, 5, 7, 9, 10, 12, 14, 15]
    for tag in ("train_step/loss", "train_step/acc1", "train_step/lr", "train_step/images_per_s", "train_step/grad_norm"):
        points = scalars(server, run, tag)
        assert [s for s, _ in points] == steps, tag
        assert all(math.isfinite(v) and v >= 0 for _, v in points), tag
    assert all(v > 0 for _, v in scalars(server, run, "train_step/grad_norm"))
    assert all(v > 0 for _, v in scalars(server, run, "memory/host_peak_rss_gib"))


def test_training_without_tensorboard_gives_the_same_results(logged):
    with_board, without = logged["other_rows"], logged["plain_rows"]
    assert len(with_board) == len(without) == 1
    for column in ("lr", "train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5"):
        assert with_board[0][column] == without[0][column], column


def test_hparams_line_up_runs_with_their_final_and_best_metrics(server, logged):
    experiment = hparams_request(server, "experiment")
    types = {h["name"]: h["type"] for h in experiment["hparamInfos"]}
    assert types == {name: {bool: "DATA_TYPE_BOOL", str: "DATA_TYPE_STRING"}.get(kind, "DATA_TYPE_FLOAT64")
                     for name, kind in HPARAMS.items()}
    # the default columns: marked as differing, so TensorBoard lists them first (then by name)
    listed = [(h["name"], h.get("differs", False)) for h in experiment["hparamInfos"]]
    assert listed[:len(HPARAMS_SHOWN)] == [(name, True) for name in sorted(HPARAMS_SHOWN)]
    assert not any(differs for _, differs in listed[len(HPARAMS_SHOWN):])
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == list(METRICS)
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    groups = hparams_request(server, "session_groups", allowedStatuses=statuses, startIndex=0, sliceSize=100)["sessionGroups"]
    by_run = {g["sessions"][0]["name"]: g for g in groups}
    assert set(by_run) == {logged["run"], logged["other_run"]}  # eval and analysis runs have no session
    for group in groups:
        assert set(group["hparams"]) == set(HPARAMS)
        assert all(isinstance(group["hparams"][name], HPARAM_JSON_TYPES[kind]) for name, kind in types.items())
        assert group["sessions"][0]["status"] == "STATUS_SUCCESS"
    main, other = by_run[logged["run"]]["hparams"], by_run[logged["other_run"]]["hparams"]
    assert (main["model"], main["dataset"], main["optimizer"], main["ema"]) == ("custom", "FashionMNIST", "adamw", True)
    assert main["img_size"] == 28
    assert (main["augment"], main["precision"], main["batch_size"], main["max_epoch"]) == ("light", "fp32", BATCH, 2)  # first start
    assert (other["optimizer"], other["base_lr"], other["ema"]) == ("sgd", 0.05, False)
    for run, rows in ((logged["run"], logged["rows"]), (logged["other_run"], logged["other_rows"])):
        metrics = {m["name"]["tag"]: m["value"] for m in by_run[run]["metricValues"]}
        assert metrics["val/acc1"] == pytest.approx(float(rows[-1]["val_acc1"]), rel=1e-6)
        assert metrics["val/loss"] == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-6)
        assert metrics["best/val_acc1"] == pytest.approx(max(float(r["val_acc1"]) for r in rows), rel=1e-6)
        assert metrics["time/train_minutes"] == pytest.approx(sum(float(r["seconds"]) for r in rows) / 60, rel=1e-5)
        assert metrics["train/images_per_s"] > 0


def test_images_confusion_matrix_mistakes_and_augmented_batch(server, logged):
    run, rows = logged["run"], logged["rows"]
    tags = get_json(server, "/data/plugin/images/tags")[run]
    assert {"val/confusion_matrix", "val/misclassified", "train/augmented_batch"} <= set(tags)
    steps = [e["step"] for e in get_json(server, "/data/plugin/images/images", run=run, tag="val/confusion_matrix")]
    assert steps == [1, 2, 3]
    assert image_size(server, run, "val/confusion_matrix", 3) == (1400, 650)  # 10 classes: two 6.5-inch panels at 100 dpi
    wrong = round((1 - float(rows[-1]["val_acc1"])) * N_VAL)
    assert wrong >= N_VAL // 4 - 2  # the moved labels
    assert image_size(server, run, "val/misclassified", 3) == grid_size(min(wrong, 32))
    assert image_size(server, run, "train/augmented_batch", 0) == grid_size(BATCH)


def test_pr_curves_per_class_each_evaluation(server, logged):
    run = logged["run"]
    tags = get_json(server, "/data/plugin/pr_curves/tags")[run]
    assert set(tags) == {f"val_pr/{tag_name(c)}" for c in FASHION_MNIST_CLASSES}
    points = get_json(server, "/data/plugin/pr_curves/pr_curves", run=run, tag="val_pr/Bag")[run]
    assert [p["step"] for p in points] == [1, 2, 3]
    last = points[-1]
    assert last["true_positives"][0] + last["false_positives"][0] == N_VAL  # threshold 0: every image predicted positive
    assert last["recall"][0] == pytest.approx(1.0)


def test_eval_logs_metrics_per_class_pictures_and_pr_curves_of_the_report(server, logged):
    report, run = logged["report"], "eval/custom"
    for key in ("acc1", "acc5", "loss", "ece", "nll"):
        assert scalars(server, run, f"eval/{key}") == [(0, pytest.approx(report[key], rel=1e-6))], key  # one point: replaced
    for metric, key in (("accuracy", "per_class_recall"), ("precision", "per_class_precision")):
        for name, value in report[key].items():
            assert scalars(server, run, f"eval_per_class_{metric}/{tag_name(name)}") == [(0, pytest.approx(value, abs=1e-6))]
    assert image_size(server, run, "eval/confusion_matrix", 0) == (1400, 650)
    assert image_size(server, run, "eval/reliability", 0) == (500, 600)  # eval.py's reliability diagram, 5 x 6 in
    wrong = report["num_images"] - int(np.trace(np.array(report["confusion_matrix"])))
    assert image_size(server, run, "eval/misclassified", 0) == grid_size(min(wrong, 32))
    # PR curves equal TensorBoard's own computation from the checkpoint's probabilities
    ckpt = load_checkpoint(logged["run_dir"] / "best.pth")
    model, info = build_from_checkpoint(ckpt)  # EMA weights, as eval.py evaluates them
    dataset, _, _ = build_eval_dataset(DataSpec(None, str(logged["root"])), info.preprocess, "val")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = np.array([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        probs = model.eval()(images).softmax(1).numpy()
    confusion = np.array(report["confusion_matrix"])
    for i, name in enumerate(report["classes"]):
        (point,) = get_json(server, "/data/plugin/pr_curves/pr_curves", run=run, tag=f"eval_pr/{tag_name(name)}")[run]
        expected = compute_curve(targets == i, probs[:, i], num_thresholds=127)
        n = len(point["true_positives"])  # TensorBoard trims the thresholds nothing reaches
        assert (expected[0, n:] + expected[1, n:]).sum() == 0
        for row, key in enumerate(("true_positives", "false_positives", "true_negatives", "false_negatives")):
            assert point[key] == expected[row, :n].tolist(), (name, key)
        assert point["precision"] == pytest.approx(expected[4, :n], abs=1e-6)
        assert point["true_positives"][0] + point["false_negatives"][0] == confusion[i].sum()


def test_text_and_graph(server, logged):
    run = logged["run"]
    text = get_json(server, "/data/plugin/text/tags")
    assert {f"run/{t}/text_summary" for t in ("command_line", "args", "environment", "precision")} | \
        {"val/per_class/text_summary"} <= set(text[run])
    assert {"eval/report/text_summary", "eval/per_class/text_summary"} <= set(text["eval/custom"])
    entries = get_json(server, "/data/plugin/text/text", run=run, tag="run/args/text_summary")
    assert [e["step"] for e in entries] == [0, 10]  # the first start and the last resume (after epoch 2)
    assert "tensorboard_dir" in entries[-1]["text"] and "label_smoothing" in entries[-1]["text"]
    assert "precision_used" in entries[-1]["text"]
    chosen = get_json(server, "/data/plugin/text/text", run=run, tag="run/precision/text_summary")[-1]["text"]
    assert re.search(r"(fp32|bf16) (nchw|channels_last) \(resume\)", chosen), chosen  # the resumed run kept its choice
    env = get_json(server, "/data/plugin/text/text", run=run, tag="run/environment/text_summary")[0]["text"]
    assert str(torch.__version__) in env and "CPU capability" in env
    info = get_json(server, "/data/plugin/graphs/info")
    assert info[run]["run_graph"]
    graph = get_bytes(server, "/data/plugin/graphs/graph", run=run, conceptual="false").decode()
    assert "Conv2d" in graph and "Linear" in graph


def test_fcn_and_receptive_field_images(server):
    assert {"fcn/score_map", "fcn/overlay"} <= set(get_json(server, "/data/plugin/images/tags")["fcn/scene"])
    assert "fcn/result/text_summary" in get_json(server, "/data/plugin/text/tags")["fcn/scene"]
    tags = get_json(server, "/data/plugin/images/tags")["receptive_field/wide"]
    assert {"receptive_field/max_activation", "receptive_field/fields", "receptive_field/theoretical",
            "receptive_field/effective", "receptive_field/net"} <= set(tags)
    assert image_size(server, "receptive_field/wide", "receptive_field/theoretical", 0) == (480, 96)  # the field, pixel for pixel


def test_image_evaluations_are_capped_and_every_process_asks_the_same():
    assert image_epochs(5, 2) == {2, 4, 5}
    capped = image_epochs(300, 1)
    assert len(capped) == 10 and {1, 300} <= capped
    assert len(image_epochs(300, 7, cap=4)) == 4 and 300 in image_epochs(300, 7, cap=4)
    cfg = train_config(tensorboard=True, max_epoch=300, eval_epoch=1)
    assert set(evaluation_details(cfg, 1)) == {"pr_thresholds", "keep_mistakes"} and evaluation_details(cfg, 2) == {}
    assert evaluation_details(train_config(tensorboard=False, max_epoch=3, eval_epoch=1), 1) == {}


def test_a_network_that_cannot_be_traced_is_skipped_with_a_one_line_note(tmp_path):
    class Untraceable(torch.nn.Module):  # returns no tensor: torch.jit.trace refuses it
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)

        def forward(self, x):
            self.conv(x)
            return None

    model = Untraceable().train()
    writer = open_writer(tmp_path)
    try:
        note = add_graph(writer, model, torch.zeros(1, 1, 8, 8))
        assert add_graph(writer, torch.nn.Conv2d(1, 2, 3), torch.zeros(1, 1, 8, 8)) is None
    finally:
        writer.close()
    assert note and "\n" not in note, note
    assert model.training  # the mode it had
