"""export.py and utils/deploy/export.py: parity of every registry model through the torch.export-based ONNX exporter,
dynamic H/W, the .pt2 archive (round trip, metadata, the safety check on loading), the legacy exporters on request,
metadata, FP16, failure handling."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import run_main

from models import MODEL_NAMES, build_model, model_kwargs
from utils.data.preprocess import Preprocess
from utils.deploy.artifacts import TORCHSCRIPT_NOTE, load_torchscript
from utils.deploy.export import LEGACY_ONNX_NOTE, export_artifact
from utils.deploy.metadata import artifact_kind, read_torchscript_metadata
from utils.deploy.parity import FP32_ATOL, FP32_RTOL
from utils.deploy.pt2 import check_archive, load_program
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


# The torch.export-based exporter costs 3-30 s per model on one core (deeper = slower: resnet152 ~30 s, against
# 0.1-0.6 s for the legacy exporter), so each family is exported once, by its shallowest member; the members left out
# are deeper stacks of the same blocks, and benchmarks/bench_deploy.py --registry exports every one with parity.
SAME_BLOCKS = {"resnet34": "resnet18", "resnet101": "resnet50", "resnet152": "resnet50", "mobilenet_v3_large": "mobilenet_v3_small"}
EXPORTED_IN_TESTS = tuple(n for n in MODEL_NAMES if n not in SAME_BLOCKS)


def test_every_registry_model_is_exported_here_or_shares_the_blocks_of_one_that_is():
    assert set(MODEL_NAMES) == set(EXPORTED_IN_TESTS) | set(SAME_BLOCKS)  # a new model must be placed in one of them
    with torch.device("meta"):  # module types only: no weights allocated or initialised
        for deeper, tested in SAME_BLOCKS.items():
            types = [{type(m) for m in build_model(n, 10, **model_kwargs(SIZE)).modules()} for n in (deeper, tested)]
            assert types[0] == types[1], (deeper, tested)


@pytest.mark.parametrize("name", EXPORTED_IN_TESTS)
def test_every_registry_model_exports_with_parity(name, tmp_path):
    # The small-input stem (stride-1 3x3 conv, no max-pool) is exercised by custom, resnet18 and the FCN test; the
    # larger networks use the standard stem at 32 px, which exports the same layer types at a tenth of the compute.
    # TorchScript, legacy now, is checked on the two small-input models only.
    model, info, source = small_model(name, tmp_path, small_input=name in ("custom", "resnet18"))
    x7 = torch.from_numpy(np.random.default_rng(1).standard_normal((7, 3, SIZE, SIZE)).astype(np.float32))
    with torch.inference_mode():
        ref = model(x7).numpy()
    result = export_artifact(model, info, source, "onnx", tmp_path / f"{name}.onnx", log=lambda *_: None)
    labels = [label for label, _, _ in result.parity.checks]
    assert any("batch 1x" in s for s in labels) and any("batch 7x" in s for s in labels)
    assert result.parity.passed and result.method == "torch.onnx (dynamo exporter, opset 18)"
    # Independently of the export's own check: a fresh batch of 7 through ONNX Runtime.
    session = OnnxModel(tmp_path / f"{name}.onnx", "cpu")
    assert session.metadata["exporter"] == "dynamo" and session.input_shape[0] == "batch"
    assert within_fp32_tolerance(np.abs(session(x7.numpy()) - ref).max(), ref)
    if name in ("custom", "resnet18"):
        export_artifact(model, info, source, "torchscript", tmp_path / f"{name}.pt", log=lambda *_: None, note=lambda *_: None)
        program, meta = load_torchscript(tmp_path / f"{name}.pt", log=lambda *_: None)
        with torch.inference_mode():
            ts_out, ts_out1 = program(x7).numpy(), program(x7[:1]).numpy()
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


def test_legacy_exporters_only_on_request_with_one_line_of_ours(tmp_path, capsys):
    """The TorchScript-based ONNX exporter and TorchScript run when asked for, with our one line instead of PyTorch's
    DeprecationWarning / FutureWarning (the tests turn those into errors: pyproject.toml), and still pass parity."""
    model, info, source = small_model("custom", tmp_path)
    legacy = export_artifact(model, info, source, "onnx", tmp_path / "l.onnx", exporter="legacy", log=lambda *_: None)
    assert legacy.parity.max_abs_diff <= FP32_ATOL and legacy.method == "torch.onnx (legacy exporter, opset 17)"
    export_artifact(model, info, source, "torchscript", tmp_path / "t.pt", log=lambda *_: None)
    assert capsys.readouterr().err.splitlines() == [LEGACY_ONNX_NOTE, TORCHSCRIPT_NOTE]
    proto = onnx.load(str(tmp_path / "l.onnx"))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    with pytest.raises(InputError, match="--exporter legacy"):
        export_artifact(model, info, source, "onnx", tmp_path / "e.onnx", opset=17, log=lambda *_: None)
    assert not (tmp_path / "e.onnx").exists()


def test_pt2_round_trip_equals_the_model_carries_metadata_and_refuses_unsafe_archives(tmp_path):
    model, info, source = small_model("resnet18", tmp_path)
    result = export_artifact(model, info, source, "pt2", tmp_path / "r.pt2", log=lambda *_: None)
    assert result.parity.passed and artifact_kind(tmp_path / "r.pt2") == "pt2"
    program, meta = load_program(tmp_path / "r.pt2")
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32))
    with torch.inference_mode():
        assert torch.equal(program(x), model(x))  # the same ATen kernels on the same weights: bit-identical
    assert meta["classes"] == list(info.classes) and meta["preprocess"] == info.preprocess
    assert meta["source_sha256"] == file_sha256(source) and meta["precision"] == "fp32"
    assert read_torchscript_metadata(tmp_path / "r.pt2")["model_name"] == "resnet18"  # readable without torch too
    # What torch.export.load would unpickle or run is refused before torch reads the archive.
    import zipfile

    with zipfile.ZipFile(tmp_path / "r.pt2") as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    root = next(iter(entries)).split("/")[0]
    weights_cfg = f"{root}/data/weights/model_weights_config.json"
    pickled = json.loads(entries[weights_cfg])
    next(iter(pickled["config"].values()))["use_pickle"] = True
    graph = json.loads(entries[f"{root}/models/model.json"])
    graph["graph_module"]["graph"]["nodes"][0]["target"] = "torch.hub.load"
    for name, change, why in (("aoti.pt2", {f"{root}/data/aotinductor/model/x.so": b"\x7fELF"}, "AOTInductor"),
                              ("pickle.pt2", {weights_cfg: json.dumps(pickled).encode()}, "pickle"),
                              ("call.pt2", {f"{root}/models/model.json": json.dumps(graph).encode()}, "torch.hub.load")):
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            for entry, data in {**entries, **change}.items():
                zf.writestr(entry, data)
        with pytest.raises(InputError, match=f"refused to load.*{why}"):
            check_archive(tmp_path / name)


def test_export_cli_defaults_metadata_and_both_engines(trained_ckpt, fashion_root, tmp_path, capsys):
    import export

    ckpt = tmp_path / "run" / "best.pth"
    ckpt.parent.mkdir()
    shutil.copy(trained_ckpt, ckpt)
    assert export.main(["--weights", str(ckpt), "--engine", "all"]) == 0
    out = capsys.readouterr().out
    folder = ckpt.parent / "converted_models"
    onnx_path, pt2_path, ts_path = folder / "custom.onnx", folder / "custom.pt2", folder / "custom.pt"
    assert onnx_path.is_file() and pt2_path.is_file() and ts_path.is_file()
    assert "16 real Fashion-MNIST test images" in out and out.count("max |diff| vs PyTorch") == 3
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    saved = torch.load(ckpt, weights_only=True)
    for meta in (props, read_torchscript_metadata(pt2_path), read_torchscript_metadata(ts_path)):
        assert meta["source_sha256"] == file_sha256(ckpt) and meta["model_name"] == "custom"
        classes = meta["classes"] if isinstance(meta["classes"], list) else json.loads(meta["classes"])
        assert classes == saved["classes"]
    assert Preprocess.from_json(props["preprocess"]) == Preprocess.from_dict(saved["preprocess"])
    assert "center-crop 28x28" in props["preprocessing"] and "resize shorter side to 28" in props["preprocessing"]
    assert props["opset"] == "18" and props["exporter"] == "dynamo"
    assert not list(ckpt.parent.joinpath("converted_models").glob(".*tmp*"))


def test_parity_failure_exits_1_and_writes_nothing(trained_ckpt, tmp_path):
    out = tmp_path / "strict.onnx"
    # in this process (conftest run_main: exit code and streams as a real process gives them; no torch import to pay)
    proc = run_main("export.py", "--weights", str(trained_ckpt), "--output", str(out), "--atol", "1e-12", "--rtol", "0")
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
    pt16 = export_artifact(model, info, trained_ckpt, "pt2", tmp_path / "m16.pt2", half=True, log=lambda *_: None)
    program, meta = load_program(tmp_path / "m16.pt2")
    assert meta["precision"] == "fp16" and pt16.parity.passed and 0 < pt16.parity.max_abs_diff < 0.05
    assert {p.dtype for p in program.parameters()} == {torch.float16}


def test_onnx_export_without_onnxscript_is_one_line_exit_2(trained_ckpt, tmp_path, monkeypatch):
    """A machine with only onnx (onnxscript not installed): the default exporter names the missing package instead of
    a traceback, and writes nothing."""
    out = tmp_path / "exported" / "d.onnx"
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    proc = run_main("export.py", "--weights", str(trained_ckpt), "--output", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "needs the onnxscript package" in lines[0] and "--exporter legacy" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())
