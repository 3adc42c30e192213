"""scripts/plot_recipes.py on the committed recipe evidence: the chart is written, the table reads results.csv."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_time_to_accuracy_chart_and_table_come_from_the_recipes_results(tmp_path):
    out = tmp_path / "tta.png"
    done = subprocess.run([sys.executable, "scripts/plot_recipes.py", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size[0] >= 600
    for folder in sorted((ROOT / "docs" / "recipes").iterdir()):
        with open(folder / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        best = max(100 * float(r["val_acc1"]) for r in rows if r.get("val_acc1"))
        minutes = sum(float(r["seconds"]) for r in rows) / 60
        assert f"| {folder.name} |" in done.stdout
        assert f"{best:.2f}" in done.stdout and f"{minutes:.1f}" in done.stdout


def test_an_empty_recipes_folder_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "scripts/plot_recipes.py", "--recipes", str(tmp_path), "--out",
                           str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "no recipe results" in done.stderr
    assert not (tmp_path / "x.png").exists()
