"""Torch-free inference: ONNX Runtime sessions, artifact metadata, top-k, and the per-image predict loop.

Imports only numpy, Pillow and (lazily) onnxruntime, so `predict.py` on an .onnx file starts in well
under a second instead of paying for `import torch`. predict_ckpoint.py and TorchScript prediction reuse
the loop and the output format from here with a torch forward function.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.data.preprocess import Preprocess, preprocess_file
from utils.errors import InputError

METADATA_KEYS = ("model_name", "classes", "preprocess", "preprocessing", "precision", "source_checkpoint",
                 "source_sha256", "exporter", "opset", "dynamic_size", "torch_version")
TORCHSCRIPT_METADATA_FILE = "metadata.json"
ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")


# ----------------------------------------------------------------------------- artifacts and metadata


def artifact_kind(path: str | Path) -> str:
    """'onnx', 'torchscript' or 'checkpoint', from the extension and (for zip archives) the contents.

    TorchScript archives and torch.save checkpoints are both zip files; only TorchScript holds `code/`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if path.suffix.lower() in ONNX_SUFFIXES:
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "checkpoint"
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:1] == b"\x08" and b"pytorch" in head.lower():  # an ONNX protobuf (ir_version, producer) without .onnx
        return "onnx"
    raise InputError(f"{path} is neither an ONNX file, a TorchScript archive nor a checkpoint written by train.py")


def read_torchscript_metadata(path: str | Path) -> dict:
    """The metadata export.py stores in a TorchScript archive's extra files, read without torch."""
    with zipfile.ZipFile(path) as zf:
        name = next((n for n in zf.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_METADATA_FILE}")), None)
        return decode_metadata(json.loads(zf.read(name))) if name else {}


def decode_metadata(props: dict[str, str]) -> dict:
    """String key/value metadata (ONNX metadata_props) -> typed values (classes list, Preprocess, ...)."""
    meta = dict(props)
    if "classes" in meta and isinstance(meta["classes"], str):
        meta["classes"] = json.loads(meta["classes"])
    if "preprocess" in meta:
        raw = meta["preprocess"]
        meta["preprocess"] = Preprocess.from_json(raw) if isinstance(raw, str) else Preprocess.from_dict(raw)
    if isinstance(meta.get("model_kwargs"), str):
        meta["model_kwargs"] = json.loads(meta["model_kwargs"])
    if isinstance(meta.get("dynamic_size"), str):
        meta["dynamic_size"] = meta["dynamic_size"] == "true"
    return meta


def load_class_names(spec: str | None) -> list[str] | None:
    """--classes: a text file with one name per line, or a comma-separated list."""
    if not spec:
        return None
    p = Path(spec)
    if p.is_file():
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    elif "," in spec:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        raise InputError(f"--classes {spec}: not a file; give classes.txt (one name per line) or 'name1,name2,...'")
    if not names:
        raise InputError(f"--classes {spec} holds no class names")
    return names


def resolve_classes(meta_classes: list[str] | None, override: list[str] | None, num_outputs: int | None) -> list[str]:
    """Class names: --classes wins, else the artifact's; without either, 'class_<i>' with a note on stderr."""
    classes = override or meta_classes
    if classes is None:
        if num_outputs is None:
            raise InputError("the model has no class names: pass --classes classes.txt")
        print(f"note: the model stores no class names; showing class_0..class_{num_outputs - 1} (pass --classes)",
              file=sys.stderr)
        return [f"class_{i}" for i in range(num_outputs)]
    if num_outputs is not None and len(classes) != num_outputs:
        raise InputError(f"{len(classes)} class names given but the model has {num_outputs} outputs: fix --classes")
    return list(classes)


# ----------------------------------------------------------------------------- ONNX Runtime


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


class OnnxModel:
    """An ONNX Runtime session plus the metadata export.py stored in the file.

    `__call__` takes a float32 NCHW numpy batch and returns float32 logits (N, num_classes); score maps
    (N, K, h, w) of fully convolutional models are averaged over h, w.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"model file not found: {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
        if threads:
            options.intra_op_num_threads = threads
        providers = select_providers(device)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... classes
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"ONNX Runtime cannot load {self.path}: {first} (is it an .onnx file written by export.py?)") from None
        self.providers = self.session.get_providers()
        model_meta = self.session.get_modelmeta()
        self.metadata = decode_metadata(dict(model_meta.custom_metadata_map))
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
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output as float32, unchanged in shape."""
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, dtype=self.input_dtype)})[0]
        return out.astype(np.float32, copy=False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        logits = self.raw(batch)
        return logits.mean(axis=(2, 3)) if logits.ndim == 4 else logits


# ----------------------------------------------------------------------------- prediction


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def topk(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Indices and probabilities of the k largest entries of a 1-D array, largest first (ties: lower index)."""
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (class, index, probability)
    inference_ms: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "top": [{"class": c, "index": i, "prob": p} for c, i, p in self.top],
                "inference_ms": self.inference_ms}


def predict_files(forward: Callable[[np.ndarray], np.ndarray], paths: Sequence[Path], pre: Preprocess,
                  classes: list[str], k: int = 5, warmup: int = 3, repeats: int = 1) -> list[Prediction]:
    """Preprocess each image with the shared eval transform, run `forward`, keep the top k.

    Bad files (missing, not an image, truncated) become Predictions with `error` set; the rest go on.
    The first good image is run `warmup` times untimed; each image's time is the median of `repeats` runs.
    """
    results: list[Prediction] = []
    warmed = False
    for path in paths:
        try:
            x = preprocess_file(path, pre)[None]
        except InputError as e:
            results.append(Prediction(str(path), error=str(e)))
            continue
        if not warmed:
            for _ in range(warmup):
                forward(x)
            warmed = True
        times, logits = [], None
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            logits = forward(x)
            times.append(time.perf_counter() - start)
        probs = softmax(np.asarray(logits, dtype=np.float64)[0])
        top = [(classes[i], i, p) for i, p in topk(probs, k)]
        results.append(Prediction(str(path), top, float(np.median(times)) * 1000.0))
    return results


def report(results: list[Prediction], header: dict, as_json: bool, k: int) -> int:
    """Print the predictions (text or JSON on stdout, bad files on stderr); exit code 2 if any image failed."""
    failed = [r for r in results if r.error]
    good = [r for r in results if not r.error]
    times = [r.inference_ms for r in good]
    summary = dict(header, num_images=len(results), num_failed=len(failed),
                   median_inference_ms=float(np.median(times)) if times else None)
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)
    if as_json:
        print(json.dumps({"summary": summary, "predictions": [r.to_dict() for r in results]}, indent=2))
    else:
        print(f"model: {header['model']} ({header['engine']}, {header['precision']}, {header['device']})  "
              f"loaded in {header['load_ms']:.1f} ms")
        for r in good:
            print(f"\n{r.image}\nTop {min(k, len(r.top))} predictions:")
            width = max(len(c) for c, _, _ in r.top)
            for rank, (name, _, p) in enumerate(r.top, 1):
                print(f"  {rank}. {name:<{width}}  {100 * p:6.2f}%")
            print(f"  inference {r.inference_ms:.2f} ms")
        if times:
            print(f"\n{len(good)} image(s): median inference {summary['median_inference_ms']:.2f} ms per image "
                  f"(batch 1, after {header['warmup']} warm-up runs), model load {header['load_ms']:.1f} ms")
    if failed:
        print(f"{len(failed)} of {len(results)} image(s) could not be read (see the error lines above)", file=sys.stderr)
        return 2
    return 0


def expand_images(specs: Sequence[str]) -> list[Path]:
    """--image values (files, folders, globs) -> image paths; an empty expansion is an input error."""
    from utils.data.preprocess import list_images

    paths = list_images(list(specs))
    if not paths:
        raise InputError(f"--image {' '.join(specs)}: no images found (give files, a folder or a quoted glob like 'imgs/*.png')")
    return paths
