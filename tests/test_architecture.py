"""The structure the code promises: every module imports on its own, no import cycle, dependencies point one way,
one atomic-write helper, torch-free modules stay torch-free, and checkpoints of previous formats still work."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread
LEGACY_CKPT = ROOT / "tests" / "fixtures" / "legacy_c29c9b5_custom8_ema.pth"  # written by train.py at commit c29c9b5
# last.pth written by train.py at commit 205200d (scheduler state, split and class_weights keys):
# --model custom --img_size 8 --max_epoch 2 --ema --ema_decay 0.99 --base_lr 3e-3 --batch_size 32, same synthetic data
LEGACY_205200D_CKPT = ROOT / "tests" / "fixtures" / "legacy_205200d_custom8_ema.pth"
LEGACY_CKPTS = pytest.mark.parametrize("legacy", [LEGACY_CKPT, LEGACY_205200D_CKPT], ids=["c29c9b5", "205200d"])
# layer of each package or module (lower = more basic); an import may only point to the same or a lower layer
LAYERS = {"utils.errors": 0, "utils.io": 0, "utils.cli": 0, "utils.timing": 0, "utils.plots": 0, "utils.distributed": 0,
          "utils.precision": 0, "utils.tensorboard": 0, "utils.progress": 0, "utils.regions": 0, "utils.data": 1, "utils.model_info": 1,
          "models": 1, "utils.checkpoint": 2, "utils.evaluation": 2, "utils.training": 3, "utils.deploy": 3, "utils.analysis": 3,
          "utils.explain": 3}
TORCH_FREE = ("utils.errors", "utils.io", "utils.cli", "utils.progress", "utils.data.preprocess", "utils.model_info",
              "utils.deploy.metadata", "utils.deploy.runtime", "utils.deploy.predict", "utils.deploy.open_model",
              "utils.explain.geometry", "utils.regions")


def package_modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*(ROOT / "utils").rglob("*.py"), *(ROOT / "models").rglob("*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def layer(module: str) -> int | None:
    return next((v for k, v in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])) if module == k or module.startswith(k + ".")),
                None)


def test_no_import_cycle_and_dependencies_point_down():
    modules = package_modules()
    modules.pop("utils")  # the empty package itself: `from utils import cli` depends on utils.cli only
    graph = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
    unplaced = sorted(m for m in graph if layer(m) is None)
    assert not unplaced, f"modules outside the layers of LAYERS: {unplaced}"
    upward = [(m, d) for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert not upward, f"imports pointing up the layers: {upward}"
    jobs = ("utils.training", "utils.deploy", "utils.analysis", "utils.explain")
    sideways = [(m, d) for m, deps in graph.items() for d in deps
                for a in jobs for b in jobs if a != b and m.startswith(a) and d.startswith(b)]
    assert not sideways, f"job packages importing each other: {sideways}"
    visiting, done = set(), set()

    def visit(m, stack):
        assert m not in visiting, f"import cycle: {' -> '.join(stack + [m])}"
        if m in done:
            return
        visiting.add(m)
        for d in graph[m]:
            visit(d, stack + [m])
        visiting.discard(m)
        done.add(m)

    for m in graph:
        visit(m, [])
    assert len(graph) >= 35  # the whole package was read


def test_no_script_imports_a_script():
    """Scripts parse flags and call the package: shared work lives in utils/, never in another script."""
    scripts = {p.stem: p for p in ROOT.glob("*.py")}
    offenders = [(name, other) for name, path in scripts.items()
                 for other in imports_of(path, {s: ROOT / f"{s}.py" for s in scripts}) if other != name]
    assert not offenders, f"scripts importing scripts: {offenders}"
    assert len(scripts) >= 15


def test_every_module_imports_first_in_a_fresh_interpreter():
    # each module is imported first, with none of the project's modules loaded, as a script would import it
    modules = sorted(package_modules())
    code = ("import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n"
            "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('utils', 'models')]:\n"
            "        del sys.modules[loaded]\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as e:\n        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_torch_free_modules_do_not_import_torch():
    code = "import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE) + "print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_only_the_atomic_write_helper_renames_files_into_place():
    offenders = []
    sources = [*ROOT.glob("*.py"), *(ROOT / "utils").rglob("*.py"), *(ROOT / "models").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
               *(ROOT / "scripts").glob("*.py")]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("replace", "rename"):
                owner = ast.unparse(node.func.value)
                if owner == "os" or (node.func.attr == "rename" and owner != "str"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    # atomic_path's rename of a written file and atomic_symlink's of a link: both in utils/io.py
    assert sorted(o.split(" ", 1)[1] for o in offenders) == ["os.replace(tmp, link)", "os.replace(tmp, path)"], offenders
    assert {o.split(":")[0] for o in offenders} == {"utils/io.py"}, offenders


def test_atomic_path_keeps_the_old_file_and_leaves_no_temp_on_failure(tmp_path):
    from utils.io import atomic_path, atomic_write_text

    target = atomic_write_text(tmp_path / "report.json", "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@LEGACY_CKPTS
def test_checkpoint_of_a_previous_format_evaluates_with_its_ema_weights(tmp_path, fashion_root, legacy):
    # the fixtures were trained for 2 epochs on the same synthetic data (tests/conftest.make_fashion_root), EMA on;
    # their recorded validation acc@1 was measured on the EMA weights, so eval.py must reproduce it exactly
    ckpt = torch.load(legacy, map_location="cpu", weights_only=True)
    assert ("scheduler" in ckpt) == (legacy == LEGACY_205200D_CKPT) and ckpt["ema"]["updates"] == 20
    out = tmp_path / "legacy.json"
    proc = run_main("eval.py", "--weights", str(legacy), "--data_root", str(fashion_root), "--output", str(out),
                    "--speed_repeats", "0", "--num_workers", "0", "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["num_images"] == 160
    assert report["acc1"] == pytest.approx(ckpt["best_acc1"], abs=1e-7)


@LEGACY_CKPTS
def test_resume_from_a_previous_format_checkpoint_continues_its_schedule_and_ema(tmp_path, fashion_root, legacy):
    import train

    run = tmp_path / "runs" / "FashionMNIST" / "custom"
    run.mkdir(parents=True)
    (run / "last.pth").write_bytes(legacy.read_bytes())
    # no network flags: model, img_size 8, norm and augmentation come from the checkpoint
    code = train.main(["--resume", str(run / "last.pth"), "--max_epoch", "3", "--data_root", str(fashion_root),
                       "--batch_size", "32", "--num_workers", "0", "--path_to_save", str(tmp_path / "runs"), "--quiet",
                       "--device", "cpu", "--ema", "--ema_decay", "0.99"])
    assert code == 0
    resumed = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["step"] == 30 and resumed["ema"]["updates"] == 30
    assert resumed["scheduler"] == {"last_epoch": 30}
    assert resumed["model_kwargs"]["img_size"] == 8 and resumed["args"]["img_size"] == 8
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    # the extended schedule: epoch 3 ends at min_lr (the old run had ended there after epoch 2)
    assert resumed["history"][-1]["lr"] == pytest.approx(1e-6)


@LEGACY_CKPTS
def test_checkpoint_of_a_previous_format_exports_with_parity(tmp_path, legacy):
    import onnx

    ckpt = tmp_path / "run" / "last.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(legacy.read_bytes())
    out = tmp_path / "legacy.onnx"
    proc = run_main("export.py", "--weights", str(ckpt), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "max |diff| vs PyTorch" in proc.stdout
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["model_name"] == "custom" and json.loads(props["classes"])[9] == "Ankle boot"


@LEGACY_CKPTS
def test_resume_with_a_contradicting_network_flag_is_one_line_exit_2(tmp_path, fashion_root, legacy):
    run = tmp_path / "FashionMNIST" / "custom"
    run.mkdir(parents=True)
    (run / "last.pth").write_bytes(legacy.read_bytes())
    before = (run / "last.pth").read_bytes()
    proc = run_main("train.py", "--resume", str(run / "last.pth"), "--img_size", "28", "--max_epoch", "3",
                    "--data_root", str(fashion_root), "--path_to_save", str(tmp_path), "--quiet", "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--img_size 28 (the checkpoint has 8)" in lines[0] and "Traceback" not in proc.stderr
    assert (run / "last.pth").read_bytes() == before
