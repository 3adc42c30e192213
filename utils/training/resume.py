"""--resume takes the network from the checkpoint (nanoGPT's pattern): the flags that define the network and its
input come from the checkpoint's saved args, and an explicitly given flag that contradicts them is an input error
instead of a load_state_dict traceback."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from utils.checkpoint import Checkpoint
from utils.errors import InputError


def checkpoint_flags(ckpt: Checkpoint, keys: Iterable[str], current: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The values of `keys` the checkpoint's args fix (its model name always), to replace `current`'s; raises
    InputError when an explicitly given flag (`explicit`) disagrees with them."""
    saved = dict(ckpt.get("args") or {})
    saved.setdefault("model", ckpt["model_name"])  # the one key every checkpoint has, even without saved args
    conflicts = [f"--{key} {current[key]} (the checkpoint has {saved[key]})" for key in keys
                 if key in saved and key in explicit and current[key] != saved[key]]
    if conflicts:
        raise InputError(f"--resume continues the checkpoint's network, but {'; '.join(conflicts)}: drop "
                         f"{'those flags' if len(conflicts) > 1 else 'that flag'} (to train a different network, start a new run)")
    return {key: saved[key] for key in keys if key in saved}


def check_resumable(ckpt: Checkpoint, path: str | Path) -> None:
    """--resume needs the optimizer state, which only last.pth keeps (best.pth and quantize.py's FP16 checkpoints
    leave it out): one line naming the run's last.pth instead of a KeyError later."""
    if ckpt.get("optimizer") is None:
        raise InputError(f"cannot resume from {path}: it holds no optimizer state (best.pth keeps only the network, for "
                         f"eval, export and predict); fix: --resume {Path(path).parent / 'last.pth'}")


# flags a resumed run cannot change (the split is the recorded one, the weights are the checkpoint's): args.json
# keeps the values the run really used, not what the resuming command line said
FIXED_BY_RESUME = ("val_fraction", "pretrained")


def fixed_by_resume(ckpt: Checkpoint, current: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The checkpoint's values of FIXED_BY_RESUME (the split record's --val_fraction first), with a note for each
    explicitly given flag they replace."""
    saved = dict(ckpt.get("args") or {})
    if ckpt.get("split"):
        saved["val_fraction"] = ckpt["split"]["val_fraction"]
    out = {key: saved[key] for key in FIXED_BY_RESUME if key in saved}
    for key in sorted(explicit & out.keys()):
        if current[key] != out[key]:
            print(f"note: --{key} {current[key]} has no effect on --resume: the run continues with {out[key]}")
    return out
