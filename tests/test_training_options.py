"""Training options of the recipes: per-image auto-augment and crop padding in the tensor pipeline, Mixup/CutMix with
soft targets, the time budget, patience, flip TTA, and the CPU-aware precision choice."""

from __future__ import annotations

import csv
import json
import math
import re
import time

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import train
import utils.precision as precision
from utils.data.augment import Augment, batch_mixing, resolve_augment
from utils.data.batch_augment import augment_batch, padded_crop, sample_params
from utils.data.preprocess import Preprocess
from utils.evaluation.loop import evaluate
from utils.training.engine import TrainState, train_one_epoch
from utils.training.schedule import WarmupSchedule

CPU = torch.device("cpu")
PRE = Preprocess.for_size(28)


def _rows(run_dir):
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("auto", ["ra", "ta_wide", "augmix", "autoaugment"])
def test_auto_augment_draws_per_image_and_repeats_with_the_seed(auto):
    # one image repeated 16 times: a batch-wide draw would give 16 equal outputs
    image = torch.from_numpy(__import__("conftest").synthetic_fashion_images(1, 0)[0])[None].expand(16, 1, 28, 28).contiguous()
    augment = resolve_augment("none", 28, auto_augment=auto)

    def run(seed):
        torch.manual_seed(seed)
        return augment_batch(image, sample_params(16, 28, 28, augment=augment, out_size=28), PRE, augment)

    out = run(0)
    distinct = {tuple(x.flatten()[::7].tolist()) for x in out}
    assert len(distinct) >= 8, f"{auto}: only {len(distinct)} different results for 16 copies of one image"
    assert torch.equal(out, run(0))  # same seed, same batch
    assert not torch.equal(out, run(1))


def test_crop_padding_is_torchvision_random_crop_per_image():
    torch.manual_seed(0)
    augment = resolve_augment("none", 28, crop_padding=3)
    params = sample_params(4000, 28, 28, augment=augment, out_size=28)
    assert params.shift.min() == 0 and params.shift.max() == 6  # corners uniform over 0..2P, per axis
    counts = torch.bincount(params.shift.flatten(), minlength=7).double() / params.shift.numel()
    assert (counts - 1 / 7).abs().max() < 0.02
    images = torch.rand(5, 3, 28, 28) * 255
    out = padded_crop(images, params.shift[:5], 3)
    for k in range(5):  # torchvision's RandomCrop with padding: pad with zeros, crop at (top, left)
        top, left = params.shift[k].tolist()
        expected = TF.crop(TF.pad(images[k], [3]), top, left, 28, 28)
        assert torch.equal(out[k], expected)


def test_mixup_cutmix_targets_sum_to_one_and_the_loss_is_the_mixed_cross_entropy():
    num_classes = 5
    images = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8) % num_classes
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        mix = batch_mixing(mixup, cutmix, num_classes)
        torch.manual_seed(3)
        mixed, soft = mix(images, labels)
        assert soft.shape == (8, num_classes) and torch.allclose(soft.sum(1), torch.ones(8))
        # every row mixes its own label with the label of the batch rolled by one (torchvision's pairing)
        lam = soft[torch.arange(8), labels]
        partner = labels.roll(1)
        same = partner == labels
        assert torch.allclose(lam[~same] + soft[torch.arange(8), partner][~same], torch.ones(int((~same).sum())))
        logits = torch.randn(8, num_classes)
        expected = (lam * nn.functional.cross_entropy(logits, labels, reduction="none")
                    + (1 - lam) * nn.functional.cross_entropy(logits, partner, reduction="none")).mean()
        assert nn.CrossEntropyLoss()(logits, soft).item() == pytest.approx(expected.item(), rel=1e-5)
    assert batch_mixing(0.0, 0.0, num_classes) is None


def test_train_loop_with_mixing_reports_the_soft_target_loss_and_dominant_label_accuracy():
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: compare with a plain forward
    state = TrainState(optimizer=opt, scheduler=WarmupSchedule(opt, steps_per_epoch=3, max_epoch=1, wp_epoch=0, base_lr=0.0,
                                                                min_lr=0.0), mix=batch_mixing(1.0, 0.0, 3))
    batches = [(x[4 * k:4 * k + 4], y[4 * k:4 * k + 4]) for k in range(3)]  # a list: no DataLoader seed draw
    torch.manual_seed(7)
    stats = train_one_epoch(model, batches, nn.CrossEntropyLoss(), state, CPU, 1, False)
    torch.manual_seed(7)
    losses, correct = [], 0
    for images, labels in batches:
        images, soft = state.mix(images, labels)
        with torch.no_grad():
            logits = model(images)
        losses.append(nn.CrossEntropyLoss()(logits, soft).item())
        correct += int((logits.argmax(1) == soft.argmax(1)).sum())
    assert stats["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert stats["train_acc1"] == pytest.approx(correct / 12)


def test_flip_tta_is_the_mean_of_the_image_and_mirror_logits():
    torch.manual_seed(1)
    x, y = torch.randn(10, 3, 12, 12), torch.randint(0, 4, (10,))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(400, 4))
    stats = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), CPU, 4, show_progress=False, tta="flip",
                     return_predictions=True)
    with torch.no_grad():
        logits = (model(x) + model(x.flip(-1))) / 2
        plain = model(x)
    assert stats.loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert torch.equal(stats.predictions, logits.argmax(1))
    assert not torch.allclose(logits, plain)  # the mirror really changes the logits


def test_patience_stops_at_the_right_evaluation(tmp_path, small_fashion_root, capsys):
    # a learning rate of 1e-12 and no BatchNorm statistics leave the network as it is: acc@1 never improves after the
    # first evaluation
    code = train.main(["--model", "custom", "--img_size", "28", "--max_epoch", "10", "--patience", "2", "--base_lr", "1e-12",
                       "--norm_type", "none",
                       "--wp_epoch", "0", "--batch_size", "64", "--num_workers", "0", "--data_root", str(small_fashion_root),
                       "--path_to_save", str(tmp_path), "--quiet", "--device", "cpu"])
    assert code == 0
    rows = _rows(tmp_path / "FashionMNIST" / "custom")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # evaluations 2 and 3 did not improve on 1
    assert "early stop after epoch 3" in capsys.readouterr().out


PLAN = re.compile(r"time budget [\d.]+ min: (?:epoch (\d+) took|epochs \d+-(\d+) took) ([\d.]+) s.*?, ([\d.]+) s spent"
                  r"(?:, ([\d.]+) s kept for the final TTA evaluation)?: (?:all (\d+) epochs|.*?trains (\d+) of the)")


def test_time_budget_plans_the_whole_run_inside_the_budget(tmp_path, fashion_root, capsys):
    """train.py under --time_budget: the first plan after epoch 1, the second after epoch 2, each dividing what is left
    of the budget (the wall time since train.py started, less the final TTA evaluation's reserve) by the pace; the
    run's epochs, args.json, checkpoint and LR schedule follow the plan and the whole run ends near the budget."""
    budget_min = 0.15  # 9 s; an epoch of 320 images takes well under a second
    started = time.perf_counter()
    code = train.main(["--model", "custom", "--img_size", "28", "--max_epoch", "1000", "--time_budget", str(budget_min),
                       "--batch_size", "32", "--num_workers", "0", "--data_root", str(fashion_root), "--tta", "flip",
                       "--precision", "fp32", "--memory_format", "nchw",
                       "--path_to_save", str(tmp_path), "--quiet", "--device", "cpu"])
    wall = time.perf_counter() - started
    assert code == 0
    out = capsys.readouterr().out
    plans = [(int(m[1] or m[2]), float(m[3]), float(m[4]), float(m[5] or 0), int(m[6] or m[7]))
             for m in PLAN.finditer(out)]
    assert [p[0] for p in plans[:2]] == [1, 2], out
    for epoch, pace, spent, tail, chosen in plans[:2]:
        # printed to 1 ms: the count is what is left divided by a pace within 0.5 ms of the printed one
        assert tail > 0  # --tta flip: twice the validation's time is kept for the final TTA pass
        assert chosen in {epoch + int(max(budget_min * 60 - spent - tail - d1, 0) // (pace + d2))
                          for d1 in (-0.002, 0, 0.002) for d2 in (-0.0005, 0, 0.0005)}, (epoch, pace, spent, tail, chosen)
    assert all(later[4] < earlier[4] for earlier, later in zip(plans[1:], plans[2:]))  # later plans only shorten
    chosen = plans[-1][4]
    run = tmp_path / "FashionMNIST" / "custom"
    rows = _rows(run)
    assert 2 < len(rows) == chosen < 1000
    ckpt = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["max_epoch"] == chosen  # recorded
    assert json.loads((run / "args.json").read_text())["max_epoch"] == chosen
    assert float(rows[-1]["lr"]) == pytest.approx(1e-6)  # the schedule was fitted: it ends at min_lr on the last epoch
    assert rows[-1]["val_acc1_tta"] != ""
    assert wall < budget_min * 60 + 3  # the whole run, start-up and the TTA pass included, give or take an epoch


def test_time_budget_shortens_a_run_when_the_machine_slows_down():
    """A 10-minute budget on a machine that slows from 40 s to 70 s per epoch after epoch 5 (what a shared VM did to
    the SpeedNet recipe): planning only after epochs 1 and 2 ran 13.5 minutes; planning after each epoch keeps the
    run inside the budget and refits the LR schedule to the shorter run, ending at min_lr."""
    from utils.training.length import TrainingLength

    now = [20.0]  # seconds of start-up before epoch 1
    length = TrainingLength(30, time_budget_min=10, log=lambda _: None, started=0.0, clock=lambda: now[0])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    steps = 10
    sched = WarmupSchedule(opt, steps_per_epoch=steps, max_epoch=30, wp_epoch=0, base_lr=0.1, min_lr=1e-6)
    tail, plans, epoch = 4.0, [], 0
    while epoch < length.max_epoch:
        seconds = 48.0 if epoch == 0 else 40.0 if epoch < 5 else 70.0
        for _ in range(steps):
            opt.step()
            sched.step()
        now[0] += seconds
        epoch += 1
        length.after_epoch(epoch, seconds, None, sched, epoch * steps, tail_s=tail)
        plans.append(length.max_epoch)
    assert plans[:2] == [12, 14]  # (600 - 68 - 4) // 48 + 1, then (600 - 108 - 4) // 40 + 2
    assert now[0] + tail <= 600  # inside the budget, the final evaluation included
    assert length.max_epoch == epoch < 14  # shortened, never lengthened after the second plan
    assert sched.total_steps == epoch * steps and opt.param_groups[0]["lr"] == pytest.approx(1e-6)


def test_fp16_on_a_cpu_without_native_bf16_falls_back_to_fp32_with_one_warning(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    chosen = precision.resolve_precision(CPU, fp16=True, channels_last=True)
    assert (chosen.amp, chosen.amp_dtype, chosen.channels_last) == (False, "float32", True)
    assert "no native bfloat16" in chosen.note and "--amp_dtype bfloat16" in chosen.note and "\n" not in chosen.note
    forced = precision.resolve_precision(CPU, fp16=True, amp_dtype="bfloat16")
    assert (forced.amp, forced.amp_dtype, forced.note) == (True, "bfloat16", None)
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    native = precision.resolve_precision(CPU, fp16=True)
    assert (native.amp, native.amp_dtype, native.note) == (True, "bfloat16", None)
    assert precision.resolve_precision(CPU, fp16=False).describe() == "float32, NCHW memory format"


@pytest.mark.parametrize("native", [False, True])
def test_train_start_up_lines_say_what_precision_runs(tmp_path, small_fashion_root, capsys, monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: native)
    code = train.main(["--model", "custom", "--img_size", "28", "--max_epoch", "1", "--fp16", "--channels_last",
                       "--batch_size", "64", "--num_workers", "0", "--data_root", str(small_fashion_root),
                       "--path_to_save", str(tmp_path), "--quiet", "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    if native:
        assert "precision: bfloat16 autocast (mixed precision), channels_last (NHWC) memory format" in captured.out
        assert "warning" not in captured.err
    else:
        assert "precision: float32, channels_last (NHWC) memory format" in captured.out
        assert captured.err.count("warning: --fp16") == 1


def test_augment_policy_of_an_older_checkpoint_loads_with_defaults():
    old = {"name": "light", "crop_scale": None, "rotation": 0.0, "flip": 0.5, "erasing": 0.0}
    assert Augment.from_dict(old) == resolve_augment("light", 28)
    new = resolve_augment("seed", 224, 0.25, 4, "ta_wide")
    assert Augment.from_dict(new.to_dict()) == new
    assert math.isclose(new.erasing, 0.25) and "TrivialAugmentWide" in new.describe()


def test_eval_py_flip_tta_reports_the_tta_accuracy(tmp_path, trained_ckpt, fashion_root):
    import json

    import eval as eval_script

    reports = {}
    for tta in ("none", "flip"):
        out = tmp_path / f"{tta}.json"
        assert eval_script.main(["--weights", str(trained_ckpt), "--data_root", str(fashion_root), "--output", str(out),
                                 "--speed_repeats", "0", "--num_workers", "0", "--quiet", "--device", "cpu", "--tta", tta]) == 0
        reports[tta] = json.loads(out.read_text())
    from utils.checkpoint import build_from_checkpoint, load_checkpoint
    from utils.data.datasets import EvalTransform
    from utils.data.fashion_mnist import fashion_mnist

    model, info = build_from_checkpoint(load_checkpoint(trained_ckpt))
    ds = fashion_mnist(fashion_root, False, EvalTransform(info.preprocess))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        logits = (model(x) + model(x.flip(-1))) / 2
    assert reports["flip"]["tta"] == "flip" and reports["none"]["tta"] == "none"
    assert reports["flip"]["acc1"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert reports["flip"]["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-4)
    assert reports["flip"]["loss"] != pytest.approx(reports["none"]["loss"], rel=1e-6)
