"""Never lose a run: numbered run directories, no trace of a failed start in an earlier run, no temp files left by
killed saves, one-line errors when the system refuses a write, and no NaN weights in best.pth.

train.py's one-line errors run main(argv) in this process (conftest.run_main, through utils.cli.run as a real process);
real processes stay where the mechanism needs them: SIGKILL, and the tiny read-only or full filesystems, which exist
only in the private mount namespace of the process that writes to them."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_main

import train
from utils.errors import InputError
from utils.io import atomic_path, atomic_write_text, make_dirs, remove_stale_temps, temp_sibling

FAST = ["--model", "custom", "--img_size", "28", "--max_epoch", "1", "--wp_epoch", "0", "--batch_size", "64",
        "--num_workers", "0", "--quiet", "--device", "cpu"]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_dir_lines(out: str) -> list[str]:
    return [line.removeprefix("run_dir: ") for line in out.splitlines() if line.startswith("run_dir: ")]


def test_second_run_gets_a_numbered_directory_and_the_latest_link_follows(tmp_path, small_fashion_root, capsys):
    base = ["--data_root", str(small_fashion_root), "--path_to_save", str(tmp_path), *FAST]
    assert train.main(base) == 0
    first = capsys.readouterr().out
    first_dir = tmp_path / "FashionMNIST" / "custom"
    before = digest(first_dir)
    assert {"best.pth", "last.pth", "args.json", "classes.txt", "results.csv"} <= before.keys()
    assert train.main([*base, "--seed", "7"]) == 0
    second = capsys.readouterr().out
    second_dir = tmp_path / "FashionMNIST" / "custom-2"
    # the directory is the first and the last line of each run, machine-readable
    assert first.splitlines()[0] == first.splitlines()[-1] == f"run_dir: {first_dir}"
    assert run_dir_lines(second) == [str(second_dir)] * 2 and second.splitlines()[0] == f"run_dir: {second_dir}"
    assert digest(first_dir) == before  # the first run is untouched
    assert digest(second_dir)["best.pth"] != before["best.pth"]
    latest = tmp_path / "FashionMNIST" / "custom-latest"
    assert latest.is_symlink() and os.readlink(latest) == "custom-2"
    assert (latest / "best.pth").read_bytes() == (second_dir / "best.pth").read_bytes()

    # --resume through the link continues in the run's real directory (max_epoch already reached: nothing trained)
    assert train.main([*base, "--resume", str(latest / "last.pth")]) == 0
    assert run_dir_lines(capsys.readouterr().out) == [str(second_dir)] * 2
    assert sorted(p.name for p in (tmp_path / "FashionMNIST").iterdir()) == ["custom", "custom-2", "custom-latest"]


def test_name_flag_and_bad_names(tmp_path, fashion_root):
    out = tmp_path / "w"
    bad = run_main("train.py", "--name", "../x", "--path_to_save", str(out), "--data_root", str(fashion_root), *FAST)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--name" in bad.stderr and not out.exists()
    bad = run_main("train.py", "--name", "exp-latest", "--path_to_save", str(out), "--data_root", str(fashion_root), *FAST)
    assert bad.returncode == 2 and "-latest" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_failed_start_in_a_reused_directory_leaves_the_earlier_run_intact(tmp_path, fashion_root, trained_run, capsys):
    """--exist_ok into an earlier run whose save was killed, then a run that diverges in its first epoch: the killed
    save's temp file is removed at start, the diverged run stops with one line and the earlier run's files
    (best.pth, args.json, classes.txt, results.csv) keep their bytes."""
    root = tmp_path / "w"
    run = root / "FashionMNIST" / "exp"
    shutil.copytree(trained_run, run)
    # a real process killed with SIGKILL in the middle of writing best.pth
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from utils.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp, open(tmp, 'wb') as f:\n"
        "    f.write(b'\\0' * 3_000_000); f.flush(); print(tmp, flush=True); time.sleep(120)\n"),
        str(run / "best.pth")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    tmp = Path(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stdout.close()
    assert tmp.parent == run and tmp.name == f".best.tmp-{child.pid}.pth" and tmp.stat().st_size == 3_000_000
    before = digest(run)

    with pytest.raises(InputError, match=r"^training diverged: the loss became nan in epoch 1 .*; fix: lower --base_lr"):
        train.main(["--data_root", str(fashion_root), "--path_to_save", str(root), "--name", "exp", "--exist_ok",
                    *FAST, "--base_lr", "1e6", "--batch_size", "32"])
    out = capsys.readouterr().out
    assert f"removed {tmp.name}" in out and run_dir_lines(out) == [str(run)]
    assert not tmp.exists()
    assert digest(run) == {k: v for k, v in before.items() if k != tmp.name}


def test_diverged_run_is_one_line_exit_2_and_writes_no_checkpoint(tmp_path, fashion_root):
    result = run_main("train.py", "--data_root", str(fashion_root), "--path_to_save", str(tmp_path), *FAST,
                      "--base_lr", "1e6")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: training diverged: the loss became nan in epoch 1 (by batch "), result.stderr
    assert not (tmp_path / "FashionMNIST" / "custom").exists()  # nothing written: the empty new directory is removed


def test_stale_temp_files_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)
        dead_pid = int(dead.stdout)
        files = {name: tmp_path / name for name in (f".best.tmp-{dead_pid}.pth", f".custom_int8.tmp-{dead_pid}.onnx",
                                                     f".best.tmp-{live.pid}.pth", temp_sibling(tmp_path / "last.pth").name,
                                                     "best.pth", f"notes.tmp-{dead_pid}.txt")}
        for path in files.values():
            path.write_bytes(b"x")
        removed = remove_stale_temps(tmp_path)
        assert sorted(p.name for p in removed) == sorted([f".best.tmp-{dead_pid}.pth", f".custom_int8.tmp-{dead_pid}.onnx"])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f".best.tmp-{live.pid}.pth", f".last.tmp-{os.getpid()}.pth", "best.pth", f"notes.tmp-{dead_pid}.txt"])
    finally:
        live.kill()
        live.wait()
    assert [p.name for p in remove_stale_temps(tmp_path)] == [f".best.tmp-{live.pid}.pth"]


def test_write_into_a_path_whose_parent_is_a_file_is_one_line(tmp_path):
    blocker = atomic_write_text(tmp_path / "file.txt", "x\n")
    with pytest.raises(InputError, match=r"^not a directory: .*file.txt/sub.*; fix: "):
        atomic_write_text(blocker / "sub" / "report.json", "{}\n")
    with pytest.raises(InputError, match=r"^not a directory: .*file.txt.*; fix: "):
        make_dirs(blocker)
    result = run_main("train.py", "--path_to_save", str(blocker / "runs"), "--data_root", str(tmp_path), *FAST)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: not a directory: ") and str(blocker) in result.stderr
    assert blocker.read_text() == "x\n"


def test_atomic_path_does_not_swallow_errors_of_reading_inputs(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text((tmp_path / "missing_input.txt").read_text())
    assert list(tmp_path.iterdir()) == []


def tiny_fs_shell(script: str, size: str = "96k", options: str = "") -> subprocess.CompletedProcess:
    """Run `script` (bash) with $FS a fresh tmpfs of `size` (`options` e.g. ro): a real tiny filesystem in a private
    mount namespace (unshare; as root, or as a user where user namespaces are enabled), gone when the script ends."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) on this platform: cannot mount a tiny filesystem")
    setup = f"FS=$(mktemp -d) && mount -t tmpfs -o size={size}{',' + options if options else ''} tmpfs \"$FS\" && export FS"
    flags = ["--mount"] if os.geteuid() == 0 else ["--map-root-user", "--mount"]
    probe = subprocess.run(["unshare", *flags, "bash", "-c", setup], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this platform does not allow mounting a tiny filesystem: {probe.stderr.strip()}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    return subprocess.run(["unshare", *flags, "bash", "-c", f"{setup} && {script}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_disk_full_during_training_is_one_line_exit_2_and_leaves_no_partial_file(small_fashion_root):
    # 96 KiB: room for the run directory, not for last.pth (2 MB)
    result = tiny_fs_shell(f"{sys.executable} train.py --data_root {small_fashion_root} --path_to_save $FS {' '.join(FAST)}; "
                           "rc=$?; echo; echo files:; find $FS -type f | sort; exit $rc")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: no space left on device: ") and "/FashionMNIST/custom/last.pth" in result.stderr
    assert "fix: free space" in result.stderr
    files = result.stdout.split("files:")[1].split()
    assert not [f for f in files if f.endswith(".pth") or ".tmp-" in f], files  # no half checkpoint, no temp file


def test_read_only_output_directory_is_one_line_exit_2(fashion_root):
    result = tiny_fs_shell(f"{sys.executable} train.py --data_root {fashion_root} --path_to_save $FS/runs {' '.join(FAST)}",
                           options="ro")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: read-only file system: ") and "/runs" in result.stderr, result.stderr


def test_eval_prints_its_metrics_before_failing_to_write_them(trained_ckpt, fashion_root):
    result = tiny_fs_shell(f"{sys.executable} eval.py --weights {trained_ckpt} --data_root {fashion_root} --quiet "
                           "--num_workers 0 --device cpu --speed_repeats 0 --output $FS/report.json", options="ro")
    assert result.returncode == 2, result.stderr
    assert "acc@1 " in result.stdout and "custom [pytorch" in result.stdout, result.stdout
    assert result.stderr.startswith("error: read-only file system: ") and "report.json" in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
