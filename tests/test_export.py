"""export.py and utils/deploy/export.py: parity of every registry model, dynamic H/W, metadata, FP16, failure handling."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import run_main, run_script

from models import MODEL_NAMES, build_model, model_kwargs
from utils.data.preprocess import Preprocess
from utils.deploy.artifacts import load_torchscript
from utils.deploy.export import export_artifact
from utils.deploy.metadata import read_torchscript_metadata
from utils.deploy.parity import FP32_ATOL, FP32_RTOL
from utils.deploy.runtime import OnnxModel
from utils.errors import InputError
from utils.io import file_sha256
from utils.model_info import ModelInfo

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread
SIZE = 32


def small_model(name: str, tmp_path, size: int = SIZE, classes: int = 10, small_input: bool = True):
    """A randomly initialised registry model at `size` px in eval mode, its info and a stand-in source file."""
    torch.manual_seed(0)
    model = build_model(name, classes, **model_kwargs(size, small_input=small_input)).eval()
    info = ModelInfo(name, [f"c{i}" for i in range(classes)], Preprocess.for_size(size))
    source = tmp_path / "source.pth"
    source.write_bytes(b"stand-in checkpoint bytes, only hashed")
    return model, info, source


def within_fp32_tolerance(diff: float, reference: np.ndarray) -> bool:
    """max |diff| <= 1e-4, or 1e-5 of the largest |logit| when that is larger.

    At random init BatchNorm's default statistics do not normalise, and the deep ResNets' logits reach ~1e4,
    where one float32 rounding step is already ~1e-3; their relative differences stay near 1e-6.
    """
    return diff <= max(FP32_ATOL, FP32_RTOL * float(np.abs(reference).max()))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registry_model_exports_with_parity(name, tmp_path):
    # The small-input stem (stride-1 3x3 conv, no max-pool) is exercised by custom, resnet18 and the FCN test; the
    # larger networks use the standard stem at 32 px, which exports the same layer types at a tenth of the compute.
    model, info, source = small_model(name, tmp_path, small_input=name in ("custom", "resnet18"))
    x7 = torch.from_numpy(np.random.default_rng(1).standard_normal((7, 3, SIZE, SIZE)).astype(np.float32))
    with torch.inference_mode():
        ref = model(x7).numpy()
    onnx_result = export_artifact(model, info, source, "onnx", tmp_path / f"{name}.onnx", log=lambda *_: None)
    ts_result = export_artifact(model, info, source, "torchscript", tmp_path / f"{name}.pt", log=lambda *_: None)
    for result in (onnx_result, ts_result):
        labels = [label for label, _, _ in result.parity.checks]
        assert any("batch 1x" in s for s in labels) and any("batch 7x" in s for s in labels)
        assert result.parity.passed
    # Independently of the export's own check: a fresh batch of 7 through ONNX Runtime and the reloaded program.
    onnx_out = OnnxModel(tmp_path / f"{name}.onnx", "cpu")(x7.numpy())
    program, meta = load_torchscript(tmp_path / f"{name}.pt")
    with torch.inference_mode():
        ts_out = program(x7).numpy()
        ts_out1 = program(x7[:1]).numpy()
    assert within_fp32_tolerance(np.abs(onnx_out - ref).max(), ref)
    assert within_fp32_tolerance(np.abs(ts_out - ref).max(), ref) and within_fp32_tolerance(np.abs(ts_out1 - ref[:1]).max(), ref)
    assert meta["model_name"] == name and meta["torchscript"] == "scripted"


def test_fcn_exports_with_dynamic_height_and_width(tmp_path):
    model, info, source = small_model("fcn_resnet18", tmp_path)
    result = export_artifact(model, info, source, "onnx", tmp_path / "fcn.onnx", dynamic_size=True, log=lambda *_: None)
    assert any("dynamic H/W" in label for label, _, _ in result.parity.checks)
    graph_input = onnx.load(str(tmp_path / "fcn.onnx")).graph.input[0]
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    session = OnnxModel(tmp_path / "fcn.onnx", "cpu")
    rng = np.random.default_rng(2)
    for n, h, w in ((1, 32, 32), (3, 48, 64), (2, 72, 40)):
        x = rng.standard_normal((n, 3, h, w)).astype(np.float32)
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        out = session.raw(x)
        assert out.shape == ref.shape
        assert (ref.shape[2:] == (1, 1)) == ((h, w) == (SIZE, SIZE))  # a score map on larger inputs
        assert within_fp32_tolerance(np.abs(out - ref).max(), ref)
    # A fixed-size model cannot be made dynamic: one clear input error, nothing written.
    custom, info_c, _ = small_model("custom", tmp_path)
    with pytest.raises(InputError, match="fixed input size"):
        export_artifact(custom, info_c, source, "onnx", tmp_path / "custom.onnx", dynamic_size=True, log=lambda *_: None)
    assert not (tmp_path / "custom.onnx").exists()


def test_dynamo_exporter_parity(tmp_path):
    model, info, source = small_model("custom", tmp_path)
    result = export_artifact(model, info, source, "onnx", tmp_path / "d.onnx", opset=18, exporter="dynamo", log=lambda *_: None)
    assert result.parity.max_abs_diff <= FP32_ATOL
    proto = onnx.load(str(tmp_path / "d.onnx"))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    with pytest.raises(InputError, match="opset 18"):
        export_artifact(model, info, source, "onnx", tmp_path / "e.onnx", opset=17, exporter="dynamo", log=lambda *_: None)


def test_export_cli_defaults_metadata_and_both_engines(trained_ckpt, fashion_root, tmp_path, capsys):
    import export

    ckpt = tmp_path / "run" / "best.pth"
    ckpt.parent.mkdir()
    shutil.copy(trained_ckpt, ckpt)
    assert export.main(["--weights", str(ckpt), "--engine", "all"]) == 0
    out = capsys.readouterr().out
    onnx_path, ts_path = ckpt.parent / "converted_models" / "custom.onnx", ckpt.parent / "converted_models" / "custom.pt"
    assert onnx_path.is_file() and ts_path.is_file()
    assert "16 real Fashion-MNIST test images" in out and out.count("max |diff| vs PyTorch") == 2
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    ts_meta = read_torchscript_metadata(ts_path)
    saved = torch.load(ckpt, weights_only=True)
    for meta in (props, ts_meta):
        assert meta["source_sha256"] == file_sha256(ckpt) and meta["model_name"] == "custom"
        classes = meta["classes"] if isinstance(meta["classes"], list) else json.loads(meta["classes"])
        assert classes == saved["classes"]
    assert Preprocess.from_json(props["preprocess"]) == Preprocess.from_dict(saved["preprocess"])
    assert "center-crop 28x28" in props["preprocessing"] and "resize shorter side to 28" in props["preprocessing"]
    assert props["opset"] == "17" and props["exporter"] == "legacy"
    assert not list(ckpt.parent.joinpath("converted_models").glob(".*tmp*"))


def test_parity_failure_exits_1_and_writes_nothing(trained_ckpt, tmp_path):
    out = tmp_path / "strict.onnx"
    proc = run_script("export.py", "--weights", str(trained_ckpt), "--output", str(out), "--atol", "1e-12", "--rtol", "0")
    assert proc.returncode == 1, proc.stderr
    assert "tolerance" in proc.stderr and "nothing written" in proc.stderr
    assert "max |diff|" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor a temporary file


def test_half_exports_keep_float32_io(exported, trained_ckpt, tmp_path):
    fp32, fp16 = exported.results["custom.onnx"], exported.results["custom_fp16.onnx"]  # the session's exports
    assert fp16.path == exported.folder / "custom_fp16.onnx" and fp16.precision == "fp16"
    assert 0.4 < fp16.size_mb / fp32.size_mb < 0.6
    proto = onnx.load(str(fp16.path))
    assert {t.data_type for t in proto.graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.parity.passed and 0 < fp16.parity.max_abs_diff < 0.05
    assert min(agree for _, _, agree in fp16.parity.checks) >= 0.85  # FP16 may flip near-ties only
    model, info = exported.model, exported.info
    ts16 = export_artifact(model, info, trained_ckpt, "torchscript", tmp_path / "m16.pt", half=True, log=lambda *_: None)
    program, meta = load_torchscript(tmp_path / "m16.pt")
    assert meta["precision"] == "fp16" and ts16.parity.passed
    assert {p.dtype for p in program.parameters()} == {torch.float16}


def test_dynamo_exporter_without_onnxscript_is_one_line_exit_2(trained_ckpt, tmp_path, monkeypatch):
    """Machines with only onnx (torch 2.11 images, say) export with the default exporter; --exporter dynamo names the
    missing package instead of a traceback, and writes nothing."""
    out = tmp_path / "exported" / "d.onnx"
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    proc = run_main("export.py", "--weights", str(trained_ckpt), "--exporter", "dynamo", "--output", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--exporter dynamo needs the onnxscript package" in lines[0] and "legacy" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())
