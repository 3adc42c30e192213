"""Opening any artifact for evaluation: a checkpoint (FP32 or FP16), an ONNX file (FP32, FP16, INT8), a torch.export
archive (.pt2, FP32 or FP16) or a TorchScript program, each wrapped as a LoadedModel with one forward on torch
batches, so eval.py, quantize.py and the benchmarks evaluate every format through the same eval loop. Also the one
line that replaces a deprecated API's warning when the user chose that API (TorchScript, the legacy ONNX exporter)."""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import count_parameters
from models.memory import explain_out_of_memory, inference_memory, require_fits
from utils.checkpoint import build_from_checkpoint, inference_state, load_checkpoint
from utils.deploy.metadata import TORCHSCRIPT_METADATA_FILE, artifact_kind, decode_metadata_json
from utils.deploy.runtime import OnnxModel, pool_score_map
from utils.errors import InputError
from utils.evaluation.loop import EvalResult, evaluate
from utils.model_info import ModelInfo
from utils.timing import latency_and_throughput


def warn_stderr(line: str) -> None:
    print(line, file=sys.stderr)


TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"  # torch.jit.script/trace/save/load's FutureWarning (torch 2.10+)
TORCHSCRIPT_NOTE = ("note: TorchScript (.pt) is deprecated in PyTorch 2.x (torch.jit) and kept here for existing .pt files "
                    "and libtorch runtimes; export.py --engine pt2 or onnx is the maintained path")


@contextlib.contextmanager
def deprecation_note(rules: list[tuple[type[Warning], str]], note: str, log: Callable[[str], None] = warn_stderr) -> Iterator[None]:
    """Run a deprecated API the user chose explicitly (TorchScript, the legacy ONNX exporter): the warnings matching
    `rules` ((category, message regex)) become the one line `note`, printed once; every other warning passes through
    as Python would show it (or raises, under an "error" filter such as the tests')."""
    with warnings.catch_warnings(record=True) as caught:
        for category, message in rules:
            warnings.filterwarnings("always", category=category, message=message)
        yield
    ours = False
    for w in caught:
        if any(issubclass(w.category, c) and re.match(m, str(w.message)) for c, m in rules):
            ours = True
        else:  # not ours to summarise
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if ours:
        log(note)


def legacy_torchscript(log: Callable[[str], None] = warn_stderr):
    """torch.jit.* chosen by the user (a .pt file, --engine torchscript): its FutureWarning as our one line."""
    return deprecation_note([(FutureWarning, TORCHSCRIPT_DEPRECATED)], TORCHSCRIPT_NOTE, log)


def load_torchscript(path: str | Path, device: str | torch.device = "cpu", log: Callable[[str], None] = warn_stderr
                     ) -> tuple[torch.jit.ScriptModule, dict]:
    """torch.jit.load plus the metadata export.py stored beside the program."""
    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    try:
        with legacy_torchscript(log):
            program = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as e:
        raise InputError(f"cannot load TorchScript file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    text = extra[TORCHSCRIPT_METADATA_FILE]
    meta = decode_metadata_json(text, str(path)) if text else {}
    return program.eval(), meta


def numpy_forward(network: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """A torch network (eager or TorchScript) as the prediction loop's forward (utils.deploy.predict): a float32 NCHW
    numpy batch in, (N, classes) float32 logits out, score maps pooled."""

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return pool_score_map(network(torch.from_numpy(x).to(device)).float()).cpu().numpy()

    return forward


class HalfPrecision(nn.Module):
    """Runs the wrapped network in float16 while taking and returning float32 tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


@dataclass
class LoadedModel:
    """Anything eval.py, quantize.py and the benchmark can evaluate: a forward on torch batches plus facts about it."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    info: ModelInfo
    format: str  # pytorch, pytorch-fp16, onnx, onnx-fp16, onnx-int8, pt2, pt2-fp16, torchscript, torchscript-fp16, ...
    engine: str  # pytorch, onnxruntime, torch.export, torchscript
    precision: str
    compute: str  # what actually ran, e.g. "fp32 (fp16 weights upcast on CPU)"
    device: torch.device  # where the evaluation batches go
    size_mb: float  # weights as stored (checkpoint) or the artifact file size
    params: int | None = None
    extra: dict = field(default_factory=dict)
    split: dict | None = None  # a checkpoint's recorded train/held-out split of a folder without val/ (utils.data.splits)
    module: nn.Module | None = None  # the PyTorch network of a checkpoint (None for ONNX and TorchScript)


def state_dict_mb(state: dict) -> float:
    return sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t)) / 1e6


def load_for_eval(path: str | Path, device: torch.device, model_name: str | None = None, ort_device: str = "auto",
                  ort_threads: int = 0) -> LoadedModel:
    """Open a checkpoint (FP32 or FP16), an .onnx (FP32/FP16/INT8), a .pt2 or a TorchScript .pt for evaluation."""
    path = Path(path)
    kind = artifact_kind(path)
    file_mb = path.stat().st_size / 1e6
    if kind == "checkpoint":
        ckpt = load_checkpoint(path)
        model, info = build_from_checkpoint(ckpt, model_name, source=str(path))
        precision = ckpt.get("precision", "fp32")
        state = inference_state(ckpt)
        params = count_parameters(model)
        if precision == "fp16" and device.type == "cuda":
            model, compute = HalfPrecision(model).to(device).eval(), "fp16 on CUDA"
        else:
            model = model.to(device)
            compute = "fp32 (fp16 weights upcast to fp32 on CPU)" if precision == "fp16" else "fp32"
        return LoadedModel(lambda x: pool_score_map(model(x).float()), info, "pytorch" if precision == "fp32" else f"pytorch-{precision}",
                           "pytorch", precision, compute, device, state_dict_mb(state), params, {"file_mb": file_mb},
                           ckpt.get("split"), model)
    if kind == "onnx":
        import onnxruntime

        onnx_model = OnnxModel(path, ort_device, threads=ort_threads)
        meta = onnx_model.metadata
        precision = meta.get("precision", "fp32")
        info = ModelInfo.from_metadata(meta, path.stem, str(path))

        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(onnx_model(x.cpu().numpy()))

        provider = onnx_model.providers[0]
        compute = f"{precision} on ONNX Runtime {provider}" + (" (CPU may run FP16 nodes through inserted casts)"
                                                                if precision == "fp16" and provider == "CPUExecutionProvider" else "")
        return LoadedModel(forward, info, "onnx" if precision == "fp32" else f"onnx-{precision}", "onnxruntime", precision,
                           compute, torch.device("cpu"), file_mb, int(meta["params"]) if "params" in meta else None,
                           {"file_mb": file_mb, "provider": provider, "onnxruntime": onnxruntime.__version__})
    if kind == "pt2":
        from utils.deploy.pt2 import load_program

        program, meta = load_program(path, device)
        precision = meta.get("precision", "fp32")
        info = ModelInfo.from_metadata(meta, path.stem, str(path))

        def pt2_forward(x: torch.Tensor) -> torch.Tensor:
            return pool_score_map(program(x).float())

        return LoadedModel(pt2_forward, info, "pt2" if precision == "fp32" else f"pt2-{precision}", "torch.export", precision,
                           f"{precision} torch.export program on {device.type}", device, file_mb,
                           int(meta["params"]) if "params" in meta else None, {"file_mb": file_mb})
    meta_device = device
    program, meta = load_torchscript(path, "cpu")
    precision = meta.get("precision", "fp32")
    if precision.startswith("int8") and device.type == "cuda":
        print(f"note: {path.name} is a PyTorch-quantized INT8 program, which runs on CPU only: evaluating on CPU")
        meta_device = torch.device("cpu")
    program = program.to(meta_device)
    info = ModelInfo.from_metadata(meta, path.stem, str(path))

    def ts_forward(x: torch.Tensor) -> torch.Tensor:
        return pool_score_map(program(x).float())

    return LoadedModel(ts_forward, info, "torchscript" if precision == "fp32" else f"torchscript-{precision}", "torchscript",
                       precision, f"{precision} TorchScript on {meta_device.type}", meta_device, file_mb,
                       int(meta["params"]) if "params" in meta else None, {"file_mb": file_mb, "torchscript": meta.get("torchscript")})


def broken_weights(module: nn.Module | None) -> str:
    """ " (<tensor> holds NaN/inf)": the first such tensor of a PyTorch network, to say where the NaN comes from."""
    if module is None:
        return ""
    name = next((k for k, t in module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    return f" (its weight {name} holds NaN or inf)" if name else ""


def evaluate_loaded(loaded: LoadedModel, loader, num_classes: int, speed_repeats: int = 20, show_progress: bool = True,
                    **details) -> EvalResult:
    """acc@1/acc@5/loss/confusion through the eval loop's forward hook, then batch-1 latency and throughput.
    `details`: evaluate()'s tta, return_predictions, pr_thresholds, keep_mistakes.

    A batch that cannot fit in memory is refused before the first one is loaded, an allocation that fails all the
    same is one line (models.memory), and a model whose outputs are NaN or inf is refused before any report is made."""
    pre = loaded.info.preprocess
    need = inference_memory(loaded.module, loaded.info.model_name, loader.batch_size, len(loader.dataset), pre.channels,
                            pre.img_size, loader.num_workers * (loader.prefetch_factor or 0))
    require_fits(need, loaded.device)
    with torch.inference_mode(), explain_out_of_memory(need.flags, "lower --batch_size"):
        stats = evaluate(None, loader, loaded.device, num_classes, forward=loaded.forward, show_progress=show_progress,
                         desc=f"eval {loaded.format}", **details)
        if stats.nonfinite:
            raise InputError(f"{loaded.info.source}: the model's outputs are NaN or infinite for {stats.nonfinite} of "
                             f"{stats.num_images} images{broken_weights(loaded.module)}, so its accuracy would mean nothing: "
                             "evaluate a checkpoint from before training diverged, or retrain (e.g. with a lower --base_lr)")
        if speed_repeats > 0:
            batch = next(iter(loader))[0].to(loaded.device)
            sync = torch.cuda.synchronize if loaded.device.type == "cuda" else None
            stats = replace(stats, **latency_and_throughput(loaded.forward, batch[:1], batch, repeats=speed_repeats, sync=sync))
    return stats
