"""Fast-training techniques measured one at a time: the table of what pays for a speed run on this CPU.

Each row is the recipe (--recipe, default the SpeedNet 10-minute recipe) with one change, trained as a real
`train.py` process on the real data for the same --epochs (a fixed length, --time_budget 0, so the LR schedule
is fitted to the same epochs in every row and only the technique differs). The table gives, per row: the epoch and
the minutes of training steps (results.csv's seconds) at which validation acc@1 first reached --target, the
final acc@1 with and without the recipe's flip TTA (so TTA itself is the difference of two columns), train acc@1
(under- or overfitting), training images/s and the process's wall minutes. A single seed per row: differences below
~0.2 points are within run-to-run noise (state it when quoting).

Examples:
  python benchmarks/bench_techniques.py                         # every technique, 5 epochs each (~35 min on 2 cores)
  python benchmarks/bench_techniques.py --only recipe no_ema --epochs 3
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import command_line, machine_info, table, write_json  # noqa: E402
from utils import cli  # noqa: E402
from utils.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# id -> (what the row shows, the recipe keys it changes)
TECHNIQUES: dict[str, tuple[str, dict]] = {
    "recipe": ("the recipe as it is", {}),
    "fp32_nchw": ("fp32 + NCHW (the old default) instead of --precision/--memory_format auto", {"precision": "fp32",
                                                                                               "memory_format": "nchw"}),
    "no_whiten": ("no whitened stem (random init of the first layer)", {"whiten_stem": False}),
    "no_smoothing": ("no label smoothing (0.2 -> 0)", {"label_smoothing": 0.0}),
    "no_ema": ("no EMA of the weights", {"ema": False}),
    "no_translate": ("no 2 px translation (random_crop_padding 0)", {"random_crop_padding": 0}),
    "batch_128": ("batch 128 instead of 256", {"batch_size": 128}),
    "batch_512": ("batch 512 instead of 256", {"batch_size": 512}),
    "linear_sched": ("linear (triangular) decay instead of cosine", {"sched": "linear"}),
    "compile": ("torch.compile of the fixed-shape net", {"compile": True}),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--recipe", default="recipes/speednet_10min.yaml", help="the recipe every row starts from")
    p.add_argument("--only", nargs="+", choices=list(TECHNIQUES), default=list(TECHNIQUES), metavar="ID",
                   help=f"the rows to run: {', '.join(TECHNIQUES)}")
    p.add_argument("--epochs", type=cli.positive(), default=5, help="epochs of every row (the same LR schedule length)")
    p.add_argument("--target", type=cli.in_range(0.0, 1.0), default=0.93, help="the validation acc@1 to reach")
    p.add_argument("--data_root", default="data", help="where the dataset is (Fashion-MNIST: <root>/FashionMNIST/raw)")
    p.add_argument("--workdir", default="results/benchmarks/techniques", help="the rows' run directories")
    p.add_argument("--out", default="results/benchmarks/techniques.json", help="the JSON of every row")
    return p


def run_row(key: str, recipe: dict, args: argparse.Namespace) -> dict:
    """One train.py process: the recipe with the row's change, for --epochs epochs; its results.csv read back."""
    label, change = TECHNIQUES[key]
    config = {**recipe, **change, "max_epoch": args.epochs, "time_budget": 0, "tensorboard": False,
              "path_to_save": str(Path(args.workdir)), "name": key}
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{key}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path), "--data_root", args.data_root,
                           "--exist_ok", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{key}: train.py failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    run_dir = next(line.split(":", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith("run_dir:"))
    with open(ROOT / run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    reached = next((i for i, r in enumerate(rows) if r.get("val_acc1") and float(r["val_acc1"]) >= args.target), None)
    seconds = [float(r["seconds"]) for r in rows]
    counted = re.search(r"(\d+) train / \d+ val images", done.stdout)
    used = json.loads((ROOT / run_dir / "args.json").read_text()).get("precision_used") or {}
    return {"id": key, "technique": label, "change": change, "epochs": len(rows),
            "epochs_to_target": reached + 1 if reached is not None else None,
            "minutes_to_target": round(sum(seconds[:reached + 1]) / 60, 2) if reached is not None else None,
            "train_minutes": round(sum(seconds) / 60, 2), "wall_minutes": round(wall / 60, 2),
            "val_acc1": float(last["val_acc1"]), "val_acc1_tta": float(last["val_acc1_tta"]) if last.get("val_acc1_tta") else None,
            "best_val_acc1": max(float(r["val_acc1"]) for r in rows if r.get("val_acc1")),
            "train_acc1": float(last["train_acc1"]), "images_per_s": round(int(counted[1]) * len(rows) / sum(seconds)) if counted else None,
            "precision_chosen": f"{used.get('precision')} {used.get('memory_format')}", "run_dir": run_dir}


def technique_table(rows: list[dict], target: float) -> str:
    """The markdown table; accuracies as percentages with two decimals (the rows differ by tenths of a point)."""
    def pct(value: float | None) -> str | None:
        return None if value is None else f"{100 * value:.2f}"

    shown = [{**r, **{k: pct(r[k]) for k in ("val_acc1", "val_acc1_tta", "best_val_acc1", "train_acc1")}} for r in rows]
    return table(shown, [("technique", "technique"), ("epochs_to_target", f"epochs to {100 * target:g} %"),
                         ("minutes_to_target", "train min to target"), ("val_acc1", "final acc@1 %"),
                         ("val_acc1_tta", "with flip-TTA %"), ("best_val_acc1", "best epoch %"),
                         ("train_acc1", "train acc@1 %"), ("images_per_s", "train img/s"),
                         ("train_minutes", "train min"), ("wall_minutes", "wall min")])


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        recipe = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"--recipe {args.recipe}: cannot read it ({e.strerror or e})") from None
    if not isinstance(recipe, dict):
        raise InputError(f"--recipe {args.recipe}: expected a mapping of train.py flag names to values")
    rows = []
    for key in args.only:
        print(f"{key}: {TECHNIQUES[key][0]} ...", flush=True)
        rows.append(run_row(key, recipe, args))
    command = command_line("bench_techniques.py", argv)
    print(f"\n{args.recipe}, {args.epochs} epochs per row, target val acc@1 {args.target}\n")
    print(technique_table(rows, args.target))
    print(f"\n{command}")
    out = write_json(args.out, {"command": command, "recipe": recipe, "epochs": args.epochs, "target": args.target,
                                "machine": machine_info(torch.device("cpu")), "rows": rows})
    print(f"rows and machine: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
