"""Checkpoint I/O: one format, written atomically, read with weights_only=True."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.data.preprocess import Preprocess
from utils.errors import InputError
from utils.io import atomic_path


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a project checkpoint safely (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        raise InputError(f"cannot load checkpoint {path} safely (weights_only=True): {type(e).__name__}: {reason} "
                         "(is it a checkpoint written by train.py?)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise InputError(f"{path} is not a checkpoint written by train.py (it has no model_name/model entries)")
    return ckpt


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_from_checkpoint(ckpt: dict, model_name: str | None = None, use_ema: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the network a checkpoint describes and load its weights strictly.

    Returns (model in eval mode, info) where info holds model_name, classes, preprocess.
    The EMA weights are used when the checkpoint has them (they are what validation measured).
    """
    from models import build_model

    name = model_name or ckpt["model_name"]
    kwargs = dict(ckpt.get("model_kwargs", {}))
    model = build_model(name, ckpt["num_classes"], **kwargs)
    state = ckpt["ema"]["module"] if use_ema and ckpt.get("ema") else ckpt["model"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise InputError(f"checkpoint weights do not fit model {name!r}: {first} "
                         f"(the checkpoint was trained as {ckpt['model_name']!r}; drop --model)") from None
    info = {"model_name": name, "classes": list(ckpt["classes"]), "num_classes": ckpt["num_classes"],
            "preprocess": Preprocess.from_dict(ckpt["preprocess"]), "model_kwargs": kwargs}
    return model.eval(), info
