"""The CUDA path on a real GPU: fp16 + GradScaler, bf16, EMA, channels_last, accumulation, the tensor pipeline,
evaluation, TorchScript and torch.compile, ONNX export of a GPU-trained model, predict_ckpoint.py, resume after SIGKILL.

Every test is marked `cuda`: tests/conftest.py skips them with the reason where torch sees no GPU, and
scripts/gpu_check.sh runs them (`pytest -m cuda`). CUDA_TESTS_DEVICE=cpu runs the same assertions on the CPU,
a dry run that checks the tests themselves on a machine without a GPU (it proves nothing about CUDA).

Comparisons with the CPU at fp32 tolerance switch cuDNN convolutions to IEEE fp32 (`ieee_fp32`): PyTorch runs
fp32 convolutions as TF32 on Ampere and newer GPUs by default, which keeps only 10 mantissa bits.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_TESTS_DEVICE, make_fashion_root, run_script, synthetic_fashion_images
from PIL import Image
from test_resume import csv_rows, finish, load, start, train_cmd, wait_for_rows
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import build_model, model_kwargs
from utils.checkpoint import build_from_checkpoint, load_checkpoint
from utils.data.augment import resolve_augment
from utils.data.batch_augment import augment_batch, sample_params
from utils.data.preprocess import Preprocess
from utils.data.tensor_pipeline import TensorTrainLoader
from utils.evaluation.loop import evaluate
from utils.precision import autocast, needs_grad_scaler
from utils.training.ema import ModelEMA, ema_decay
from utils.training.engine import TrainState, optimizer_step, train_one_epoch
from utils.training.schedule import WarmupSchedule

pytestmark = pytest.mark.cuda
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device(CUDA_TESTS_DEVICE)


@contextlib.contextmanager
def ieee_fp32():
    """cuDNN convolutions in IEEE fp32 instead of TF32 for the duration (no effect on the CPU)."""
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = previous


def fashion_tensors(n: int, seed: int = 0) -> TensorDataset:
    """Learnable 28 px images (tests/conftest's class bars), normalised, 3 channels, as a CPU TensorDataset."""
    images, labels = synthetic_fashion_images(n, seed)
    x = (torch.from_numpy(images).float().div(255).sub(0.5).div(0.5))[:, None].expand(-1, 3, -1, -1).contiguous()
    return TensorDataset(x, torch.from_numpy(labels).long())


def plain_cnn(seed: int = 0, norm_type: str = "none") -> nn.Module:
    """FashionCNN at 28 px without dropout (and by default without BatchNorm): its result depends only on its inputs."""
    torch.manual_seed(seed)
    model = build_model("custom", 10, **model_kwargs(28, norm_type))
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double().cpu() - b[k].double().cpu()).abs().max().item() if a[k].numel() else 0.0) for k in a)


def test_fp16_autocast_grad_scaler_skips_overflow_steps_and_keeps_weights_finite(device):
    model = plain_cnn().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    state = TrainState(optimizer=opt, scheduler=WarmupSchedule(opt, steps_per_epoch=40, max_epoch=1, wp_epoch=0, base_lr=3e-3,
                                                             min_lr=3e-3),
                       scaler=torch.amp.GradScaler(device.type, init_scale=2.0**12, growth_interval=3), amp=True,
                       amp_dtype="float16")
    x, y = fashion_tensors(64).tensors
    x, y = x.to(device), y.to(device)
    amp = autocast(device, True, "float16")

    def step(images: torch.Tensor) -> float:
        with amp:
            logits = model(images)
            loss = F.cross_entropy(logits, y)
        assert logits.dtype == torch.float16
        state.scaler.scale(loss).backward()
        optimizer_step(model, state)
        return loss.item()

    first_loss = step(x)
    scales = [state.scaler.get_scale()]
    for _ in range(2):
        step(x)
        scales.append(state.scaler.get_scale())
    assert scales == [2.0**12, 2.0**12, 2.0**13]  # grown after growth_interval=3 finite steps
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam_before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    assert not math.isfinite(step(x * 1e6))  # 1e6 overflows float16 (max 65504): inf activations, NaN gradients
    assert state.scaler.get_scale() == 2.0**12  # backed off by half
    assert max_abs_diff(before, model.state_dict()) == 0.0  # the optimizer step was skipped
    assert max_abs_diff(adam_before, opt.state[next(model.parameters())]) == 0.0
    losses = [step(x) for _ in range(12)]
    assert state.scaler.get_scale() == 2.0**16  # 12 finite steps: 4 more doublings
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max_abs_diff(before, model.state_dict()) > 1e-3 and losses[-1] < 0.5 * first_loss


def test_bf16_autocast_trains_without_a_scaler_and_tracks_fp32(device):
    assert not needs_grad_scaler(device, True, "bfloat16")
    model = plain_cnn().to(device)
    x, _ = fashion_tensors(32).tensors
    x = x.to(device)
    with torch.no_grad(), ieee_fp32():
        reference = model(x)
        with autocast(device, True, "bfloat16"):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max().item() < 0.03 * max(1.0, reference.abs().max().item())  # 8 mantissa bits

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    state = TrainState(optimizer=opt, scheduler=WarmupSchedule(opt, steps_per_epoch=8, max_epoch=3, wp_epoch=0, base_lr=2e-3,
                                                             min_lr=2e-3), amp=True, amp_dtype="bfloat16")
    assert not state.scaler.is_enabled()
    loader = DataLoader(fashion_tensors(256), batch_size=32, shuffle=False)
    stats = [train_one_epoch(model, loader, nn.CrossEntropyLoss(), state, device, e, show_progress=False) for e in (1, 2, 3)]
    assert all(math.isfinite(s["train_loss"]) for s in stats) and state.step == 24
    assert stats[-1]["train_loss"] < 0.5 * stats[0]["train_loss"] and stats[-1]["train_acc1"] > 0.8
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


def test_ema_on_the_gpu_equals_the_cpu_and_the_formula(device):
    torch.manual_seed(0)
    cpu_model = build_model("custom", 10, **model_kwargs(28))  # with BatchNorm: running stats and an integer counter
    gpu_model = copy.deepcopy(cpu_model).to(device)
    cpu_ema, gpu_ema = ModelEMA(cpu_model, decay=0.9, tau=3.0), ModelEMA(gpu_model, decay=0.9, tau=3.0)
    assert all(t.device.type == device.type for t in gpu_ema.module.state_dict().values())
    start = {k: v.clone() for k, v in cpu_model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        with torch.no_grad():
            for (_, c), (_, gpu) in zip(cpu_model.state_dict().items(), gpu_model.state_dict().items()):
                step = torch.randn(c.shape, generator=g) if c.is_floating_point() else torch.ones_like(c)
                c.add_(step)
                gpu.add_(step.to(device))
        cpu_ema.update(cpu_model)
        gpu_ema.update(gpu_model)
    assert gpu_ema.updates == cpu_ema.updates == 4
    gpu_state = {k: v.cpu() for k, v in gpu_ema.module.state_dict().items()}
    assert max_abs_diff(gpu_state, cpu_ema.module.state_dict()) < 1e-5
    # the formula, by hand, for one weight: ema_k = d_k * ema_{k-1} + (1 - d_k) * w_k
    name = "classifier.1.weight"
    g = torch.Generator().manual_seed(1)
    w, expected = start[name].clone(), start[name].clone()
    for k in range(1, 5):
        for key, value in start.items():
            step = torch.randn(value.shape, generator=g) if value.is_floating_point() else None
            if key == name:
                w += step
        d = ema_decay(k, 0.9, 3.0)
        expected = d * expected + (1 - d) * w
    torch.testing.assert_close(gpu_state[name], expected, rtol=0, atol=1e-5)
    assert torch.equal(gpu_state["features.1.num_batches_tracked"], cpu_model.state_dict()["features.1.num_batches_tracked"])


def test_channels_last_gives_the_same_forward_and_gradients_and_stays_nhwc(device):
    """One forward/backward in NHWC equals NCHW to float rounding. (Over many steps, BatchNorm amplifies those
    1e-7 differences chaotically, so multi-step runs are compared by their loss, not weight by weight.)"""
    x, y = fashion_tensors(32).tensors
    grads, logits, losses = {}, {}, {}
    with ieee_fp32():
        for channels_last in (False, True):
            model = plain_cnn(norm_type="BN").to(device)
            images = x.to(device)
            if channels_last:
                model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
            out = model(images)
            F.cross_entropy(out, y.to(device)).backward()
            logits[channels_last] = out.detach().cpu()
            grads[channels_last] = {name: p.grad.cpu() for name, p in model.named_parameters()}

            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            state = TrainState(optimizer=opt, scheduler=WarmupSchedule(opt, steps_per_epoch=6, max_epoch=2, wp_epoch=0,
                                                                     base_lr=0.01, min_lr=0.01), channels_last=channels_last)
            loader = DataLoader(fashion_tensors(96), batch_size=16, shuffle=False)
            losses[channels_last] = [train_one_epoch(model, loader, nn.CrossEntropyLoss(), state, device, epoch,
                                                     show_progress=False)["train_loss"] for epoch in (1, 2)]
            if channels_last:
                conv = model.features[0].weight
                assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()  # still NHWC
    assert (logits[True] - logits[False]).abs().max().item() <= 1e-5 * max(1.0, logits[False].abs().max().item())
    for name, g in grads[False].items():
        assert (grads[True][name] - g).abs().max().item() <= 1e-5 * g.abs().max().item() + 1e-8, name
    assert losses[True][1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_gradient_accumulation_equals_one_big_batch(device):
    # 88 samples in micro-batches of 8 with accumulation 4 (windows 4 + 4 + 3) against batches of 32 (32 + 32 + 24)
    data = fashion_tensors(88)
    results = []
    with ieee_fp32():
        for batch_size, accumulation in ((8, 4), (32, 1)):
            model = plain_cnn().to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
            state = TrainState(optimizer=opt, scheduler=WarmupSchedule(opt, steps_per_epoch=3, max_epoch=2, wp_epoch=1,
                                                                     base_lr=0.05, min_lr=1e-3), accumulation=accumulation)
            loader = DataLoader(data, batch_size=batch_size, shuffle=False)
            for epoch in (1, 2):
                train_one_epoch(model, loader, nn.CrossEntropyLoss(), state, device, epoch, show_progress=False)
            assert state.step == 6
            results.append(model.state_dict())
    assert max_abs_diff(plain_cnn().state_dict(), results[1]) > 1e-3
    assert max_abs_diff(results[0], results[1]) < 1e-5


@pytest.mark.parametrize("policy, erasing", [("seed", 0.25), ("light", 0.0)])
def test_tensor_pipeline_augments_on_the_gpu_as_on_the_cpu(device, policy, erasing):
    """Same parameters -> the same images up to float rounding (a pixel on a crop-box edge may flip); same statistics."""
    images = torch.from_numpy(synthetic_fashion_images(400, 3)[0])[:, None]
    pre, augment = Preprocess.for_size(28), resolve_augment(policy, 28, erasing)
    torch.manual_seed(5)
    params = sample_params(len(images), 28, 28, augment=augment, out_size=28)
    on_cpu = augment_batch(images, params, pre)
    on_gpu = augment_batch(images.to(device), params, pre)
    assert on_gpu.device.type == device.type
    diff = (on_gpu.cpu() - on_cpu).abs()
    assert diff.mean().item() < 1e-5 and (diff > 1e-3).double().mean().item() < 1e-4
    for stat in (lambda x: x.mean((1, 2, 3)), lambda x: x.std((1, 2, 3))):
        assert (stat(on_gpu.cpu()) - stat(on_cpu)).abs().max().item() < 1e-3
    assert (on_gpu.cpu().mean(0) - on_cpu.mean(0)).abs().max().item() < 1e-3

    # the loader: dataset held on the GPU, same seed -> same order, same targets, same images
    targets = torch.arange(len(images))
    batches = {}
    for where in (CPU, device):
        torch.manual_seed(9)
        loader = TensorTrainLoader(images, targets, pre, list(torch.randperm(len(images)).tolist()), batch_size=64,
                                   device=where, augment=augment)
        batches[where.type] = []
        for x, y in loader:
            assert x.device.type == y.device.type == where.type
            batches[where.type].append((x.cpu(), y.cpu()))
    for (xc, yc), (xg, yg) in zip(batches["cpu"], batches[device.type]):
        assert torch.equal(yc, yg)
        assert (xc - xg).abs().mean().item() < 1e-5


def test_gpu_evaluation_equals_cpu_within_fp16_tolerance(device, trained_ckpt, fashion_root, tmp_path):
    ckpt = load_checkpoint(trained_ckpt)
    model, info = build_from_checkpoint(ckpt)
    loader = DataLoader(fashion_tensors(160, seed=1), batch_size=48)
    on_cpu = evaluate(model, loader, CPU, info.num_classes, show_progress=False, return_predictions=True)
    on_gpu = evaluate(model.to(device), loader, device, info.num_classes, amp=True, amp_dtype="float16",
                      show_progress=False, return_predictions=True)
    assert on_gpu.num_images == on_cpu.num_images == 160
    assert on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-2, abs=1e-3)
    assert (on_gpu.predictions != on_cpu.predictions).sum().item() <= 2  # only near-ties may flip in fp16
    assert abs(on_gpu.acc1 - on_cpu.acc1) <= 2 / 160

    # eval.py end to end, fp32 on each device (TF32 convolutions on the GPU, PyTorch's default)
    reports = {}
    for where in ("cpu", device.type):
        out = tmp_path / f"{where}.json"
        proc = run_script("eval.py", "--weights", str(trained_ckpt), "--data_root", str(fashion_root), "--output", str(out),
                          "--speed_repeats", "2", "--num_workers", "0", "--quiet", "--device", where)
        assert proc.returncode == 0, proc.stderr
        reports[where] = json.loads(out.read_text())
    gpu, cpu = reports[device.type], reports["cpu"]
    assert gpu["device"].startswith(device.type) and gpu["num_images"] == cpu["num_images"] == 160
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=2e-2, abs=2e-3)  # TF32 keeps ~3 decimal digits per product
    assert abs(gpu["acc1"] - cpu["acc1"]) <= 2 / 160


def test_torchscript_and_compile_forward_equal_eager(device, trained_ckpt):
    model, _ = build_from_checkpoint(load_checkpoint(trained_ckpt))
    model = model.to(device)
    x = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), ieee_fp32():
        eager = model(x)
        scripted = torch.jit.script(model)(x)
        compiled_model = torch.compile(model)
        compiled = compiled_model(x)
        again = compiled_model(x * 0.5)  # a second call reuses the compiled graph
        eager_again = model(x * 0.5)
    tolerance = 1e-4 * max(1.0, eager.abs().max().item())
    for name, out, ref in (("torchscript", scripted, eager), ("compile", compiled, eager), ("compile 2nd call", again, eager_again)):
        assert out.device.type == device.type, name
        assert (out - ref).abs().max().item() <= tolerance, f"{name}: {(out - ref).abs().max().item():.3g} > {tolerance:.3g}"


@pytest.fixture(scope="module")
def gpu_trained_run(device, tmp_path_factory) -> tuple:
    """A FashionCNN trained by train.py on the GPU with the GPU flags (fp16 + GradScaler, channels_last, EMA)."""
    root = make_fashion_root(tmp_path_factory.mktemp("fm_gpu"))
    out = tmp_path_factory.mktemp("gpu_run")
    proc = run_script("train.py", "--model", "custom", "--img_size", "28", "--max_epoch", "2", "--wp_epoch", "0",
                      "--batch_size", "32", "--num_workers", "0", "--data_root", str(root), "--path_to_save", str(out),
                      "--quiet", "--device", device.type, "--fp16", "--channels_last", "--ema", "--ema_decay", "0.9")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"device {device.type}" in proc.stdout
    return out / "FashionMNIST" / "custom", root


def test_onnx_export_of_a_gpu_trained_model_matches_it_on_cpu_onnx_runtime(device, gpu_trained_run):
    run_dir, root = gpu_trained_run
    ckpt = load_checkpoint(run_dir / "best.pth")
    # a GradScaler runs (and is saved, in last.pth only) only on CUDA
    assert (load_checkpoint(run_dir / "last.pth")["scaler"] is not None) == (device.type == "cuda") and "scaler" not in ckpt
    onnx_path = run_dir / "gpu.onnx"
    proc = run_script("export.py", "--weights", str(run_dir / "best.pth"), "--engine", "onnx", "--output", str(onnx_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-> passed" in proc.stdout  # export.py's own parity check: ONNX Runtime against PyTorch on the CPU

    from utils.deploy.runtime import OnnxModel

    onnx = OnnxModel(onnx_path, device="cpu")
    assert onnx.providers == ["CPUExecutionProvider"]
    model, _ = build_from_checkpoint(ckpt)
    x, _ = fashion_tensors(16, seed=1).tensors
    with torch.no_grad(), ieee_fp32():
        on_gpu = model.to(device)(x.to(device)).cpu()
    on_ort = torch.from_numpy(onnx(x.numpy()))
    tolerance = 1e-4 * max(1.0, on_gpu.abs().max().item())
    assert (on_ort - on_gpu).abs().max().item() <= tolerance
    assert torch.equal(on_ort.argmax(1), on_gpu.argmax(1))


def test_predict_ckpoint_on_the_gpu_equals_the_cpu(device, gpu_trained_run, tmp_path):
    run_dir, _ = gpu_trained_run
    images, labels = synthetic_fashion_images(4, 11)
    for k, (array, label) in enumerate(zip(images, labels)):
        Image.fromarray(array, "L").save(tmp_path / f"{k}_{label}.png")
    outputs = {}
    for where in ("cpu", device.type):
        proc = run_script("predict_ckpoint.py", "--weights", str(run_dir / "best.pth"), "--image", str(tmp_path),
                          "--topk", "3", "--json", "--device", where)
        assert proc.returncode == 0, proc.stderr
        outputs[where] = json.loads(proc.stdout)
    gpu, cpu = outputs[device.type], outputs["cpu"]
    assert gpu["summary"]["device"].startswith(device.type) and gpu["summary"]["num_failed"] == 0
    assert len(gpu["predictions"]) == len(cpu["predictions"]) == 4
    for a, b in zip(gpu["predictions"], cpu["predictions"]):
        assert a["image"] == b["image"]
        assert a["top"][0]["class"] == b["top"][0]["class"]
        assert np.allclose([p["prob"] for p in a["top"]], [p["prob"] for p in b["top"]], atol=5e-3)  # TF32 on the GPU


def test_resume_after_sigkill_on_the_gpu_equals_an_uninterrupted_run(device, tmp_path_factory, record_property):
    """What is asserted: the resumed run ends where an uninterrupted run ends as closely as two uninterrupted runs
    agree with each other on this GPU. cuDNN may pick non-deterministic kernels (atomic adds in weight gradients),
    so two identical runs can differ in the last bits; when they do not (the usual case with PyTorch's defaults,
    cudnn.benchmark off), the resumed run must be bit-identical too. fp16 autocast + GradScaler and EMA are on,
    so the scaler's state and the EMA travel through last.pth as well."""
    n_train = 9600 if device.type == "cuda" else 960  # a GPU epoch must last long enough to be killed in the middle
    root = make_fashion_root(tmp_path_factory.mktemp("fm_resume_gpu"), n_train=n_train, n_test=64)
    tmp_path = tmp_path_factory.mktemp("resume_gpu")
    extra = ("--device", device.type, "--fp16", "--ema", "--ema_decay", "0.99")
    runs = {name: tmp_path / name for name in ("reference_a", "reference_b", "interrupted")}
    references = [start(train_cmd(root, runs[name], *extra), tmp_path / f"{name}.log") for name in ("reference_a", "reference_b")]

    run_dir = runs["interrupted"] / "FashionMNIST" / "custom"
    log = tmp_path / "interrupted.log"
    proc = start(train_cmd(root, runs["interrupted"], *extra), log)
    wait_for_rows(proc, run_dir, 2, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(csv_rows(run_dir)) == 2, "epoch 3 finished before the kill"
    assert load(run_dir / "last.pth")["epoch"] == 1
    resume_log = tmp_path / "resume.log"
    resumed = start(train_cmd(root, runs["interrupted"], *extra, "--resume", str(run_dir / "last.pth")), resume_log)
    assert finish(resumed, resume_log) == 0, resume_log.read_text()
    for name, ref in zip(("reference_a", "reference_b"), references):
        assert finish(ref, tmp_path / f"{name}.log") == 0, (tmp_path / f"{name}.log").read_text()

    ckpts = {name: load(path / "FashionMNIST" / "custom" / "last.pth") for name, path in runs.items()}
    a, b, res = ckpts["reference_a"], ckpts["reference_b"], ckpts["interrupted"]
    assert a["epoch"] == res["epoch"] == 2 and a["step"] == res["step"] == 3 * (n_train // 32)
    assert res["ema"]["updates"] == a["ema"]["updates"] and (res["scaler"] is not None) == (device.type == "cuda")
    run_to_run = max(max_abs_diff(a["model"], b["model"]), max_abs_diff(a["ema"]["module"], b["ema"]["module"]))
    resumed_diff = max(max_abs_diff(a["model"], res["model"]), max_abs_diff(a["ema"]["module"], res["ema"]["module"]))
    record_property("resume_run_to_run_max_abs_diff", run_to_run)
    record_property("resume_resumed_max_abs_diff", resumed_diff)
    print(f"max |weight diff|: two uninterrupted runs {run_to_run:.3g}, resumed vs uninterrupted {resumed_diff:.3g}")
    if run_to_run == 0.0:
        assert resumed_diff == 0.0
        assert a["scaler"] == res["scaler"]
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in csv_rows(runs["reference_a"] / "FashionMNIST" / "custom")]
        assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in csv_rows(run_dir)]
    else:
        assert resumed_diff <= 10 * run_to_run + 1e-6
    assert [int(r["epoch"]) for r in csv_rows(run_dir)] == [1, 2, 3]
