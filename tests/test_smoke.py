"""The trained_run fixture itself: train.py on synthetic Fashion-MNIST learns and writes every run file."""

import csv


def test_trained_run_writes_files_and_learns(trained_run):
    for name in ("best.pth", "last.pth", "classes.txt", "args.json", "results.csv", "results.png"):
        assert (trained_run / name).is_file(), name
    rows = list(csv.DictReader(open(trained_run / "results.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["val_acc1"]) > 0.5  # 10 classes: chance is 0.1
