"""Checkpoints: the one format train.py writes, read back safely (weights_only=True) by every other script.

`Checkpoint` documents the keys; `model_info` turns one into the utils.model_info.ModelInfo that export,
quantize, predict and the analysis scripts read.
`inference_state` is the one place deciding which weights a checkpoint serves: the EMA's when it has them
(those are what validation measured), else the raw ones.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypedDict

import torch
from torch import nn

from models import build_model
from utils.data.preprocess import Preprocess
from utils.errors import InputError
from utils.io import atomic_path, open_for_writing
from utils.model_info import ModelInfo


class Checkpoint(TypedDict, total=False):
    """What train.py saves (best.pth / last.pth); quantize.py's FP16 checkpoints keep the first group only."""

    # the network and how to feed it: enough to rebuild and use it anywhere
    model_name: str
    num_classes: int
    classes: list[str]
    preprocess: dict  # utils.data.preprocess.Preprocess.to_dict()
    model_kwargs: dict  # models.model_kwargs(): img_size, norm_type, in_channels, small_input
    augment: dict  # utils.data.augment.Augment.to_dict() of the training policy
    split: dict | None  # utils.data.splits.SplitRecord: the train/held-out files of a folder train.py split itself
    class_weights: list[float] | None  # --class_weights balanced: the loss weight of each class
    model: dict[str, torch.Tensor]  # state_dict of the trained network
    ema: dict | None  # utils.training.ema.ModelEMA.state_dict(): {"module", "updates", "decay", "tau"}
    # training state, for --resume (optimizer, scheduler and scaler in last.pth only)
    epoch: int  # 0-based index of the last finished epoch
    step: int  # optimizer steps taken
    best_acc1: float
    history: list[dict]  # results.csv rows so far
    optimizer: dict | None
    scheduler: dict | None  # absent in checkpoints written before the LRScheduler (derived from `step` then)
    scaler: dict | None
    partial: dict | None  # stopped mid-epoch (Ctrl-C, SIGTERM): utils.training.engine.EpochProgress.to_dict()
    rng: dict  # written until the per-epoch seeding made it unneeded; ignored
    args: dict  # train.py's flags
    torch_version: str
    # quantize.py --mode fp16
    precision: str
    source_checkpoint: str
    source_sha256: str
    # eval.py --calibrate (written to <name>_calibrated.pth, never over the checkpoint it read)
    temperature: float  # logits / temperature before the softmax: calibrated probabilities, the same top-1
    calibration: dict  # how it was fitted: split, images, ECE and NLL before and after, the source file's sha256


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """torch.save under a temporary name, then rename: a crash never leaves half a checkpoint. Through a Python file
    object, so a full disk is an OSError (ENOSPC, one line) rather than torch's zip writer's RuntimeError."""
    with atomic_path(path) as tmp, open_for_writing(tmp) as f:
        torch.save(ckpt, f)
    return Path(path)


# what every consumer (eval, export, predict, quantize, --resume) reads; FP16 checkpoints of quantize.py have them too
REQUIRED_KEYS = ("model_name", "num_classes", "classes", "preprocess", "model")


def load_error(path: Path, e: Exception) -> InputError:
    """Why torch.load(weights_only=True) refused a file, in one line. Never torch's advice to retry with
    weights_only=False: a file that needs it runs code when loaded."""
    text = str(e)
    code = re.search(r"GLOBAL\s+([\w.]+)", text)
    if code:
        return InputError(f"refusing to load {path}: it contains code: {code[1]} (a train.py checkpoint holds only "
                          "tensors and plain values, and loading this one would run that code); fix: use a checkpoint "
                          "written by train.py that you trust")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and not code:  # torch.save writes zip archives (PK..), even for one tensor
        return InputError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (no zip archive as torch.save "
                          "writes); fix: pass a checkpoint written by train.py (best.pth or last.pth)")
    if "central directory" in text or "zip archive" in text or isinstance(e, EOFError):
        return InputError(f"cannot read checkpoint {path}: the file is truncated or corrupt (not a complete PyTorch zip "
                          "archive); fix: copy it again, or use the run's other checkpoint (last.pth / best.pth)")
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line
             and "Weights only load failed" not in line and "documentation" not in line]
    reason = lines[0] if lines else ""
    return InputError(f"cannot read checkpoint {path}: {type(e).__name__}{': ' + reason if reason else ''}; fix: pass a "
                      "checkpoint written by train.py (best.pth or last.pth)")


def load_checkpoint(path: str | Path, map_location="cpu") -> Checkpoint:
    """Load a project checkpoint safely: weights_only=True, never arbitrary unpickling; anything else is one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise load_error(path, e) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise InputError(f"{path} is not a checkpoint written by train.py (it has no model_name/model entries)")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise InputError(f"{path} is not a complete checkpoint written by train.py: it lacks {', '.join(missing)} "
                         "(the network's description); fix: use best.pth or last.pth of a train.py run")
    check_identity(ckpt, path)
    return ckpt


CKPT_FIX = "; fix: use the checkpoint as train.py wrote it (it was edited or damaged), or its run's other checkpoint"


def check_identity(ckpt: Checkpoint, path: str | Path) -> None:
    """The network's description that every consumer (eval, export, predict_ckpoint, quantize, --resume) reads,
    checked once where checkpoints are loaded: a value of the wrong type or range is one line naming the key, not a
    traceback wherever it is first used."""
    where = f"checkpoint {path}"

    def bad(key: str, expected: str, value) -> InputError:
        return InputError(f"{where}: key {key!r} must be {expected}, got {str(value)[:60]!r}{CKPT_FIX}")

    if not isinstance(ckpt["model_name"], str) or not ckpt["model_name"]:
        raise bad("model_name", "a model name", ckpt["model_name"])
    classes = ckpt["classes"]
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        raise bad("classes", "a list of class names", classes)
    num = ckpt["num_classes"]
    if not isinstance(num, int) or isinstance(num, bool) or num != len(classes):
        raise bad("num_classes", f"the number of classes ({len(classes)})", num)
    Preprocess.from_dict(ckpt["preprocess"], where)
    kwargs = ckpt.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise bad("model_kwargs", "a mapping", kwargs)
    size = kwargs.get("img_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise bad("model_kwargs.img_size", "a positive integer (pixels)", size)
    temperature = ckpt.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 < temperature < float("inf"):
        raise bad("temperature", "a positive finite number", temperature)
    if not isinstance(ckpt["model"], dict) or not all(torch.is_tensor(v) for v in ckpt["model"].values()):
        raise bad("model", "a state dict of tensors", type(ckpt["model"]).__name__)


def check_state_fits(state: dict, model: nn.Module, what: str) -> None:
    """InputError naming the first tensor of `state` (a state dict) whose name or shape differs from `model`'s, with
    both shapes: load_state_dict would raise a RuntimeError listing every key, after the model was half loaded."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise InputError(f"{what}: tensor {key!r} is not in the {type(model).__name__} network{CKPT_FIX}")
        if not torch.is_tensor(value) or value.shape != own[key].shape:
            shape = list(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise InputError(f"{what}: tensor {key!r} has shape {shape}, the network's has {list(own[key].shape)}"
                             f"{CKPT_FIX}")
    missing = [key for key in own if key not in state]
    if missing:
        raise InputError(f"{what}: tensor {missing[0]!r} of the network is missing ({len(missing)} missing){CKPT_FIX}")


def check_resume_fits(ckpt: Checkpoint | None, model: nn.Module, optimizer: torch.optim.Optimizer,
                      path: str | Path | None) -> None:
    """--resume: every tensor the checkpoint will load (weights, EMA weights, the optimizer's per-parameter state)
    has the shape of the freshly built network's, checked before anything is loaded (a no-op without a checkpoint)."""
    if ckpt is None:
        return
    where = f"--resume {path}"
    check_state_fits(ckpt["model"], model, where)
    if isinstance(ckpt.get("ema"), dict) and "module" in ckpt["ema"]:
        check_state_fits(ckpt["ema"]["module"], model, f"{where} (EMA weights)")
    saved = ckpt.get("optimizer")
    if not isinstance(saved, dict):
        return
    groups, names = saved.get("param_groups", []), {id(p): n for n, p in model.named_parameters()}
    sizes = [len(g.get("params", [])) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise InputError(f"{where}: its optimizer state has parameter groups of {sizes} tensors, the network's optimizer "
                         f"{[len(g['params']) for g in optimizer.param_groups]}{CKPT_FIX}")
    for group, own in zip(groups, optimizer.param_groups):
        for index, param in zip(group["params"], own["params"]):
            for key, value in (saved.get("state", {}).get(index) or {}).items():
                if torch.is_tensor(value) and value.ndim > 0 and value.shape != param.shape:
                    raise InputError(f"{where}: optimizer state {key!r} of {names.get(id(param), index)!r} has shape "
                                     f"{list(value.shape)}, the parameter's is {list(param.shape)}{CKPT_FIX}")


def inference_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The weights a checkpoint serves: the EMA's when it has them, else the trained network's."""
    return ckpt["ema"]["module"] if ckpt.get("ema") else ckpt["model"]


# what a shipped, weights-only checkpoint keeps (weights/: predict and evaluate, never resume)
RELEASE_KEYS = ("model_name", "num_classes", "classes", "preprocess", "model_kwargs", "augment", "args", "epoch",
                "best_acc1", "history", "torch_version", "temperature", "calibration")


def release_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """The served weights (the EMA's when there are some) as `model`, without the EMA copy or any resume state: half
    the size of best.pth for an EMA run, and what eval.py, export.py and predict.py read."""
    return {**{k: ckpt[k] for k in RELEASE_KEYS if k in ckpt}, "model": inference_state(ckpt), "ema": None}


def model_info(ckpt: Checkpoint, model_name: str | None = None, source: str = "") -> ModelInfo:
    return ModelInfo(model_name or ckpt["model_name"], list(ckpt["classes"]), Preprocess.from_dict(ckpt["preprocess"]),
                     dict(ckpt.get("model_kwargs", {})), ckpt["num_classes"], source, float(ckpt.get("temperature", 1.0)))


def build_from_checkpoint(ckpt: Checkpoint, model_name: str | None = None, use_ema: bool = True,
                          source: str = "") -> tuple[nn.Module, ModelInfo]:
    """Rebuild the network a checkpoint describes and load its (EMA) weights strictly, in float32 and eval mode."""
    info = model_info(ckpt, model_name, source)
    model = build_model(info.model_name, ckpt["num_classes"], **info.model_kwargs)
    state = inference_state(ckpt) if use_ema else ckpt["model"]
    if info.model_name == ckpt["model_name"]:  # its own network: a tensor that does not fit was edited (named here)
        check_state_fits(state, model, f"checkpoint {source}" if source else "checkpoint")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise InputError(f"checkpoint weights do not fit model {info.model_name!r}: {first} "
                         f"(the checkpoint was trained as {ckpt['model_name']!r}; drop --model)") from None
    return model.eval(), info



def head_keys(model_name: str, num_classes: int, model_kwargs: dict) -> set[str]:
    """The state-dict keys of a network's classification head: those whose shape changes with the number of classes
    (found by building the network for one class more, so it holds for every architecture)."""
    a = build_model(model_name, num_classes, **model_kwargs).state_dict()
    b = build_model(model_name, num_classes + 1, **model_kwargs).state_dict()
    return {k for k, v in a.items() if k not in b or b[k].shape != v.shape}


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], exclude: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Copy every tensor of `state` whose name and shape match `model`'s (except `exclude`) into the model.
    Returns (loaded keys, skipped keys of the model: absent from `state`, another shape, or excluded)."""
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k in own and k not in exclude and v.shape == own[k].shape}
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in take.items()}})
    return sorted(take), sorted(k for k in own if k not in take)
