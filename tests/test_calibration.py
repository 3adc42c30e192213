"""Calibration and error analysis of eval.py: ECE and its bins against torchmetrics, temperature scaling (NLL down,
predictions unchanged) from the fit to every reader of the calibrated checkpoint, the most confused pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image
from torchmetrics.classification import MulticlassCalibrationError

from utils.checkpoint import build_from_checkpoint, load_checkpoint
from utils.deploy.metadata import build_metadata, decode_metadata
from utils.errors import InputError
from utils.evaluation.calibration import bins_ece, calibration, confused_pairs, fit_temperature, highest_loss
from utils.model_info import ModelInfo

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread


def overconfident_logits(n: int = 2000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax would be calibrated, multiplied by 3 (an overconfident network), and their labels drawn
    from the calibrated probabilities, so the right temperature is 3."""
    g = torch.Generator().manual_seed(seed)
    honest = torch.randn(n, classes, generator=g) * 1.5
    targets = torch.multinomial(honest.softmax(1), 1, generator=g)[:, 0]
    return honest * 3.0, targets


def test_ece_and_its_bins_equal_torchmetrics_on_known_logits():
    logits, targets = overconfident_logits()
    logits[:50] = torch.nn.functional.one_hot(targets[:50], 5) * 200.0  # saturated: confidence exactly 1.0
    cal = calibration(logits, targets)
    expected = MulticlassCalibrationError(5, n_bins=15, norm="l1")(logits.softmax(1), targets)
    assert cal.ece == pytest.approx(float(expected), abs=1e-6)
    assert bins_ece(cal.bins) == pytest.approx(cal.ece, abs=1e-5)  # the bins reproduce the number
    assert sum(b["count"] for b in cal.bins) == len(targets)
    assert cal.bins[-1] == {"low": 1.0, "high": 1.0, "count": 50, "confidence": 1.0, "accuracy": 1.0}
    assert cal.nll == pytest.approx(float(torch.nn.functional.cross_entropy(logits, targets)), rel=1e-6)
    # a hand-made case: 4 images in the 0.9-ish bin, 3 right -> |0.75 - conf|
    logits = torch.log(torch.tensor([[0.9, 0.1]] * 4))
    cal = calibration(logits, torch.tensor([0, 0, 0, 1]))
    assert cal.ece == pytest.approx(0.15, abs=1e-5)


def test_temperature_scaling_lowers_the_nll_and_keeps_every_prediction():
    logits, targets = overconfident_logits()
    t = fit_temperature(logits, targets)
    assert t == pytest.approx(3.0, rel=0.1)  # measured 2.9-3.1 with other seeds
    before, after = calibration(logits, targets), calibration(logits, targets, t)
    assert after.nll < before.nll - 0.1 and after.ece < before.ece / 2
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))


def test_confused_pairs_and_highest_loss():
    cm = np.array([[50, 10, 0], [3, 40, 7], [0, 10, 30]])
    assert confused_pairs(cm, ["a", "b", "c"], k=3) == [
        {"true": "a", "predicted": "b", "count": 10, "rate": 10 / 60},
        {"true": "c", "predicted": "b", "count": 10, "rate": 0.25},
        {"true": "b", "predicted": "c", "count": 7, "rate": 0.14}]
    logits = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 0.0]])
    assert highest_loss(logits, torch.tensor([0, 0, 0, 1]), k=5).tolist() == [2, 3, 1]  # mistakes only, worst first


def test_eval_reports_calibration_and_calibrate_writes_a_checkpoint_every_reader_applies(trained_ckpt, fashion_root,
                                                                                         tmp_path):
    ckpt = tmp_path / "best.pth"
    ckpt.write_bytes(trained_ckpt.read_bytes())
    common = ("--data_root", str(fashion_root), "--speed_repeats", "0", "--num_workers", "0", "--quiet")
    r = run_main("eval.py", "--weights", str(ckpt), "--calibrate", "--output", str(tmp_path / "before.json"), *common)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "before.json").read_text())
    fit = report["temperature_fit"]
    assert fit["nll_after"] < fit["nll_before"] and fit["checkpoint"] == str(tmp_path / "best_calibrated.pth")
    assert report["ece"] == fit["ece_after"] and report["calibration"]["n_bins"] == 15
    assert sum(b["count"] for b in report["calibration"]["bins"]) == report["num_images"]
    mistakes = round((1 - report["acc1"]) * report["num_images"])  # the session's model: few or none on this set
    assert sum(c["count"] for c in report["most_confused"]) == mistakes or len(report["most_confused"]) == 10
    assert "temperature" in r.stdout and ("most confused (true -> predicted)" in r.stdout) == (mistakes > 0)
    assert (tmp_path / "before_reliability.png").stat().st_size > 10_000
    calibrated = load_checkpoint(tmp_path / "best_calibrated.pth")
    assert calibrated["temperature"] == fit["temperature"] and "optimizer" not in calibrated

    # eval.py applies it: the same accuracy, the calibrated NLL as the loss
    r = run_main("eval.py", "--weights", str(tmp_path / "best_calibrated.pth"), "--output", str(tmp_path / "after.json"),
                 *common)
    assert r.returncode == 0, r.stderr
    after = json.loads((tmp_path / "after.json").read_text())
    assert after["acc1"] == report["acc1"] and after["loss"] == pytest.approx(fit["nll_after"], rel=1e-4)
    assert after["nll"] == pytest.approx(fit["nll_after"], rel=1e-4)
    # predict_ckpoint.py: probabilities change by the temperature, the top-1 class does not
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(tmp_path / "x.png")
    rows = {}
    for name in ("best.pth", "best_calibrated.pth"):
        r = run_main("predict_ckpoint.py", "--weights", str(tmp_path / name), "--image", str(tmp_path / "x.png"), "--json",
                     "--quiet")
        assert r.returncode == 0, r.stderr
        rows[name] = json.loads(r.stdout)["predictions"][0]["top"]
    assert rows["best.pth"][0]["class"] == rows["best_calibrated.pth"][0]["class"]
    assert rows["best.pth"][0]["prob"] != pytest.approx(rows["best_calibrated.pth"][0]["prob"], abs=1e-4)
    # exported metadata carries it, and reading it back gives the model's temperature
    _, info = build_from_checkpoint(calibrated, source="x")
    meta = decode_metadata(build_metadata(info, tmp_path / "best_calibrated.pth", "fp32"), "m.onnx")
    assert ModelInfo.from_metadata(meta, "m").temperature == fit["temperature"]
    assert "temperature" not in build_metadata(build_from_checkpoint(load_checkpoint(ckpt))[1], ckpt, "fp32")
    torch.save({**calibrated, "temperature": 0.0}, tmp_path / "edited.pth")
    with pytest.raises(InputError, match="key 'temperature' must be a positive finite number, got '0.0'"):
        load_checkpoint(tmp_path / "edited.pth")
    for value in ("-1", "abc", "inf"):  # an edited artifact: one line naming the key, as for every other key
        with pytest.raises(InputError, match=f"m.onnx: metadata key 'temperature' must be a positive number, got '{value}'"):
            decode_metadata({"temperature": value}, "m.onnx")

    # refusals: calibrating a calibrated checkpoint, or over a file calibrated from another checkpoint
    r = run_main("eval.py", "--weights", str(tmp_path / "best_calibrated.pth"), "--calibrate", *common)
    assert r.returncode == 2 and "already calibrated" in r.stderr and len(r.stderr.splitlines()) == 1
    other = tmp_path / "other" / "best.pth"
    other.parent.mkdir()
    (other.parent / "best_calibrated.pth").write_bytes((tmp_path / "best_calibrated.pth").read_bytes())
    torch.save({**load_checkpoint(ckpt), "epoch": 99}, other)  # another file (another sha256)
    r = run_main("eval.py", "--weights", str(other), "--calibrate", "--output", str(tmp_path / "o.json"), *common)
    assert r.returncode == 2 and "exists and was not calibrated from" in r.stderr, r.stderr
