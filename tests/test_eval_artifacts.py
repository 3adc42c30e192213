"""eval.py on every artifact kind (checkpoint, ONNX FP32/FP16/INT8, .pt2, TorchScript) and the summary table."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from utils.checkpoint import load_checkpoint
from utils.data.loaders import calibration_batches, data_spec
from utils.deploy.metadata import artifact_kind
from utils.deploy.quantize import quantize_onnx_int8

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread


@pytest.fixture(scope="module")
def artifacts(exported, trained_ckpt, tmp_path_factory):
    """Every artifact kind in one folder: the session's ONNX FP32/FP16, .pt2 and TorchScript exports (copied, not
    re-made) and an INT8 ONNX quantized from the FP32 one."""
    out = tmp_path_factory.mktemp("artifacts")
    for name in ("custom.onnx", "custom_fp16.onnx", "custom.pt2", "custom.pt"):
        shutil.copy(exported.folder / name, out / name)
    batches = calibration_batches(data_spec(load_checkpoint(trained_ckpt)["args"]), exported.info.preprocess, 4, 32)
    quantize_onnx_int8(out / "custom.onnx", out / "custom_int8.onnx", batches, {"precision": "int8"})
    return out


def run_eval(weights, fashion_root, output) -> dict:
    import eval as eval_script

    assert eval_script.main(["--weights", str(weights), "--data_root", str(fashion_root), "--output", str(output),
                             "--speed_repeats", "2", "--num_workers", "0", "--device", "cpu", "--quiet"]) == 0
    return json.loads(output.read_text())


def test_artifact_kinds_are_detected(artifacts, trained_ckpt):
    assert artifact_kind(trained_ckpt) == "checkpoint"
    assert artifact_kind(artifacts / "custom.onnx") == "onnx"
    assert artifact_kind(artifacts / "custom.pt") == "torchscript"
    assert artifact_kind(artifacts / "custom.pt2") == "pt2"


def test_eval_reports_every_format_and_summary_merges_them(artifacts, trained_ckpt, fashion_root, tmp_path, capsys):
    import summarize_results

    results = tmp_path / "results"
    reports = {"pytorch": run_eval(trained_ckpt, fashion_root, results / "custom.json")}
    for name in ("custom.onnx", "custom_fp16.onnx", "custom_int8.onnx", "custom.pt2", "custom.pt"):
        doc = run_eval(artifacts / name, fashion_root, results / f"{name}.json")
        reports[doc["format"]] = doc
    assert set(reports) == {"pytorch", "onnx", "onnx-fp16", "onnx-int8", "pt2", "torchscript"}
    engines = {fmt: r["engine"] for fmt, r in reports.items()}
    assert engines == {"pytorch": "pytorch", "onnx": "onnxruntime", "onnx-fp16": "onnxruntime", "onnx-int8": "onnxruntime",
                       "pt2": "torch.export", "torchscript": "torchscript"}
    base = reports["pytorch"]
    n = base["num_images"]
    for r in reports.values():
        assert r["num_images"] == n and r["classes"] == base["classes"] and sum(map(sum, r["confusion_matrix"])) == n
        assert r["latency_ms"] > 0 and r["throughput_img_s"] > 0
    # Same network, same pixels: FP32 ONNX and TorchScript classify exactly like PyTorch; FP16/INT8 nearly.
    assert reports["onnx"]["confusion_matrix"] == base["confusion_matrix"]
    assert reports["torchscript"]["confusion_matrix"] == base["confusion_matrix"]
    assert reports["pt2"]["confusion_matrix"] == base["confusion_matrix"]
    assert reports["pt2"]["acc1"] == pytest.approx(base["acc1"], abs=1e-9)
    assert reports["pt2"]["loss"] == pytest.approx(base["loss"], rel=1e-5)
    assert abs(reports["onnx-fp16"]["acc1"] - base["acc1"]) <= 1 / n + 1e-9
    assert abs(reports["onnx-int8"]["acc1"] - base["acc1"]) <= 0.02
    assert reports["onnx-int8"]["size_mb"] < 0.4 * reports["onnx"]["size_mb"]
    # the exported formats carry model name and kwargs in their metadata, so MACs are known for them too
    assert {r["macs"] for r in reports.values()} == {base["macs"]} and base["macs"] > 1e6
    assert reports["onnx-fp16"]["precision"] == "fp16" and reports["onnx-int8"]["precision"] == "int8"
    assert (results / "custom_confusion_matrix.png").is_file() and (results / "custom_int8.onnx_confusion_matrix.png").is_file()
    capsys.readouterr()

    assert summarize_results.main(["--results_dir", str(results)]) == 0
    table, written = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    rows = [line for line in table.splitlines() if line.startswith("| custom |")]
    assert written == f"written to {results / 'summary.md'}"
    assert len(rows) == 6 and (results / "summary.md").read_text() == table.rstrip("\n") + "\n"
    onnx_row = next(r for r in rows if r.startswith("| custom | onnx |"))
    assert f"{100 * reports['onnx']['acc1']:.2f}" in onnx_row


def test_eval_rejects_unknown_files(tmp_path, fashion_root):
    import eval as eval_script
    from utils.errors import InputError

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="neither an ONNX file"):
        eval_script.main(["--weights", str(junk), "--data_root", str(fashion_root)])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a checkpoint written by train.py"):
        eval_script.main(["--weights", str(tmp_path / "other.pt"), "--data_root", str(fashion_root)])
