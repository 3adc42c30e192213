"""Post-training quantization: FP16 checkpoints, INT8 static (ONNX Runtime QDQ and PyTorch FX) and dynamic INT8.

- FP16 checkpoint: the (EMA, if any) weights cast to float16, without optimizer/EMA/RNG state. eval.py
  and build_from_checkpoint load it (upcast to FP32 on CPU; real FP16 on CUDA).
- ONNX Runtime INT8: `quantize_static` in QDQ format, uint8 activations and per-channel int8 weights
  (U8S8: the combination ORT's x86 kernels run fastest, 3x the int8/int8 speed for ResNet18 on an
  AVX512-VNNI CPU here at the same accuracy), MinMax calibration on batches of training images (eval
  transform, a fixed random sample), after onnxruntime's `quant_pre_process` (shape inference + graph
  optimisation, as its docs recommend).
- PyTorch INT8: FX graph mode (`prepare_fx` / `convert_fx`) with the x86 backend's default qconfig
  (fbgemm kernels), calibrated on the same batches, saved as TorchScript. It needs a model that
  torch.fx can trace symbolically: all registry models (custom, ResNets, MobileNet V2/V3,
  EfficientNet-B0) can; for others the reason is reported. Runs on CPU only.
- Dynamic INT8: `quantize_dynamic` on nn.Linear layers (weights int8, activations quantized on the
  fly); CNNs keep almost all their weights in convolutions, so it changes little (the warning says how much).

torch.ao.quantization is deprecated upstream in favour of torchao's pt2e flow; it still ships with
the pinned torch and needs no extra package, so it is used here.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import count_parameters
from utils.checkpoint import Checkpoint, inference_state
from utils.deploy.export import quiet_export, save_torchscript
from utils.deploy.metadata import build_metadata, write_onnx_metadata
from utils.errors import InputError
from utils.io import atomic_path, file_sha256, temp_sibling
from utils.model_info import ModelInfo

FP16_KEEP_KEYS = ("model_name", "num_classes", "classes", "preprocess", "model_kwargs", "epoch", "best_acc1", "args",
                  "torch_version")


# ----------------------------------------------------------------------------- FP16


def fp16_checkpoint(ckpt: Checkpoint, source: str | Path) -> Checkpoint:
    """A half-precision inference checkpoint: EMA weights if present, float tensors cast to float16."""
    state = inference_state(ckpt)
    out = {k: ckpt[k] for k in FP16_KEEP_KEYS if k in ckpt}
    out.update(model={k: v.half() if v.is_floating_point() else v for k, v in state.items()}, ema=None, precision="fp16",
               source_checkpoint=Path(source).name, source_sha256=file_sha256(source))
    return out


# ----------------------------------------------------------------------------- ONNX Runtime INT8


def quantize_onnx_int8(fp32_path: Path, output: Path, batches: list[torch.Tensor], metadata_update: dict[str, str],
                       activations: str = "uint8") -> Path:
    """Static INT8 (QDQ, per-channel int8 weights, uint8 or int8 activations) of an exported FP32 ONNX file;
    metadata kept and marked int8."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class BatchReader(CalibrationDataReader):
        """Feeds the calibration batches to onnxruntime's calibrator one at a time."""

        def __init__(self, name: str, arrays: list[np.ndarray]):
            self.name, self.arrays, self.i = name, arrays, 0

        def get_next(self):
            if self.i >= len(self.arrays):
                return None
            self.i += 1
            return {self.name: self.arrays[self.i - 1]}

        def rewind(self):
            self.i = 0

    src = onnx.load(str(fp32_path))
    meta = {p.key: p.value for p in src.metadata_props}
    input_name = src.graph.input[0].name
    pre_path = temp_sibling(output.with_name(output.stem + "_prep.onnx"))  # an intermediate, never published
    try:
        with atomic_path(output) as tmp:
            with quiet_export():
                quant_pre_process(str(fp32_path), str(pre_path))
                quantize_static(str(pre_path), str(tmp), BatchReader(input_name, [b.numpy() for b in batches]),
                                quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                                weight_type=QuantType.QInt8)
            proto = onnx.load(str(tmp))
            write_onnx_metadata(proto, {**meta, **metadata_update})
            onnx.save(proto, str(tmp))
            onnx.checker.check_model(str(tmp), full_check=True)
    finally:
        pre_path.unlink(missing_ok=True)
    return output


# ----------------------------------------------------------------------------- PyTorch INT8


def quantize_fx_int8(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """FX graph mode static INT8 (x86/fbgemm); raises InputError naming the reason when FX cannot trace the model."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    backend = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    if backend not in torch.backends.quantized.supported_engines:
        raise InputError(f"PyTorch INT8 needs the x86/fbgemm quantized engine; this torch has {torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = backend
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao deprecation and observer notices
            prepared = prepare_fx(copy.deepcopy(model).float().cpu().eval(), get_default_qconfig_mapping(backend), (batches[0][:1],))
            with torch.inference_mode():
                for b in batches:
                    prepared(b)
            return convert_fx(prepared)
    except Exception as e:  # torch.fx tracing errors come in many types
        raise InputError(f"PyTorch FX INT8 does not support this model: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None


def linear_fraction(model: nn.Module) -> tuple[int, float]:
    """(number of nn.Linear layers, fraction of parameters they hold)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    total = count_parameters(model)
    in_linear = sum(p.numel() for m in linears for p in m.parameters())
    return len(linears), in_linear / max(total, 1)


def quantize_dynamic_int8(model: nn.Module) -> tuple[nn.Module, str | None]:
    """Dynamic INT8 of nn.Linear layers; also returns a warning when there is nothing (or little) to quantize."""
    from torch.ao.quantization import quantize_dynamic

    count, frac = linear_fraction(model)
    warning = None
    if count == 0:
        warning = "the model has no nn.Linear layers: dynamic quantization changes nothing (use --mode int8 for convolutions)"
    elif frac < 0.2:
        warning = (f"only {100 * frac:.1f}% of the parameters are in nn.Linear layers: dynamic INT8 leaves the convolutions "
                   "in FP32 (use --mode int8 for a real speed-up)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).float().cpu().eval(), {nn.Linear}, dtype=torch.qint8), warning


def save_quantized_torchscript(qmodel: nn.Module, path: Path, info: ModelInfo, checkpoint: str | Path, precision: str,
                               example: torch.Tensor, note: str, params: int) -> Path:
    """Script (or trace) a quantized model and save it atomically with the export metadata; precision e.g. 'int8-fx'."""
    meta = build_metadata(info, checkpoint, precision, quantization=note, params=params)
    with atomic_path(path) as tmp:
        save_torchscript(qmodel, tmp, meta, example)
    return path
