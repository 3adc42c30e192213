"""Time-to-accuracy of the recipes: test acc@1 against training minutes, every recipe on one chart.

Reads docs/recipes/<recipe>/results.csv (written by train.py) and args.json, and writes docs/images/time_to_accuracy.png
plus a markdown table of each recipe's best and final acc@1 and minutes. Minutes are the cumulative `seconds` column:
training steps only, validation excluded (validation of the 10,000 test images adds a few seconds per epoch).

Example:
  python scripts/plot_recipes.py                      # docs/recipes/* -> docs/images/time_to_accuracy.png
  python scripts/plot_recipes.py --recipes docs/recipes --out docs/images/time_to_accuracy.png --targets 93.5 95 96
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import cli  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.io import markdown_table  # noqa: E402
from utils.plots import plt, save_figure  # noqa: E402


def load_recipe(folder: Path) -> dict | None:
    """{"name", "minutes", "acc1", "args"} of one recipe folder, or None when it holds no results.csv."""
    path = folder / "results.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    minutes, acc, elapsed = [], [], 0.0
    for row in rows:
        elapsed += float(row["seconds"]) / 60.0
        if row.get("val_acc1"):
            minutes.append(elapsed)
            acc.append(100.0 * float(row["val_acc1"]))
    args = json.loads((folder / "args.json").read_text()) if (folder / "args.json").is_file() else {}
    return {"name": folder.name, "minutes": minutes, "acc1": acc, "args": args, "total_minutes": elapsed}


def describe(recipe: dict) -> str:
    """Legend label: the recipe folder, then the network and input size it trained (from args.json)."""
    args = recipe["args"]
    size = f", {args['img_size']} px" if args.get("img_size") else ""
    return f"{recipe['name']} ({args.get('model', '?')}{size}): best {max(recipe['acc1']):.2f} %"


def plot(recipes: list[dict], out: Path, targets: list[float]) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in recipes:
        ax.plot(r["minutes"], r["acc1"], marker="o", markersize=3, label=describe(r))
    top = max(max(r["acc1"]) for r in recipes)
    low = max(80.0, min(min(r["acc1"]) for r in recipes) - 1)
    ax.set_ylim(low, max([top, *targets]) + 0.5)  # every target line inside the axes, reached or not
    for t in targets:
        ax.axhline(t, color="gray", linestyle=":", linewidth=1)
        ax.annotate(f"{t:g} %", xy=(1.0, t), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8, color="gray")
    ax.set_xlabel("training minutes (train steps only, validation excluded)")
    ax.set_ylabel("test acc@1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Fashion-MNIST: test acc@1 against training time")
    return save_figure(fig, out)


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--recipes", default="docs/recipes", help="folder with one sub-folder per recipe (results.csv, args.json)")
    p.add_argument("--out", default="docs/images/time_to_accuracy.png", help="PNG to write")
    p.add_argument("--targets", type=cli.in_range(0, 100, low_open=True), nargs="*", default=[93.5, 95.0, 96.0],
                   help="acc@1 targets drawn as lines (%%)")
    args = p.parse_args(argv)
    folders = sorted(q for q in Path(args.recipes).iterdir() if q.is_dir()) if Path(args.recipes).is_dir() else []
    recipes = [r for r in (load_recipe(q) for q in folders) if r and r["acc1"]]
    if not recipes:
        raise InputError(f"no recipe results in {args.recipes}/<recipe>/results.csv: train with --path_to_save first")
    print(f"wrote {plot(recipes, Path(args.out), args.targets)}")
    rows = [[r["name"], r["args"].get("model", ""), f"{max(r['acc1']):.2f}", f"{r['acc1'][-1]:.2f}", f"{r['total_minutes']:.1f}"]
            for r in recipes]
    print(markdown_table(["recipe", "model", "best test acc@1 (%)", "final test acc@1 (%)", "training minutes"], rows))
    return 0


if __name__ == "__main__":
    cli.run(main)
