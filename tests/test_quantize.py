"""quantize.py: ONNX Runtime INT8 keeps accuracy, FP16 (.pth, .onnx, .pt2) halves the weights, dynamic INT8 warns when
there is nothing to quantize, the removed PyTorch INT8 paths say so in one line. Under the suite's warnings-as-errors
configuration (pyproject.toml), so the default quantize paths use no deprecated API."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from conftest import run_main

from models import build_model, model_kwargs
from utils.checkpoint import load_checkpoint
from utils.deploy.artifacts import state_dict_mb
from utils.deploy.quantize import dynamic_warning, linear_fraction

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread


@pytest.fixture()
def ckpt_copy(trained_ckpt, exported, tmp_path):
    """The trained checkpoint in its own folder, so converted_models/ lands in tmp_path, with the session's FP32 ONNX
    export of it beside it: quantize.py reuses an ONNX file whose metadata names this checkpoint's sha256 (the copy's
    bytes are the same), which saves a torch.export-based export (seconds) per test."""
    path = tmp_path / "run" / "best.pth"
    (path.parent / "converted_models").mkdir(parents=True)
    shutil.copy(trained_ckpt, path)
    shutil.copy(exported.folder / "custom.onnx", path.parent / "converted_models" / "custom.onnx")
    return path


def test_int8_onnx_keeps_accuracy(ckpt_copy, tmp_path, capsys):
    import quantize

    results = tmp_path / "quant.json"
    assert quantize.main(["--weights", str(ckpt_copy), "--mode", "int8", "--calib_batches", "4", "--results", str(results),
                          "--speed_repeats", "2", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out  # the session's export (see ckpt_copy)
    rows = {r["format"]: r for r in json.loads(results.read_text())["rows"]}
    assert set(rows) == {"pytorch", "onnx", "onnx-int8"}
    fp32 = rows["pytorch"]["acc1"]
    assert fp32 > 0.5 and rows["onnx"]["acc1"] == pytest.approx(fp32, abs=1e-9)
    int8 = rows["onnx-int8"]
    assert abs(int8["acc1"] - fp32) <= 0.02, (int8["acc1"], fp32)  # within 2 points (160 synthetic images)
    assert int8["file_mb"] < 0.4 * rows["onnx"]["file_mb"]  # int8 weights: about a quarter
    assert int8["throughput_img_s"] > 0 and int8["latency_ms"] > 0
    # A real QDQ graph with per-channel weight scales, and the metadata carried over.
    proto = onnx.load(rows["onnx-int8"]["path"])
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    scales = {t.name: t for t in proto.graph.initializer}
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in scales
                   and len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1]
    assert per_channel
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["precision"] == "int8" and json.loads(props["classes"]) == load_checkpoint(ckpt_copy)["classes"]
    for header in ("format", "size (MB)", "acc@1 (%)", "acc@5 (%)", "latency (ms)", "throughput (img/s)"):
        assert header in out


def test_fp16_checkpoint_is_half_size_and_evaluates(ckpt_copy, tmp_path, fashion_root):
    import eval as eval_script
    import quantize

    results = tmp_path / "quant.json"
    assert quantize.main(["--weights", str(ckpt_copy), "--mode", "fp16", "--results", str(results), "--speed_repeats", "0",
                          "--device", "cpu", "--quiet"]) == 0
    fp16_path = ckpt_copy.with_name("best_fp16.pth")
    fp16 = torch.load(fp16_path, weights_only=True)
    assert fp16["precision"] == "fp16" and "optimizer" not in fp16
    assert {v.dtype for v in fp16["model"].values() if v.is_floating_point()} == {torch.float16}
    original = load_checkpoint(ckpt_copy)
    ratio = fp16_path.stat().st_size / (state_dict_mb(original["model"]) * 1e6)
    assert 0.45 < ratio < 0.6, ratio  # half the FP32 weights (plus a little pickle overhead)
    rows = {r["format"]: r for r in json.loads(results.read_text())["rows"]}
    assert {"pytorch-fp16", "onnx-fp16", "pt2-fp16"} <= set(rows)
    for fmt in ("pytorch-fp16", "onnx-fp16", "pt2-fp16"):
        assert abs(rows[fmt]["acc1"] - rows["pytorch"]["acc1"]) <= 0.01, fmt
    assert 0.4 < rows["pt2-fp16"]["file_mb"] / (state_dict_mb(load_checkpoint(ckpt_copy)["model"])) < 0.7
    assert "upcast" in rows["pytorch-fp16"]["compute"]
    # eval.py loads the FP16 checkpoint and says what it computed in.
    report = tmp_path / "fp16.json"
    assert eval_script.main(["--weights", str(fp16_path), "--data_root", str(fashion_root), "--output", str(report),
                             "--speed_repeats", "0", "--num_workers", "0", "--device", "cpu", "--quiet"]) == 0
    doc = json.loads(report.read_text())
    assert doc["format"] == "pytorch-fp16" and doc["precision"] == "fp16" and "upcast" in doc["compute"]
    assert doc["acc1"] == pytest.approx(rows["pytorch-fp16"]["acc1"])
    assert doc["size_mb"] == pytest.approx(state_dict_mb(original["model"]) / 2, rel=0.01)


def test_dynamic_int8_quantizes_linear_layers_and_warns_without_them(ckpt_copy, tmp_path, capsys):
    import quantize

    results = tmp_path / "quant.json"
    assert quantize.main(["--weights", str(ckpt_copy), "--mode", "dynamic", "--results", str(results), "--speed_repeats", "0",
                          "--device", "cpu", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err  # FashionCNN keeps most weights in its Linear layers
    rows = {r["format"]: r for r in json.loads(results.read_text())["rows"]}
    dyn = rows["onnx-int8-dynamic"]
    assert dyn["file_mb"] < 0.5 * rows["onnx"]["file_mb"] and abs(dyn["acc1"] - rows["pytorch"]["acc1"]) <= 0.02
    ops = {n.op_type for n in onnx.load(dyn["path"]).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear"} and not ops & {"ConvInteger"}
    # The fully convolutional ResNet has no nn.Linear at all: nothing to quantize, and the user is told so.
    fcn = build_model("fcn_resnet18", 10, **model_kwargs(28)).eval()
    assert linear_fraction(fcn) == (0, 0.0) and "no nn.Linear" in dynamic_warning(fcn)
    assert "% of the parameters" in dynamic_warning(build_model("resnet18", 10, **model_kwargs(28)))
    # The torch.ao paths are gone: one line saying where INT8 lives now, nothing written.
    for mode in ("int8", "dynamic"):
        proc = run_main("quantize.py", "--weights", str(ckpt_copy), "--mode", mode, "--backend", "pytorch")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--backend onnx" in proc.stderr, proc.stderr
