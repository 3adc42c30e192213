"""ONNX Runtime without torch: choosing execution providers and running an exported model.

Imports only numpy and (lazily) onnxruntime, so `predict.py` on an .onnx file starts in well under a second
instead of paying for `import torch`.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

from utils.data.preprocess import Preprocess
from utils.deploy.metadata import decode_metadata
from utils.errors import InputError


def cuda_device_count() -> int:
    """GPUs visible to the CUDA driver (0 when there is no driver), without torch and without log noise."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def select_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers: CUDA only when onnxruntime-gpu has it AND a GPU is present.

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU and then logs errors
    when a session tries it; checking the driver first keeps CPU-only machines quiet.
    """
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r}: use auto, cpu or cuda")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and device != "cpu" and cuda_device_count() > 0
    if device == "cuda" and not has_cuda:
        raise InputError("--device cuda: ONNX Runtime cannot use a GPU here (no CUDA driver/GPU or a CPU-only "
                         "onnxruntime build): use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]


def pool_score_map(logits):
    """(N, K) logits from a model's output: score maps (N, K, h, w) of fully convolutional models are averaged over
    h and w. Works on numpy arrays and torch tensors alike (both take `axis`)."""
    return logits.mean(axis=(2, 3)) if logits.ndim == 4 else logits


class OnnxModel:
    """An ONNX Runtime session plus the metadata export.py stored in the file.

    `__call__` takes a float32 NCHW numpy batch and returns float32 logits (N, num_classes); score maps
    (N, K, h, w) of fully convolutional models are averaged over h, w.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0, spinning: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"model file not found: {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:  # idle inference threads sleep instead of spinning: leaves the cores to decoding threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = select_providers(device)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... classes
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"ONNX Runtime cannot load {self.path}: {first} (is it an .onnx file written by export.py?)") from None
        self.providers = self.session.get_providers()
        model_meta = self.session.get_modelmeta()
        self.metadata = decode_metadata(dict(model_meta.custom_metadata_map), str(self.path))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        self.input_shape = list(inp.shape)
        out = self.session.get_outputs()[0]
        self.output_name = out.name
        k = out.shape[1] if len(out.shape) > 1 and isinstance(out.shape[1], int) else None
        self.num_outputs = k

    @property
    def preprocess(self) -> Preprocess | None:
        return self.metadata.get("preprocess")

    @property
    def max_batch(self) -> int | None:
        """The batch size the model was exported with when it is fixed (None: any batch size)."""
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) and first > 0 else None

    def check_input(self, pre: Preprocess) -> None:
        """The images `pre` makes (N, channels, img_size, img_size) must fit the model's declared input: a mismatch
        (a 1-channel model given RGB preprocessing, a fixed size other than the metadata's) is one clear error
        before any image is read, not an ONNX Runtime message halfway through a folder."""
        shape = self.input_shape
        made = f"{pre.channels}x{pre.img_size}x{pre.img_size} (channels x height x width)"
        fix = "re-export the model with export.py so its metadata matches its input"
        if len(shape) != 4:
            raise InputError(f"{self.path} takes input of shape {shape}, not a batch of images (N, C, H, W): {fix}")
        _, c, h, w = shape
        if isinstance(c, int) and c != pre.channels:
            raise InputError(f"{self.path} expects {c}-channel images but its preprocessing makes {made}: {fix}")
        for name, dim in (("height", h), ("width", w)):
            if isinstance(dim, int) and dim != pre.img_size:
                raise InputError(f"{self.path} expects a fixed input {name} of {dim} px but its preprocessing makes {made}: "
                                 f"{fix} (or pass --img_size {dim} for a model without preprocessing metadata)")

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output as float32, unchanged in shape. An ONNX Runtime failure on the batch (an input
        the graph does not accept) is an InputError naming the shape."""
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=self.input_dtype)}
        try:
            out = self.session.run([self.output_name], feed)[0]
        except Exception as e:  # onnxruntime's own InvalidArgument/Fail/RuntimeException classes
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"ONNX Runtime cannot run {self.path} on a batch of shape {list(batch.shape)} "
                             f"(the model declares {self.input_shape}): {first}") from None
        return out.astype(np.float32, copy=False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return pool_score_map(self.raw(batch))
