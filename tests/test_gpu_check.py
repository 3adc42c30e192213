"""scripts/gpu_check.sh on a machine without a GPU: one line and exit 2, nothing written; its summariser on step
results made here (a real JUnit XML from pytest, train.py's results.csv); the cuda tests skipped with their reason;
and a dry run of the whole script on the CPU (GPU_CHECK_DEVICE=cpu)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_fashion_root

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check_summary as summary_script  # noqa: E402

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_check(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHON=sys.executable)
    full_env.pop("CUDA_TESTS_DEVICE", None)
    full_env.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_without_a_gpu_it_fails_at_once_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    line = one_error_line(run_check("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""}))
    assert "no CUDA GPU" in line and torch.__version__ in line and "machine with an NVIDIA GPU" in line
    assert not out.exists()


@pytest.mark.parametrize("args, env, expected", [
    (["--bogus"], {}, "unknown argument '--bogus'"),
    (["--out"], {}, "--out needs a value"),
    (["--budget", "5min"], {}, "--budget 5min: give whole seconds"),
    (["--wheels", "/nonexistent/wheels"], {}, "--wheels /nonexistent/wheels is not a directory"),
    ([], {"PYTHON": "/nonexistent/python3"}, "PYTHON=/nonexistent/python3 is not a command"),
    ([], {"GPU_CHECK_DEVICE": "tpu"}, "GPU_CHECK_DEVICE=tpu"),
])
def test_bad_usage_is_one_line_exit_2(tmp_path, args, env, expected):
    out = tmp_path / "out"
    assert expected in one_error_line(run_check("--out", str(out), *args, env=env))
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the cuda tests run instead of being skipped")
def test_cuda_tests_are_collected_and_skipped_with_the_reason_on_a_cpu_machine():
    env = {k: v for k, v in os.environ.items() if k != "CUDA_TESTS_DEVICE"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reasons = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]  # "SKIPPED [10] file:line: reason"
    assert reasons and all("needs a CUDA GPU" in line and "scripts/gpu_check.sh" in line for line in reasons)
    count = sum(int(re.match(r"SKIPPED \[(\d+)\]", line).group(1)) for line in reasons)
    assert count >= 12 and f"{count} skipped" in proc.stdout and " passed" not in proc.stdout


def junit_xml(tmp_path: Path) -> Path:
    """A real JUnit XML: pytest run on a small test file with a pass (recording a property), a failure and a skip."""
    tests = tmp_path / "junit_case"
    tests.mkdir()
    (tests / "test_case.py").write_text(
        "import pytest\n\n"
        "def test_good(record_property):\n    record_property('max_abs_diff', 0.0)\n\n"
        "def test_bad():\n    assert 1 == 2\n\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n")
    xml = tmp_path / "pytest_cuda.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "--junitxml", str(xml)],
                          cwd=tests, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and xml.is_file(), proc.stdout
    return xml


def write_run(out: Path, step: str, model: str, rows: list[dict], args: dict, log: str) -> None:
    run_dir = out / "runs" / step / "FashionMNIST" / model
    run_dir.mkdir(parents=True)
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "args.json").write_text(json.dumps(args))
    (out / f"{step}.log").write_text(log)


def epoch_rows(seconds: list[float], acc1: list[float]) -> list[dict]:
    return [{"epoch": k + 1, "lr": 1e-3, "train_loss": 0.5 / (k + 1), "train_acc1": 0.8, "val_loss": 0.3, "val_acc1": a,
             "val_acc5": 0.99, "seconds": s} for k, (s, a) in enumerate(zip(seconds, acc1))]


def test_summary_of_synthetic_step_results(tmp_path, trained_run, capsys):
    out = tmp_path / "gpu_check"
    out.mkdir()
    (out / "machine.json").write_text(json.dumps({"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11.0"}))
    shutil.copy(junit_xml(tmp_path), out / "pytest_cuda.xml")
    (out / "pytest_cuda.log").write_text("1 failed, 1 passed, 1 skipped\n")
    # torchrun: train.py's real results.csv and args.json (2 epochs on 320 synthetic images) and NCCL's own lines
    shutil.copytree(trained_run, out / "runs" / "torchrun_nccl" / "FashionMNIST" / "custom")
    (out / "torchrun_nccl.log").write_text(
        "custom: 0.17 M params, 320 train / 160 val images, 10 classes, device cuda:0\n"
        "gpu0:123:123 [0] NCCL INFO Bootstrap: Using eth0:10.0.0.2<0>\ngpu0:123:123 [0] NCCL INFO NCCL version 2.28.9+cuda13.0\n")
    resnet = {"model": "resnet18", "img_size": 28, "batch_size": 128, "max_epoch": 4, "fp16": True, "amp_dtype": "auto",
              "channels_last": True, "compile": False}
    start = "resnet18: 11.17 M params, 60000 train / 10000 val images, 10 classes, device cuda\n"
    write_run(out, "e2e_resnet18", "resnet18", epoch_rows([4.0, 2.5, 2.5, 2.6], [0.90, 0.925, 0.931, 0.94]), resnet, start)
    # timed out after 2 of 6 epochs; its log has train.py's precision line, which wins over the flags
    write_run(out, "e2e_speedrun", "resnet18", epoch_rows([3.0, 1.5], [0.91, 0.93]), dict(resnet, batch_size=256, max_epoch=6),
              start + "precision: bfloat16 autocast (mixed precision), channels_last (NHWC) memory format; LR schedule: cosine\n")
    steps = [("pytest_cuda", "pytest", "1", "80", "170"), ("torchrun_nccl", "torchrun", "0", "20", "60"),
             ("e2e_resnet18", "train", "0", "25", "80"), ("e2e_speedrun", "train", "124", "60", "60"),
             ("e2e_speedrun_compile", "train", "-", "0", "0")]
    (out / "steps.tsv").write_text("".join(f"{n}\t{k}\t{rc}\t{s}\t{limit}\t{'the budget was used up' if rc == '-' else 'python ...'}"
                                           f"\t{int(n.endswith('compile'))}\n" for n, k, rc, s, limit in steps))

    assert summary_script.main(["--out", str(out), "--budget", "290"]) == 1  # a failed step: exit 1
    printed = capsys.readouterr()
    assert "| e2e_resnet18 | passed |" in printed.out and "fastest to 93% test acc@1: e2e_speedrun in 4.5 s" in printed.out
    assert printed.err == ""  # the JSON passed its own check
    summary = json.loads((out / "summary.json").read_text())
    assert summary_script.check_summary(summary) == []
    by_name = {s["name"]: s for s in summary["steps"]}
    assert list(by_name) == [s[0] for s in steps] and summary["ok"] is False and summary["dry_run"] is False

    pytest_step = by_name["pytest_cuda"]
    assert (pytest_step["status"], pytest_step["tests"], pytest_step["passed"], pytest_step["failed"], pytest_step["skipped"]) == (
        "failed", 3, 1, 1, 1)
    assert pytest_step["failures"] == ["test_case::test_bad"] and pytest_step["properties"] == {"test_good.max_abs_diff": 0.0}
    assert pytest_step["reason"] == "exited 1; 1 failed, 0 errors; 1 skipped (on a GPU machine nothing may be skipped)"

    torchrun = by_name["torchrun_nccl"]
    real_rows = list(csv.DictReader(open(trained_run / "results.csv")))
    assert torchrun["status"] == "passed" and torchrun["nccl_initialised"] and torchrun["nccl_version"] == "2.28.9+cuda13.0"
    assert [e["test_acc1"] for e in torchrun["epochs"]] == [float(r["val_acc1"]) for r in real_rows]
    assert torchrun["train_seconds"] == pytest.approx(sum(float(r["seconds"]) for r in real_rows), abs=0.01)
    assert torchrun["images_per_s"] == pytest.approx(320 * 2 / torchrun["train_seconds"], rel=0.01)

    resnet18 = by_name["e2e_resnet18"]
    assert resnet18["status"] == "passed" and resnet18["precision"] == "fp16" and resnet18["channels_last"]
    assert resnet18["train_seconds"] == 11.6 and resnet18["first_epoch_seconds"] == 4.0 and resnet18["steady_epoch_seconds"] == 2.5
    assert resnet18["images_per_s"] == pytest.approx(4 * 60000 / 11.6, abs=0.1)
    assert [e["images_per_s"] for e in resnet18["epochs"]] == [15000, 24000, 24000, pytest.approx(60000 / 2.6)]
    assert (resnet18["seconds_to_target"], resnet18["epochs_to_target"]) == (9.0, 3)  # 4.0 + 2.5 + 2.5: acc 0.931 >= 0.93
    assert (resnet18["test_acc1"], resnet18["best_test_acc1"]) == (0.94, 0.94)

    speedrun = by_name["e2e_speedrun"]
    assert speedrun["status"] == "failed" and speedrun["precision"] == "bf16"
    assert speedrun["reason"] == "stopped at its time limit of 60 s; 2 of 6 epochs in results.csv"
    assert speedrun["seconds_to_target"] == 4.5  # reached 0.93 before the limit: still counted as measured
    assert by_name["e2e_speedrun_compile"] == dict(by_name["e2e_speedrun_compile"], status="skipped", rc=None, optional=True,
                                                   reason="the budget was used up")
    # only the failures make the check fail: with them passed, a skipped optional step leaves it ok, a required one not
    passed = [dict(s, status="passed") if s["status"] == "failed" else s for s in summary["steps"]]
    assert summary_script.all_passed(passed) and not summary_script.all_passed(passed + [dict(passed[-1], optional=False)])
    assert summary["fastest_to_target"] == {"step": "e2e_speedrun", "seconds": 4.5}
    assert summary["moonshot"]["met"] is True and summary["budget_seconds"] == 290

    broken = dict(summary, ok=True, steps=[dict(by_name["e2e_resnet18"], test_acc1=93.0, status="passed"),
                                           dict(pytest_step, status="failed", reason="")])
    assert summary_script.check_summary(broken) == ["e2e_resnet18: test_acc1 93.0 is not a fraction",
                                                    "pytest_cuda: failed without a reason", "ok disagrees with the steps' status"]


def test_missing_pytest_and_missing_results_are_named(tmp_path):
    out = tmp_path / "gpu_check"
    out.mkdir()
    (out / "pytest_cuda.log").write_text("/usr/bin/python3: No module named pytest\n")
    (out / "e2e_fashioncnn.log").write_text("error: Fashion-MNIST not found\n")
    (out / "steps.tsv").write_text("pytest_cuda\tpytest\t1\t1\t170\tpython3 -m pytest\ne2e_fashioncnn\ttrain\t2\t3\t80\tpython3 train.py\n")
    summary = summary_script.summarise(out)
    pytest_step, train_step = summary["steps"]
    assert pytest_step["reason"] == "pytest is not installed for this Python: bring its wheels and pass --wheels DIR"
    assert train_step["status"] == "failed" and "no results.csv under runs/e2e_fashioncnn/" in train_step["reason"]
    assert summary["ok"] is False and summary["fastest_to_target"] is None and summary_script.check_summary(summary) == []


@pytest.mark.slow
def test_dry_run_of_the_whole_script_on_the_cpu(tmp_path):
    """GPU_CHECK_DEVICE=cpu: every step runs (one cuda test, 1-epoch trainings on synthetic data), the logs and the
    summary are written, the summary checks itself, and the checkpoints are cleaned up."""
    data_root = make_fashion_root(tmp_path / "fm")
    out = tmp_path / "out"
    proc = run_check("--out", str(out), "--data_root", str(data_root), "--budget", "1200",
                     env={"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_PYTEST_ARGS": "-k ema"}, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DRY RUN on the CPU" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary_script.check_summary(summary) == [] and summary["ok"] and summary["dry_run"]
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"pytest_cuda": "passed", "torchrun_nccl": "passed", "e2e_fashioncnn": "passed", "e2e_resnet18": "passed",
                      "e2e_speedrun": "passed", "e2e_speedrun_resnet9": "skipped", "e2e_speedrun_compile": "skipped"}
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["pytest_cuda"]["passed"] == 1 and steps["e2e_fashioncnn"]["img_size"] == 56
    assert steps["e2e_speedrun"]["batch_size"] == 256 and steps["e2e_speedrun"]["precision"] == "fp32"  # no --fp16 on a CPU
    for name in status:
        assert (out / f"{name}.log").is_file() or status[name] == "skipped"
    assert (out / "gpu_check.log").is_file() and json.loads((out / "machine.json").read_text())["device"] == "cpu"
    assert not list(out.rglob("*.pth")) and len(list(out.rglob("results.csv"))) == 4


def test_the_budget_cuts_a_step_short_and_skips_the_rest(tmp_path):
    """--budget 20: the pytest step gets the whole 20 s and is stopped (a pytest plugin of this test makes the session
    outlast any limit, whatever the machine's speed); nothing else starts, and the summary says why for each step."""
    data_root = make_fashion_root(tmp_path / "fm")
    out = tmp_path / "out"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "outlast_the_limit.py").write_text("import time\n\n\ndef pytest_sessionstart(session):\n"
                                                  "    time.sleep(600)\n")
    proc = run_check("--out", str(out), "--data_root", str(data_root), "--budget", "20",
                     env={"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_PYTEST_ARGS": "-p outlast_the_limit",
                          "PYTHONPATH": str(plugins)}, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary_script.check_summary(summary) == [] and summary["ok"] is False
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["pytest_cuda"]["status"] == "failed" and steps["pytest_cuda"]["limit_seconds"] == 20
    assert steps["pytest_cuda"]["rc"] in (124, 137) and "stopped at its time limit of 20 s" in steps["pytest_cuda"]["reason"]
    for name in ("torchrun_nccl", "e2e_fashioncnn", "e2e_resnet18", "e2e_speedrun"):
        assert steps[name]["status"] == "skipped" and "time budget" in steps[name]["reason"], steps[name]
    for name in ("e2e_speedrun_resnet9", "e2e_speedrun_compile"):
        assert steps[name]["optional"] and steps[name]["status"] == "skipped"
