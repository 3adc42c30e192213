"""A photo-folder training epoch: this toolkit out of the box against its old defaults and Ultralytics `yolo classify`,
on the same folder, network, image size, batch and machine, in one run.

Rows (each a real training process, its first --epochs epochs, training seconds of epochs 2..E averaged, so start-up,
dataset scanning and the first epoch's one-time costs are left out of every row alike):
- Ultralytics: its `ClassificationTrainer` (what `yolo classify train` runs) with its own defaults for everything not
  named here (augmentation, workers, optimizer), on a ResNet18 built by its `TorchVision` module (torchvision's
  resnet18, random init: no ImageNet weights offline) under its `Classify` head (a 1x1 convolution to 1280
  channels, pooling, a linear layer: 1.3 % more MACs than torchvision's fc head at 224 px).
- this toolkit with the old defaults: `train.py --precision fp32 --memory_format nchw` (what every run did before
  --precision auto), the rest default.
- this toolkit out of the box: `train.py` with no speed flags (precision and memory format chosen by timing, the
  decode-once cache when it pays). Both train.py rows run as a user starts them (its default --max_epoch, which
  --precision auto weighs against the probe's cost) and are stopped gracefully after --epochs epochs.
Epoch seconds are measured the same way on both sides: from the start of an epoch's first batch fetch to its last
optimizer step (train.py's results.csv `seconds`; Ultralytics' on_train_epoch_start / on_train_epoch_end callbacks).

Ultralytics must not be installed next to this toolkit's torch by pip's resolver (it may pull another torch), so it
runs in the interpreter --yolo_python names, e.g. a virtual environment made like this:
  python -m venv /tmp/ulvenv && /tmp/ulvenv/bin/pip install ultralytics
  python benchmarks/bench_vs_ultralytics.py --yolo_python /tmp/ulvenv/bin/python
Without --yolo_python the Ultralytics row is left out (the other two still run).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import command_line, machine_info, table, write_json  # noqa: E402
from benchmarks.photo_folder import make_photo_folder  # noqa: E402
from utils import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# what runs inside Ultralytics' interpreter: its trainer, timed by its own callbacks; one JSON line on stdout
YOLO_DRIVER = textwrap.dedent("""
    import json, sys, time
    from ultralytics.models.yolo.classify import ClassificationTrainer
    settings = json.loads(sys.argv[1])
    trainer = ClassificationTrainer(overrides=settings)
    marks, epochs = {}, []
    trainer.add_callback("on_train_epoch_start", lambda t: marks.__setitem__("start", time.perf_counter()))
    trainer.add_callback("on_train_epoch_end", lambda t: epochs.append(time.perf_counter() - marks["start"]))
    trainer.train()
    top1 = (trainer.metrics or {}).get("metrics/accuracy_top1")
    import ultralytics
    print("BENCH_JSON " + json.dumps({"epoch_s": epochs, "val_acc1": top1, "version": ultralytics.__version__,
                                      "images": len(trainer.train_loader.dataset)}))
""")


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--yolo_python", default=None, help="a Python interpreter with ultralytics installed (no row without)")
    p.add_argument("--images", type=cli.positive(), default=1000, help="JPEGs of 500x375 px in the folder (10 classes)")
    p.add_argument("--val_fraction", type=cli.in_range(0.0, 1.0, low_open=True, high_open=True), default=0.15,
                   help="held out per class")
    p.add_argument("--epochs", type=cli.in_range(2, 1000, kind=int), default=3, help="epochs per row (epoch 1 untimed)")
    p.add_argument("--img_size", type=cli.positive(), default=224, help="training crop size (imgsz)")
    p.add_argument("--batch_size", type=cli.positive(), default=32, help="images per batch")
    p.add_argument("--workdir", default="results/benchmarks/vs_ultralytics", help="the folder and the rows' runs")
    p.add_argument("--out", default="results/benchmarks/vs_ultralytics.json", help="the JSON of every row")
    return p


def ours(label: str, root: Path, args: argparse.Namespace, flags: list[str], name: str) -> dict:
    """One train.py process on the folder as a user would start it (train.py's own --max_epoch, so --precision auto
    sees the length of a real run), stopped with SIGTERM (a graceful stop) once --epochs epochs are in its
    results.csv; epoch seconds from that file."""
    run_dir = Path(args.workdir).resolve() / "runs" / root.name / name
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = [sys.executable, str(ROOT / "train.py"), "--dataset", str(root), "--model", "resnet18", "--img_size",
            str(args.img_size), "--batch_size", str(args.batch_size), "--path_to_save", str(run_dir.parents[1]),
            "--name", name, "--quiet", *flags]
    results = run_dir / "results.csv"
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        while proc.poll() is None:
            if results.is_file() and len(results.read_text().splitlines()) > args.epochs:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.5)
        stdout, stderr = proc.communicate()
    if proc.returncode not in (0, 130):  # 130: stopped by the signal, as intended
        raise RuntimeError(f"{label}: train.py failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))[:args.epochs]
    used = json.loads((run_dir / "args.json").read_text()).get("precision_used") or {}
    pipeline = next((line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith("data pipeline:")),
                    None)
    return {"row": label, "flags": " ".join(flags) or "(none)", "epoch_s": [float(r["seconds"]) for r in rows],
            "val_acc1": float(rows[-1]["val_acc1"]), "setup": f"{used.get('precision')} {used.get('memory_format')}"
            f" ({used.get('chosen_by')}); {pipeline}", "run_dir": str(run_dir)}


def ultralytics(root: Path, args: argparse.Namespace) -> dict:
    """Ultralytics' ClassificationTrainer on the same folder, in its own interpreter."""
    model_yaml = Path(args.workdir) / "resnet18-cls.yaml"
    model_yaml.write_text("nc: 10\nbackbone:\n  - [-1, 1, TorchVision, [512, resnet18, None, True, 2]]\n"
                          "head:\n  - [-1, 1, Classify, [nc]]\n", encoding="utf-8")
    settings = {"model": str(model_yaml.resolve()), "data": str(root.resolve()), "imgsz": args.img_size,
                "batch": args.batch_size, "epochs": args.epochs, "device": "cpu", "pretrained": False, "plots": False,
                "project": str((Path(args.workdir) / "ultralytics").resolve()), "name": "run", "exist_ok": True}
    done = subprocess.run([args.yolo_python, "-c", YOLO_DRIVER, json.dumps(settings)], capture_output=True, text=True,
                          cwd=Path(args.workdir).resolve())
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"Ultralytics failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-3000:]}")
    result = json.loads(line.removeprefix("BENCH_JSON "))
    return {"row": f"Ultralytics {result['version']} ClassificationTrainer", "flags": "its defaults",
            "epoch_s": result["epoch_s"], "val_acc1": result["val_acc1"], "setup": "fp32 (no AMP on a CPU)",
            "settings": settings}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "folder"
    folder = make_photo_folder(root, args.images, args.val_fraction)
    rows = []
    if args.yolo_python:
        print("Ultralytics ...", flush=True)
        rows.append(ultralytics(root, args))
    print("this toolkit, old defaults ...", flush=True)
    rows.append(ours("this toolkit, old defaults (fp32, NCHW)", root, args, ["--precision", "fp32", "--memory_format", "nchw"],
                     "old_defaults"))
    print("this toolkit, out of the box ...", flush=True)
    rows.append(ours("this toolkit, out of the box", root, args, [], "out_of_the_box"))
    for row in rows:
        timed = row["epoch_s"][1:]
        row["epoch_s_mean"] = sum(timed) / len(timed)
    slowest = max(row["epoch_s_mean"] for row in rows)
    for row in rows:
        row["x_slowest"] = slowest / row["epoch_s_mean"]
    command = command_line("bench_vs_ultralytics.py", argv)
    n_train = sum(1 for _ in (root / "train").rglob("*.jpg"))
    print(f"\n{n_train} training JPEGs of 500x375 px ({folder['spec']['images']} in all), ResNet18 from scratch at "
          f"{args.img_size} px, batch {args.batch_size}, {args.epochs} epochs per row, epochs 2..{args.epochs} timed\n")
    print(table(rows, [("row", "row"), ("flags", "flags"), ("setup", "setup"), ("epoch_s_mean", "epoch s"),
                       ("x_slowest", "x slowest"), ("val_acc1", f"val acc@1 after {args.epochs} epochs")]))
    print(f"\n{command}")
    out = write_json(args.out, {"command": command, "machine": machine_info(torch.device("cpu")), "rows": rows,
                                "folder": folder, "measured_at": time.strftime("%Y-%m-%d %H:%M")})
    print(f"rows and machine: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
