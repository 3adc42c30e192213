"""eval.py's per-class precision, recall, F1, their macro/weighted averages and balanced accuracy: the JSON fields
equal a scikit-learn-style hand computation from the same report's confusion matrix, and the printed table shows them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_fashion_root, synthetic_fashion_images, write_idx

import eval as eval_script
from utils.data.fashion_mnist import FASHION_MNIST_CLASSES
from utils.evaluation.report import class_metrics_text


def sklearn_style(cm: np.ndarray) -> dict:
    """precision_recall_fscore_support(average=None / 'macro' / 'weighted', zero_division=0) and
    balanced_accuracy_score, written out from the confusion matrix (rows = true class, columns = predicted)."""
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(0).astype(float), cm.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    out = {"support": support, "balanced_accuracy": recall[support > 0].mean()}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[name] = values
        out[f"{name}_macro"] = values.mean()
        out[f"{name}_weighted"] = (values * support).sum() / support.sum()
    return out


def imperfect_test_set(root) -> None:
    """A test split the fixture's model cannot get all right, with unequal supports: a quarter of the labels are wrong
    (shifted by one class), class 3 keeps 4 of its own images, and the class-9 images are labelled 0, so class 9 has no
    image but is still predicted (precision 0, left out of balanced accuracy, as scikit-learn does)."""
    make_fashion_root(root)
    images, labels = synthetic_fashion_images(200, seed=7)
    labels = labels.astype(int)
    keep = np.ones(len(labels), bool)
    keep[np.flatnonzero(labels == 3)[4:]] = False
    labels[::4] = (labels[::4] + 1) % 10
    labels[labels == 9] = 0
    raw = root / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", images[keep])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[keep].astype(np.uint8))


def test_eval_json_class_metrics_equal_hand_computation(tmp_path, trained_ckpt, capsys):
    out = tmp_path / "custom.json"
    imperfect_test_set(tmp_path / "data")
    assert eval_script.main(["--weights", str(trained_ckpt), "--data_root", str(tmp_path / "data"), "--output", str(out),
                             "--speed_repeats", "0", "--num_workers", "0", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    cm = np.array(report["confusion_matrix"])
    classes = report["classes"]
    assert classes == FASHION_MNIST_CLASSES and cm.sum() == report["num_images"]
    expected = sklearn_style(cm)
    # a real mix: mistakes, unequal supports and a class without images, so every average differs
    assert 0.5 < report["acc1"] < 0.9 and cm[9].sum() == 0 and cm[:, 9].sum() > 0 and len(set(cm.sum(1).tolist())) >= 3
    values = [report[k] for k in ("precision_macro", "precision_weighted", "recall_macro", "f1_macro", "f1_weighted",
                                  "balanced_accuracy")]
    assert len({round(v, 6) for v in values}) == len(values), values
    assert report["precision"] == "fp32"  # the format's field is untouched by the per-class metrics
    for name in ("precision", "recall", "f1"):
        per_class = report[f"per_class_{name}"]
        assert list(per_class) == classes
        assert [per_class[c] for c in classes] == pytest.approx(expected[name], abs=1e-6), name
        assert report[f"{name}_macro"] == pytest.approx(expected[f"{name}_macro"], abs=1e-6), name
        assert report[f"{name}_weighted"] == pytest.approx(expected[f"{name}_weighted"], abs=1e-6), name
    assert [report["support"][c] for c in classes] == expected["support"].astype(int).tolist()
    assert report["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"], abs=1e-6)
    assert report["recall_weighted"] == pytest.approx(report["acc1"], abs=1e-6)  # weighted recall is accuracy
    # the printed summary: one row per class and the two averages, as the JSON says (4 decimals)
    assert "class" in printed and "precision  recall     f1  support" in printed
    for c in classes:
        row = next(line for line in printed.splitlines() if line.startswith(c + " ") and "  " in line)
        numbers = row[len(c):].split()
        assert [float(v) for v in numbers[:3]] == pytest.approx(
            [report["per_class_precision"][c], report["per_class_recall"][c], report["per_class_f1"][c]], abs=5e-5)
        assert int(numbers[3]) == report["support"][c]
    macro = next(line for line in printed.splitlines() if line.startswith("macro avg"))
    assert float(macro.split()[4]) == pytest.approx(report["f1_macro"], abs=5e-5)
    assert f"balanced accuracy {report['balanced_accuracy']:.4f}" in printed


def test_class_table_lists_the_lowest_f1_classes_when_there_are_many():
    classes = [f"c{i}" for i in range(30)]
    f1 = {c: i / 30 for i, c in enumerate(classes)}
    metrics = {"per_class_precision": f1, "per_class_recall": f1, "per_class_f1": f1, "support": dict.fromkeys(classes, 2),
               **{f"{m}_{a}": 0.5 for m in ("precision", "recall", "f1") for a in ("macro", "weighted")},
               "balanced_accuracy": 0.5}
    text = class_metrics_text(metrics, classes, max_rows=5)
    rows = [line.split()[0] for line in text.splitlines()[1:6]]
    assert rows == ["c0", "c1", "c2", "c3", "c4"] and "25 more classes" in text
    assert text.splitlines()[-3].startswith("macro avg") and text.splitlines()[-2].split()[-1] == "60"
