"""Result files that collect several runs key each row by the exact file it measured (path + sha256), never by model
name or format: two checkpoints of the same model give two rows (two eval reports), and measuring the same file
again replaces its own row (report)."""

from __future__ import annotations

import json
import shutil

import pytest

import eval as eval_script
import quantize
import summarize_results
from utils.io import file_sha256, merge_rows


@pytest.fixture()
def two_checkpoints(trained_run, tmp_path):
    """best.pth and last.pth of one run (epochs 1 and 2 of the same model), each in its own run folder."""
    paths = []
    for name, source in (("run_a", "best.pth"), ("run_b", "last.pth")):
        (tmp_path / name).mkdir()
        paths.append(shutil.copy(trained_run / source, tmp_path / name / "best.pth"))
    assert file_sha256(paths[0]) != file_sha256(paths[1])
    return paths


def test_merge_rows_keys_by_path_and_hash():
    old = [{"path": "a.onnx", "sha256": "1", "format": "onnx"}, {"path": "b.onnx", "sha256": "2", "format": "onnx"}]
    assert merge_rows(old, [{"path": "a.onnx", "sha256": "1", "format": "onnx", "acc1": 0.5}]) == [
        old[1], {"path": "a.onnx", "sha256": "1", "format": "onnx", "acc1": 0.5}]
    # the same path rewritten (other bytes): its old row is stale
    assert merge_rows(old, [{"path": "b.onnx", "sha256": "3", "format": "onnx"}]) == [
        old[0], {"path": "b.onnx", "sha256": "3", "format": "onnx"}]


def test_quantization_report_keeps_one_row_set_per_checkpoint(two_checkpoints, tmp_path, capsys):
    a, b = two_checkpoints
    results = tmp_path / "quant.json"

    def run(ckpt) -> list[dict]:
        assert quantize.main(["--weights", str(ckpt), "--mode", "dynamic", "--results", str(results), "--speed_repeats", "0",
                              "--device", "cpu", "--quiet", "--max_images", "64"]) == 0
        capsys.readouterr()
        return json.loads(results.read_text())["rows"]

    rows_a = run(a)
    formats = ["pytorch", "onnx", "onnx-int8-dynamic"]  # --mode dynamic: ONNX Runtime's dynamic INT8 of the FP32 ONNX
    assert [(r["format"], r["checkpoint"]) for r in rows_a] == [(f, str(a)) for f in formats]
    assert rows_a[0]["sha256"] == rows_a[0]["checkpoint_sha256"] == file_sha256(a)
    rows = run(b)  # same model name, same formats, another checkpoint: its rows are added
    assert [(r["format"], r["checkpoint"]) for r in rows] == [(f, str(a)) for f in formats] + [(f, str(b)) for f in formats]
    assert rows[0] == rows_a[0] and rows[3]["sha256"] == file_sha256(b) != rows[0]["sha256"]
    rows = run(a)  # the same checkpoint again: its own rows are replaced, b's stay
    assert [(r["format"], r["checkpoint"]) for r in rows] == [(f, str(b)) for f in formats] + [(f, str(a)) for f in formats]


def test_eval_reports_of_two_checkpoints_of_one_model_do_not_replace_each_other(two_checkpoints, fashion_root, tmp_path,
                                                                               monkeypatch, capsys):
    a, b = two_checkpoints
    monkeypatch.chdir(tmp_path)

    def run(ckpt) -> str:
        assert eval_script.main(["--weights", str(ckpt), "--data_root", str(fashion_root), "--speed_repeats", "0",
                                 "--num_workers", "0", "--device", "cpu", "--quiet"]) == 0
        return capsys.readouterr().out

    assert "report: results/custom.json" in run(a)
    assert "report: results/custom-2.json\nconfusion matrix: results/custom-2_confusion_matrix.png" in run(b)
    assert "report: results/custom.json" in run(a)  # the same file again: its own report
    reports = {p.name: json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")}
    assert {name: (r["weights"], r["sha256"]) for name, r in reports.items()} == {
        "custom.json": (str(a), file_sha256(a)), "custom-2.json": (str(b), file_sha256(b))}
    assert summarize_results.main(["--results_dir", "results"]) == 0
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "| custom.json |" in summary and "| custom-2.json |" in summary
