"""Warm-up + cosine LR values at known steps, and the EMA update formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.training.ema import ModelEMA, ema_decay
from utils.training.schedule import WarmupSchedule, lr_at

BASE, MIN = 1e-3, 1e-6


def test_lr_warmup_starts_small_and_reaches_base_lr():
    total, warm = 100, 10
    assert lr_at(0, total, warm, BASE, MIN) == pytest.approx(BASE / 10)  # first step not at LR 0
    assert lr_at(4, total, warm, BASE, MIN) == pytest.approx(BASE * 5 / 10)
    assert lr_at(9, total, warm, BASE, MIN) == pytest.approx(BASE)  # last warm-up step
    assert lr_at(10, total, warm, BASE, MIN) == pytest.approx(BASE)  # cosine starts at the peak


def test_lr_cosine_midpoint_and_last_step():
    total, warm = 91, 10  # cosine over steps 10 .. 90 (80 intervals): the mid-point is step 50
    expected_mid = MIN + 0.5 * (BASE - MIN)
    assert lr_at(50, total, warm, BASE, MIN) == pytest.approx(expected_mid, rel=1e-12)
    assert lr_at(49, total, warm, BASE, MIN) > expected_mid > lr_at(51, total, warm, BASE, MIN)
    quarter = MIN + 0.5 * (BASE - MIN) * (1 + math.cos(math.pi / 4))
    assert lr_at(30, total, warm, BASE, MIN) == pytest.approx(quarter, rel=1e-12)
    assert lr_at(total - 1, total, warm, BASE, MIN) == pytest.approx(MIN, rel=1e-12)  # last step = min_lr
    assert lr_at(total + 5, total, warm, BASE, MIN) == pytest.approx(MIN, rel=1e-12)  # clamped after the end


def test_lr_is_monotonic_after_warmup_and_without_warmup():
    values = [lr_at(s, 50, 0, BASE, MIN) for s in range(50)]
    assert values[0] == pytest.approx(BASE)
    assert values[-1] == pytest.approx(MIN)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_cosine_is_a_torch_scheduler_that_scales_every_param_group():
    model = nn.Linear(2, 2)
    # the bias group runs at a tenth of the base LR: the curve is scaled to each group's own initial LR
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": BASE / 10}], lr=BASE)
    schedule = WarmupSchedule(opt, steps_per_epoch=10, max_epoch=5, wp_epoch=1, base_lr=BASE, min_lr=MIN)
    assert isinstance(schedule, torch.optim.lr_scheduler.LRScheduler)
    assert schedule.total_steps == 50 and schedule.warmup_steps == 10
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([BASE / 10, BASE / 100])  # step 0 of the warm-up
    assert opt.param_groups[0]["lr"] == lr_at(0, 50, 10, BASE, MIN)  # exactly the curve for groups at base_lr
    schedule.seek(49)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([MIN, MIN / 10])
    assert schedule.state_dict() == {"last_epoch": 49}
    # a resumed run: fresh optimizer + scheduler, then the checkpoint's optimizer state (which carries the old
    # run's lr/initial_lr) and the scheduler position
    saved_opt, saved_sched = opt.state_dict(), schedule.state_dict()
    opt2 = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": BASE / 10}], lr=BASE)
    resumed = WarmupSchedule(opt2, steps_per_epoch=10, max_epoch=10, wp_epoch=1, base_lr=BASE, min_lr=MIN)  # run extended
    opt2.load_state_dict(saved_opt)
    resumed.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["lr"] == lr_at(49, 100, 10, BASE, MIN)
    assert opt2.param_groups[1]["lr"] == pytest.approx(lr_at(49, 100, 10, BASE, MIN) / 10)
    # warm-up longer than the run is capped at the run
    short = WarmupSchedule(opt, steps_per_epoch=10, max_epoch=1, wp_epoch=3, base_lr=BASE, min_lr=MIN)
    assert short.warmup_steps == 10
    short.seek(9)
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE)


def test_ema_decay_warms_up():
    assert ema_decay(0, 0.9999, 2000) == 0.0
    assert ema_decay(2000, 0.9999, 2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema_decay(10**6, 0.9999, 2000) == pytest.approx(0.9999)


def test_ema_matches_its_formula_over_several_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    decay, tau = 0.9, 2.0
    ema = ModelEMA(model, decay=decay, tau=tau)
    expected = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    for update in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 4))  # moves BatchNorm running stats and num_batches_tracked
        ema.update(model)
        d = decay * (1 - math.exp(-update / tau))
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                expected[name] = d * expected[name] + (1 - d) * value.double()
            else:
                expected[name] = value.clone()
        for name, value in ema.module.state_dict().items():
            if value.dtype.is_floating_point:
                torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(value, expected[name]), name  # integer buffers are copied
    assert ema.updates == 5
    assert ema.module.state_dict()["1.num_batches_tracked"].item() == 5
    # the EMA really differs from the model (it is an average, not a copy)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_state_dict_round_trip():
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.5, tau=1.0)
    with torch.no_grad():
        model.weight.mul_(3)
    ema.update(model)
    restored = ModelEMA(nn.Linear(3, 2), decay=0.1, tau=9.0)
    restored.load_state_dict(ema.state_dict())
    assert (restored.updates, restored.decay, restored.tau) == (1, 0.5, 1.0)
    assert torch.equal(restored.module.weight, ema.module.weight)


def test_onecycle_is_torch_onecyclelr_and_linear_decays_in_a_straight_line():
    total, warm, base, low = 100, 30, 0.1, 1e-5
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    reference = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=base, total_steps=total, pct_start=warm / total, div_factor=25,
                                                    final_div_factor=(base / 25) / low, cycle_momentum=False)
    ours = []
    for step in range(total):
        ours.append(lr_at(step, total, warm, base, low, "onecycle"))
        assert ours[-1] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), step
        opt.step()
        if step < total - 1:
            reference.step()
    assert ours[0] == pytest.approx(base / 25) and max(ours) == pytest.approx(base) and ours[-1] == pytest.approx(low)
    line = [lr_at(step, 12, 2, 1.0, 0.0, "linear") for step in range(12)]
    assert line[2] == 1.0 and line[-1] == 0.0
    assert all(abs((a - b) - 1 / 9) < 1e-12 for a, b in zip(line[2:], line[3:]))  # 9 equal steps down to the last step
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    schedule = WarmupSchedule(opt2, steps_per_epoch=10, max_epoch=10, wp_epoch=3, base_lr=base, min_lr=low, shape="onecycle")
    assert opt2.param_groups[0]["lr"] == pytest.approx(base / 25)
    schedule.set_length(20)  # --time_budget stretches the curve: step 50 is now in the middle of the decay
    schedule.seek(50)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(50, 200, 30, base, low, "onecycle"))
