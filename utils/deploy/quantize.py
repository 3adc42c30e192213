"""Post-training quantization: FP16 (checkpoint, ONNX, .pt2) and INT8 on ONNX Runtime (static QDQ, dynamic).

- FP16 checkpoint: the (EMA, if any) weights cast to float16, without optimizer/EMA/RNG state. eval.py
  and build_from_checkpoint load it (upcast to FP32 on CPU; real FP16 on CUDA). FP16 ONNX and .pt2 are made by
  the exporter (utils.deploy.export, half=True).
- ONNX Runtime INT8, static: `quantize_static` in QDQ format, uint8 activations and per-channel int8 weights
  (U8S8: the combination ORT's x86 kernels run fastest, 3x the int8/int8 speed for ResNet18 on an
  AVX512-VNNI CPU here at the same accuracy), MinMax calibration on batches of training images (eval
  transform, a fixed random sample), after onnxruntime's `quant_pre_process` (shape inference + graph
  optimisation, as its docs recommend).
- ONNX Runtime INT8, dynamic: `quantize_dynamic` of the MatMul/Gemm weights (the nn.Linear layers; activations
  quantized per batch at run time); CNNs keep most weights in convolutions, so it changes little (the warning
  says how much).

No PyTorch INT8 any more: `torch.ao.quantization` (the FX graph mode INT8 and `quantize_dynamic` this module used)
is deprecated in PyTorch 2.x in favour of torchao. torchao 0.18.0 (installable, needs no other torch) was tried on
these CNNs (docs/deploy.md): its CPU INT8 path for convolutions (pt2e with X86InductorQuantizer) only runs as INT8
once compiled by torch.compile/Inductor (a C++ toolchain on the target); run eagerly it is float maths with extra
quantize/dequantize steps, slower than FP32. ONNX Runtime's INT8 needs neither and is what a deployment runs, so it
is the one INT8 path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import count_parameters
from utils.checkpoint import Checkpoint, inference_state
from utils.deploy.metadata import write_onnx_metadata
from utils.io import atomic_path, file_sha256, temp_sibling

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

    input_name = onnx.load(str(fp32_path)).graph.input[0].name

    def quantize(prepared: str, tmp: str) -> None:
        quantize_static(prepared, tmp, BatchReader(input_name, [b.numpy() for b in batches]),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8)

    return _quantized_onnx(fp32_path, output, metadata_update, quantize)


def quantize_onnx_dynamic(fp32_path: Path, output: Path, metadata_update: dict[str, str]) -> Path:
    """Dynamic INT8 of an exported FP32 ONNX file's MatMul/Gemm weights (nn.Linear); metadata kept and marked."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def quantize(prepared: str, tmp: str) -> None:
        quantize_dynamic(prepared, tmp, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)

    return _quantized_onnx(fp32_path, output, metadata_update, quantize)


def _quantized_onnx(fp32_path: Path, output: Path, metadata_update: dict[str, str], quantize) -> Path:
    """quantize(prepared, tmp) on onnxruntime's pre-processed copy of the FP32 file (symbolic shape inference +
    optimisation: without it ONNX Runtime's quantizers fail on the dynamo exporter's graphs, e.g. FashionCNN's flatten
    -> Gemm), then the FP32 file's metadata with `metadata_update`, checked, published in one rename."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props}
    pre_path = temp_sibling(output.with_name(output.stem + "_prep.onnx"))  # an intermediate, never published
    try:
        with atomic_path(output) as tmp:
            quant_pre_process(str(fp32_path), str(pre_path))
            quantize(str(pre_path), str(tmp))
            proto = onnx.load(str(tmp))
            write_onnx_metadata(proto, {**meta, **metadata_update})
            onnx.save(proto, str(tmp))
            onnx.checker.check_model(str(tmp), full_check=True)
    finally:
        pre_path.unlink(missing_ok=True)
    return output


def linear_fraction(model: nn.Module) -> tuple[int, float]:
    """(number of nn.Linear layers, fraction of parameters they hold)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    total = count_parameters(model)
    in_linear = sum(p.numel() for m in linears for p in m.parameters())
    return len(linears), in_linear / max(total, 1)


def dynamic_warning(model: nn.Module) -> str | None:
    """Why dynamic INT8 would change little: no nn.Linear layers, or few of the parameters in them."""
    count, frac = linear_fraction(model)
    if count == 0:
        return "the model has no nn.Linear layers: dynamic quantization changes nothing (use --mode int8 for convolutions)"
    if frac < 0.2:
        return (f"only {100 * frac:.1f}% of the parameters are in nn.Linear layers: dynamic INT8 leaves the convolutions "
                "in FP32 (use --mode int8 for a real speed-up)")
    return None
