"""Training and eval loops: gradient accumulation equals a big batch, LR per step, metrics equal a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard.summary import compute_curve

from models import build_model, model_kwargs
from utils.evaluation.loop import class_metrics, evaluate, per_class_accuracy
from utils.training.engine import TrainState, train_one_epoch
from utils.training.schedule import WarmupSchedule

CPU = torch.device("cpu")


def _bn_free_cnn(seed: int = 0) -> nn.Module:
    """FashionCNN without BatchNorm (whose batch statistics depend on the batch size) and without dropout."""
    torch.manual_seed(seed)
    model = build_model("custom", 4, **model_kwargs(16, "none"))
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _train(model: nn.Module, data: TensorDataset, batch_size: int, accumulation: int, steps_per_epoch: int,
           epochs: int = 1) -> TrainState:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    schedule = WarmupSchedule(opt, steps_per_epoch=steps_per_epoch, max_epoch=epochs, wp_epoch=1, base_lr=0.05, min_lr=1e-3)
    state = TrainState(optimizer=opt, scheduler=schedule, accumulation=accumulation)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for epoch in range(epochs):
        train_one_epoch(model, loader, nn.CrossEntropyLoss(), state, CPU, epoch + 1, show_progress=False)
    return state


@pytest.fixture(scope="module")
def tiny_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(22, 3, 16, 16, generator=g), torch.randint(0, 4, (22,), generator=g))


def test_accumulation_equals_one_big_batch_including_partial_last_window(tiny_data):
    # 22 samples: batches of 2 -> 11 micro-batches -> windows of 4 micro-batches: 4 + 4 + 3 (partial)
    # reference: batches of 8 -> 8 + 8 + 6 samples. Same three optimizer steps on the same samples.
    accumulated, reference = _bn_free_cnn(), _bn_free_cnn()
    s_acc = _train(accumulated, tiny_data, batch_size=2, accumulation=4, steps_per_epoch=3, epochs=2)
    s_ref = _train(reference, tiny_data, batch_size=8, accumulation=1, steps_per_epoch=3, epochs=2)
    assert s_acc.step == s_ref.step == 6
    start = _bn_free_cnn()
    moved = max((a - b).abs().max().item() for a, b in zip(reference.parameters(), start.parameters()))
    assert moved > 1e-3  # the weights really changed
    for (name, a), b in zip(accumulated.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=name)


def test_optimizer_steps_use_the_scheduled_lr(tiny_data):
    model = _bn_free_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    schedule = WarmupSchedule(opt, steps_per_epoch=3, max_epoch=2, wp_epoch=1, base_lr=0.01, min_lr=0.001)
    seen = []
    original_step = opt.step

    def recording_step(*args, **kwargs):
        seen.append(opt.param_groups[0]["lr"])
        return original_step(*args, **kwargs)

    opt.step = recording_step
    state = TrainState(optimizer=opt, scheduler=schedule, accumulation=4)
    loader = DataLoader(tiny_data, batch_size=2, shuffle=False)
    stats = [train_one_epoch(model, loader, nn.CrossEntropyLoss(), state, CPU, e, show_progress=False) for e in (1, 2)]
    # warm-up 0.01/3, 0.02/3, 0.01; then cosine from 0.01 (step 3) to 0.001 (step 5, the last)
    assert seen == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01, 0.0055, 0.001], rel=1e-9)
    assert stats[-1]["lr"] == pytest.approx(0.001)
    assert all(math.isfinite(s["train_loss"]) and 0 <= s["train_acc1"] <= 1 for s in stats)


def test_train_one_epoch_reports_loss_and_accuracy_of_what_it_saw(tiny_data):
    model = _bn_free_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # LR 0 keeps the weights: compare with a plain forward
    schedule = WarmupSchedule(opt, steps_per_epoch=11, max_epoch=1, wp_epoch=0, base_lr=0.0, min_lr=0.0)
    stats = train_one_epoch(model, DataLoader(tiny_data, batch_size=2), nn.CrossEntropyLoss(),
                            TrainState(optimizer=opt, scheduler=schedule),
                            CPU, 1, show_progress=False)
    x, y = tiny_data.tensors
    with torch.no_grad():
        logits = model.eval()(x)
    assert stats["train_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert stats["train_acc1"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_evaluate_matches_a_hand_computation():
    g = torch.Generator().manual_seed(3)
    num_classes, n = 7, 45
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    model = nn.Linear(5, num_classes)
    stats = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=8), CPU, num_classes, show_progress=False,
                     return_predictions=True)
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    assert stats.num_images == n
    assert stats.loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert stats.acc1 == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert stats.acc5 == pytest.approx((top5 == y[:, None]).any(1).float().mean().item())
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for t, p in zip(y.tolist(), logits.argmax(1).tolist()):
        cm[t, p] += 1
    assert torch.equal(stats.confusion_matrix, cm)
    assert torch.equal(stats.predictions, logits.argmax(1))
    per_class = per_class_accuracy(cm, [str(i) for i in range(num_classes)])
    for i in range(num_classes):
        mask = y == i
        expected = (logits.argmax(1)[mask] == i).float().mean().item() if mask.any() else 0.0
        assert per_class[str(i)] == pytest.approx(expected)


def test_evaluate_caps_top5_at_the_number_of_classes():
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    stats = evaluate(nn.Linear(2, 3), DataLoader(TensorDataset(x, y), batch_size=4), CPU, 3, show_progress=False)
    assert stats.acc5 == 1.0  # top-3 of 3 classes always contains the target


def test_log_points_report_the_mean_gradient_norm_and_the_first_batch_once(tiny_data):
    model = _bn_free_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # LR 0 keeps the weights: every norm can be recomputed by hand
    schedule = WarmupSchedule(opt, steps_per_epoch=11, max_epoch=1, wp_epoch=0, base_lr=0.0, min_lr=0.0)
    points, first = [], []
    state = TrainState(optimizer=opt, scheduler=schedule, log_every=3, track_grad_norm=True,
                       on_log=lambda step, values: points.append((step, values)),
                       on_first_batch=lambda images, targets: first.append((images.clone(), targets.clone())))
    train_one_epoch(model, DataLoader(tiny_data, batch_size=2), nn.CrossEntropyLoss(), state, CPU, 1, show_progress=False)
    x, y = tiny_data.tensors
    norms = []
    for i in range(0, 22, 2):  # 11 batches of 2, one optimizer step each
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 2]), y[i:i + 2]).backward()
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
    assert [step for step, _ in points] == [3, 6, 9, 11]
    for (_, values), window in zip(points, ([0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10])):
        assert values["grad_norm"] == pytest.approx(np.mean([norms[i] for i in window]), rel=1e-5)
        assert values["images_per_s"] > 0
    assert len(first) == 1 and torch.equal(first[0][0], x[:2]) and torch.equal(first[0][1], y[:2])
    assert state.on_first_batch is None


def test_evaluate_collects_tensorboards_pr_counts_and_the_first_mistakes():
    g = torch.Generator().manual_seed(1)
    num_classes, n = 6, 203
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    model = nn.Linear(5, num_classes)
    stats = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=16), CPU, num_classes, show_progress=False,
                     pr_thresholds=127, keep_mistakes=10)
    with torch.no_grad():
        probs = model(x).softmax(1)
    curves = stats.pr_curves
    for c in range(num_classes):  # TensorBoard's own add_pr_curve computation, from all probabilities at once
        expected = compute_curve((y == c).numpy(), probs[:, c].numpy(), num_thresholds=127)
        for row, counts in enumerate((curves.tp, curves.fp, curves.tn, curves.fn)):
            assert np.array_equal(counts[c], expected[row]), (c, row)
        np.testing.assert_allclose(curves.precision[c], expected[4], rtol=1e-6)
        np.testing.assert_allclose(curves.recall[c], expected[5], rtol=1e-6)
    wrong = (probs.argmax(1) != y).nonzero().flatten()[:10]
    assert len(wrong) == 10
    mistakes = stats.mistakes
    assert torch.equal(mistakes.images, x[wrong]) and torch.equal(mistakes.targets, y[wrong])
    assert torch.equal(mistakes.predictions, probs.argmax(1)[wrong])
    torch.testing.assert_close(mistakes.confidence, probs.max(1).values[wrong])


def test_precision_recall_f1_and_balanced_accuracy_equal_a_hand_computation():
    # a known confusion matrix (rows: true class, columns: predicted): [[5, 2, 0], [0, 3, 1], [1, 0, 4]]
    pairs = [(0, 0)] * 5 + [(0, 1)] * 2 + [(1, 1)] * 3 + [(1, 2)] + [(2, 0)] + [(2, 2)] * 4
    y = torch.tensor([t for t, _ in pairs])
    logits = nn.functional.one_hot(torch.tensor([p for _, p in pairs]), 3).float()
    stats = evaluate(nn.Identity(), DataLoader(TensorDataset(logits, y), batch_size=4), CPU, 3, show_progress=False)
    assert stats.confusion_matrix.tolist() == [[5, 2, 0], [0, 3, 1], [1, 0, 4]]
    m = class_metrics(stats, ["a", "b", "c"])
    precision, recall = [5 / 6, 3 / 5, 4 / 5], [5 / 7, 3 / 4, 4 / 5]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    support = [7, 4, 5]
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        assert list(m[name].values()) == pytest.approx(values, rel=1e-6)
        assert m[f"{name}_macro"] == pytest.approx(sum(values) / 3, rel=1e-6)
        assert m[f"{name}_weighted"] == pytest.approx(sum(v * n for v, n in zip(values, support)) / 16, rel=1e-6)
    assert m["balanced_accuracy"] == pytest.approx(sum(recall) / 3, rel=1e-6)
    assert m["support"] == {"a": 7, "b": 4, "c": 5}
    assert list(m["recall"].values()) == pytest.approx(list(per_class_accuracy(stats.confusion_matrix, ["a", "b", "c"]).values()))
