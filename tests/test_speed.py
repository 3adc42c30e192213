"""Fast by default on a CPU: the eval geometry (--crop_pct), grayscale networks (--in_channels 1), the small-image
network `speednet`, --precision/--memory_format auto, the --time_budget re-estimate and the benchmarks' GFLOP/s."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_image_folder, run_main
from PIL import Image

from utils.data.datasets import DataSpec, native_image_size, resolve_crop_pct
from utils.data.preprocess import Preprocess, eval_transform
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- --crop_pct


def test_crop_pct_sets_the_eval_resize_and_old_preprocessing_keeps_its_own():
    assert (Preprocess.for_size(224).resize, Preprocess.for_size(224).crop_pct) == (256, 0.875)
    assert [Preprocess.for_size(s).resize for s in (28, 48, 56)] == [32, 55, 64]  # the seed's formula, as before
    assert Preprocess.for_size(28, crop_pct=1.0).resize == 28
    # a checkpoint or artifact from before the field: its resize is the geometry, nothing is recomputed
    legacy = {"img_size": 28, "resize": 32, "mean": [0.5], "std": [0.25], "channels": 1, "interpolation": "bilinear"}
    pre = Preprocess.from_dict(legacy)
    assert pre.crop_pct is None and pre.resize == 32
    img = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28), "L")
    old, new = eval_transform(img, pre), eval_transform(img, Preprocess.from_dict({**legacy, "resize": 28, "crop_pct": 1.0}))
    assert old.shape == new.shape == (1, 28, 28)
    assert np.array_equal(new[0], (np.asarray(img, np.float32) / 255 - np.float32(0.5)) / np.float32(0.25))  # untouched
    assert not np.allclose(old, new)  # resize 32 + crop 28: the border is cut, the rest resampled
    with pytest.raises(InputError, match="'crop_pct' must be img_size / resize"):
        Preprocess.from_dict({**legacy, "crop_pct": 1.0})  # an edited file: 28 / 1.0 is not 32
    with pytest.raises(InputError, match="'crop_pct' must be a number in"):
        Preprocess.from_dict({**legacy, "crop_pct": 1.5})


def test_crop_pct_defaults_to_1_only_when_the_images_already_have_the_input_size(tmp_path, fashion_root):
    assert native_image_size(DataSpec(None, str(fashion_root))) == 28
    squares = tmp_path / "squares"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (squares / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (28, 28), 40 * i).save(squares / split / name / f"{i}.png")
    assert native_image_size(DataSpec(str(squares))) == 28
    assert native_image_size(DataSpec(str(make_image_folder(tmp_path / "photos")))) is None  # photos of mixed sizes
    assert resolve_crop_pct(None, 28, 28) == 1.0 and resolve_crop_pct(None, 56, 28) == 0.875
    assert resolve_crop_pct(None, 28, None) == 0.875 and resolve_crop_pct(0.9, 28, 28) == 0.9  # the flag wins


def test_resuming_a_checkpoint_from_before_crop_pct_keeps_its_resize(trained_run, tmp_path):
    run = tmp_path / "FashionMNIST" / "custom"
    shutil.copytree(trained_run, run)
    ckpt = torch.load(run / "last.pth", weights_only=True)
    del ckpt["args"]["crop_pct"], ckpt["preprocess"]["crop_pct"]
    ckpt["preprocess"]["resize"] = 32  # how train.py saved a 28 px run before --crop_pct
    torch.save(ckpt, run / "last.pth")
    proc = run_main("train.py", "--resume", str(run / "last.pth"), "--max_epoch", "3", "--quiet", "--device", "cpu",
                    "--num_workers", "0", "--data_root", ckpt["args"]["data_root"])
    assert proc.returncode == 0, proc.stderr
    assert "eval resize 32 -> centre crop 28 (crop_pct 0.875)" in proc.stdout
    resumed = torch.load(run / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["preprocess"]["resize"] == 32 and resumed["args"]["crop_pct"] == 0.875


# ----------------------------------------------------------------------------- --in_channels 1 and speednet


def test_every_registry_model_builds_for_grayscale_input():
    from models import MODEL_NAMES, build_model, model_kwargs

    # every builder of the registry with its small-input stem (28 px); the large-input stems (96 px) of the torchvision
    # networks share one code path. resnet34/101/152 and mobilenet_v3_large share resnet18/50's and
    # mobilenet_v3_small's stem code (their meta passes would cost 5 s)
    same_stem = {"resnet34", "resnet101", "resnet152", "mobilenet_v3_large"}
    for name, size in [(n, 28) for n in MODEL_NAMES if n not in same_stem] + [("resnet18", 96), ("mobilenet_v2", 96),
                                                                             ("resnet9", 96)]:
        with torch.device("meta"):  # shapes only
            model = build_model(name, 10, **model_kwargs(size, "BN", 1, "auto"))
            out = model(torch.empty(2, 1, size, size))
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.in_channels == 1 and out.shape == (2, 10), name
    # a torchvision stem made grayscale keeps its init distribution: the RGB filters summed / sqrt(3)
    torch.manual_seed(0)
    rgb = build_model("mobilenet_v3_small", 10, img_size=96, in_channels=3).features[0][0].weight
    torch.manual_seed(0)
    grey = build_model("mobilenet_v3_small", 10, img_size=96, in_channels=1).features[0][0].weight
    assert grey.shape == (16, 1, 3, 3) and torch.allclose(grey, rgb.sum(1, keepdim=True) / 3 ** 0.5)


def test_speednet_size_receptive_field_and_whitened_stem():
    from models import build_model, count_parameters
    from models.speednet import whiten_stem
    from utils.analysis.rf_trace import receptive_fields

    model = build_model("speednet", 10, img_size=28, in_channels=1)
    assert 1.0e6 < count_parameters(model) < 2.0e6
    report = receptive_fields(model, (1, 28, 28))
    f = report.final
    assert (f.layer, f.rf, f.stride, f.padding) == ("layers.2.4", (51, 51), (8, 8), (21, 21))
    assert report.covers_whole_image and not report.warnings
    # whitening: the stem's + filters map 2x2 patches of the images to decorrelated unit-variance features
    images = torch.randn(64, 1, 28, 28).cumsum(-1) * 0.3  # correlated neighbouring pixels, like real images
    whiten_stem(model, images)
    feats = torch.nn.functional.conv2d(images, model.stem[0].weight[:4]).permute(0, 2, 3, 1).reshape(-1, 4).double()
    cov = feats.T @ feats / len(feats)
    assert torch.allclose(cov, torch.eye(4, dtype=torch.float64), atol=0.02), cov


def test_grayscale_speednet_trains_exports_and_predicts_a_colour_image(tmp_path, small_fashion_root):
    import onnx

    from utils.data.preprocess import Preprocess

    out = tmp_path / "runs"
    proc = run_main("train.py", "--model", "speednet", "--in_channels", "1", "--img_size", "28", "--max_epoch", "1",
                    "--batch_size", "32", "--num_workers", "0", "--data_root", str(small_fashion_root), "--quiet",
                    "--device", "cpu", "--path_to_save", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "input: 28 px, grayscale (1 channel); eval resize 28 -> centre crop 28 (crop_pct 1.0)" in proc.stdout
    ckpt_path = out / "FashionMNIST" / "speednet" / "best.pth"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["model_kwargs"]["in_channels"] == ckpt["preprocess"]["channels"] == ckpt["args"]["in_channels"] == 1
    assert ckpt["model"]["stem.0.weight"].shape == (8, 1, 2, 2)
    onnx_path = tmp_path / "speednet.onnx"
    proc = run_main("export.py", "--weights", str(ckpt_path), "--output", str(onnx_path))
    assert proc.returncode == 0 and "-> passed" in proc.stdout, proc.stdout + proc.stderr
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    pre = Preprocess.from_json(props["preprocess"])
    assert (pre.channels, pre.resize, pre.crop_pct) == (1, 28, 1.0) and "grayscale (L)" in props["preprocessing"]
    colour = tmp_path / "red.png"
    Image.fromarray(np.full((30, 40, 3), (200, 20, 20), np.uint8)).save(colour)
    proc = run_main("predict.py", "--model", str(onnx_path), "--image", str(colour), "--quiet")
    assert proc.returncode == 0 and "Top 5 predictions:" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- --precision / --memory_format auto


def test_precision_candidates_follow_the_cpu_and_the_flags():
    from utils.precision import cpu_bf16_native
    from utils.training.precision_choice import candidates

    cpu = torch.device("cpu")
    names = [c.name for c in candidates(cpu)[0]]
    assert names == ["fp32/nchw", "fp32/channels_last"] + (["bf16/nchw", "bf16/channels_last"] if cpu_bf16_native() else [])
    assert [c.name for c in candidates(cpu, "fp32", "nchw")[0]] == ["fp32/nchw"]
    assert [c.name for c in candidates(cpu, memory_format="nchw")[0]][0] == "fp32/nchw"
    assert [c.name for c in candidates(cpu, "fp32", channels_last=True)[0]] == ["fp32/channels_last"]  # the old switch
    old = candidates(cpu, fp16=True)  # the old --fp16: bf16 where native, else float32 with a warning
    assert [c.name for c in old[0]] == (["bf16/nchw", "bf16/channels_last"] if cpu_bf16_native() else
                                        ["fp32/nchw", "fp32/channels_last"])
    with pytest.raises(InputError, match="--fp16 means"):
        candidates(cpu, "fp32", fp16=True, amp_dtype="bfloat16")
    with pytest.raises(InputError, match="contradict"):
        candidates(cpu, memory_format="nchw", channels_last=True)


def test_the_probe_times_each_candidate_on_a_copy_and_leaves_the_run_untouched():
    from models import build_model
    from utils.training.precision_choice import PROBE_PAYBACK, PROBE_ROUNDS, PROBE_STEPS, PROBE_WARMUP, candidates, choose_precision

    cpu = torch.device("cpu")
    model = build_model("speednet", 10, img_size=16, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cands, note = candidates(cpu)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    shape = (8, 1, 16, 16)
    chosen, record = choose_precision(model, cands, note, batch_shape=shape, num_classes=10, device=cpu, planned_steps=10 ** 6)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is the one it would have had
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BatchNorm statistics
    assert record["chosen_by"] == "probe" and list(record["step_ms"]) == [c.name for c in cands]
    fastest = min(record["step_ms"], key=record["step_ms"].get)
    assert f"{record['precision']}/{record['memory_format']}" == fastest
    assert (chosen.amp, chosen.channels_last) == (record["precision"] != "fp32", record["memory_format"] == "channels_last")
    short = PROBE_PAYBACK * len(cands) * PROBE_ROUNDS * (PROBE_WARMUP + PROBE_STEPS) - 1
    _, record = choose_precision(model, cands, note, batch_shape=shape, num_classes=10, device=cpu, planned_steps=short)
    assert record == {"precision": "fp32", "memory_format": "nchw",
                      "chosen_by": f"short run ({short} steps): the reference, no probe"}
    resumed = {"precision": cands[-1].precision, "memory_format": "channels_last", "chosen_by": "probe"}
    _, record = choose_precision(model, cands, note, batch_shape=shape, num_classes=10, device=cpu, planned_steps=10 ** 6,
                                 recorded=resumed)
    assert record == {**resumed, "chosen_by": "resume"}


def test_train_probes_records_the_choice_and_resume_and_replay_keep_it(tmp_path, small_fashion_root):
    """64 images at batch 2 for up to 20 epochs: 640 planned steps, enough for the probe; a budget of 0.06 s then
    stops the run after its first epoch."""
    import json

    out = tmp_path / "runs"
    common = ["--model", "custom", "--img_size", "28", "--batch_size", "2", "--num_workers", "0", "--quiet",
              "--device", "cpu", "--data_root", str(small_fashion_root), "--path_to_save", str(out)]
    proc = run_main("train.py", *common, "--max_epoch", "20", "--time_budget", "0.001")
    assert proc.returncode == 0, proc.stderr
    run = out / "FashionMNIST" / "custom"
    used = json.loads((run / "args.json").read_text())["precision_used"]
    assert used["chosen_by"] == "probe" and len(used["step_ms"]) >= 2
    assert f"chosen: {used['precision']} {used['memory_format']} (fastest of " in proc.stdout
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["args"]["precision_used"] == used and last["epoch"] == 0
    proc = run_main("train.py", "--config", str(run / "args.json"), "--path_to_save", str(tmp_path / "replay"))
    assert proc.returncode == 0, proc.stderr
    assert f"chosen: {used['precision']} {used['memory_format']} (replay)" in proc.stdout  # a replay repeats the choice
    proc = run_main("train.py", *common, "--max_epoch", "2", "--resume", str(run / "last.pth"))
    assert proc.returncode == 0, proc.stderr
    assert f"chosen: {used['precision']} {used['memory_format']} (resume)" in proc.stdout


def test_whiten_stem_initialises_speednet_from_training_images_and_is_refused_elsewhere(tmp_path, small_fashion_root):
    from models import build_model
    from utils.data.datasets import build_datasets
    from utils.training.whitening import whiten_from_dataset

    train_set, _, _ = build_datasets(DataSpec(None, str(small_fashion_root)), Preprocess.for_size(28, 1, 1.0))
    model = build_model("speednet", 10, img_size=28, in_channels=1)
    assert whiten_from_dataset(model, train_set, torch.device("cpu")) == 64  # all 64 images (fewer than 512)
    images = torch.stack([train_set[i][0] for i in range(64)])
    feats = torch.nn.functional.conv2d(images, model.stem[0].weight[:4]).permute(0, 2, 3, 1).reshape(-1, 4).double()
    assert torch.allclose(feats.T @ feats / len(feats), torch.eye(4, dtype=torch.float64), atol=0.1)
    proc = run_main("train.py", "--model", "custom", "--whiten_stem", "--data_root", str(small_fashion_root),
                    "--path_to_save", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip() == ("error: --whiten_stem initialises speednet's 2x2 stem; "
                                                            "--model custom has none: drop the flag")


class NoBf16Kernel(torch.nn.Module):
    """A real network with an operation that has no bfloat16 CPU kernel (torch.special.zeta): its bf16 steps fail."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.head(h) + 0 * torch.special.zeta(h.detach().abs() + 2, torch.ones_like(h.detach())).mean()


def test_a_candidate_whose_step_fails_is_left_out_and_recorded():
    from utils.training.precision_choice import Candidate, choose_precision, describe_choice

    cands = [Candidate("bf16", False), Candidate("fp32", False)]
    chosen, record = choose_precision(NoBf16Kernel(), cands, None, batch_shape=(4, 1, 8, 8), num_classes=10,
                                      device=torch.device("cpu"), planned_steps=10 ** 6)
    assert record["precision"] == "fp32" and not chosen.amp and record["step_ms"]["bf16/nchw"] is None
    assert record["step_ms"]["fp32/nchw"] > 0 and "bf16/nchw failed" in describe_choice(record)
