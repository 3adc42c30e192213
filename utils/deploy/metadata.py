"""Artifact metadata: what export.py stores inside every ONNX file (metadata_props), torch.export archive (.pt2)
and TorchScript archive (extra file metadata.json), so an artifact alone says what it is, which classes it predicts
and how to preprocess images. Reading it needs no torch (predict.py's ONNX path); telling artifacts from checkpoints is done here too.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from utils.data.preprocess import Preprocess
from utils.errors import InputError
from utils.io import file_sha256
from utils.model_info import ModelInfo

TORCHSCRIPT_METADATA_FILE = "metadata.json"
ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")
PT2_SUFFIXES = (".pt2",)
CHECKPOINT_SUFFIXES = (".pth",)
PT2_FORMAT_FILE = "archive_format"  # <root>/archive_format holds "pt2" in every torch.export.save archive


def artifact_kind(path: str | Path) -> str:
    """'onnx', 'pt2', 'torchscript' or 'checkpoint', from the extension and (for zip archives) the contents.

    torch.export archives, TorchScript archives and torch.save checkpoints are all zip files: a torch.export archive
    holds <root>/archive_format = "pt2", only TorchScript holds `code/`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if path.suffix.lower() in ONNX_SUFFIXES:
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            fmt = next((n for n in names if n.count("/") == 1 and n.endswith(f"/{PT2_FORMAT_FILE}")), None)
            if fmt is not None and zf.read(fmt).strip() == b"pt2":
                return "pt2"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "checkpoint"
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:1] == b"\x08" and b"pytorch" in head.lower():  # an ONNX protobuf (ir_version, producer) without .onnx
        return "onnx"
    raise InputError(f"{path} is neither an ONNX file, a torch.export (.pt2) or TorchScript archive nor a checkpoint "
                     "written by train.py")


def read_torchscript_metadata(path: str | Path) -> dict:
    """The metadata export.py stores in a TorchScript or .pt2 archive's extra files (<root>/extra/metadata.json; the
    same name in both formats), read without torch."""
    with zipfile.ZipFile(path) as zf:
        name = next((n for n in zf.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_METADATA_FILE}")), None)
        return decode_metadata_json(zf.read(name), str(path)) if name else {}


METADATA_FIX = "; fix: re-export the model with export.py (its metadata was edited or damaged)"


def decode_metadata_json(text: str | bytes, source: str = "") -> dict:
    """A TorchScript archive's metadata.json -> decode_metadata; text that is not a JSON object is one line."""
    try:
        props = json.loads(text)
    except ValueError as e:
        raise InputError(f"{source}: its {TORCHSCRIPT_METADATA_FILE} is not valid JSON ({e}){METADATA_FIX}") from None
    if not isinstance(props, dict):
        raise InputError(f"{source}: its {TORCHSCRIPT_METADATA_FILE} holds {type(props).__name__}, not a JSON object"
                         f"{METADATA_FIX}")
    return decode_metadata(props, source)


def _json_value(meta: dict, key: str, source: str):
    raw = meta[key]
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError as e:
        raise InputError(f"{source}: metadata key {key!r} is not valid JSON ({e}): {raw[:60]!r}{METADATA_FIX}") from None


def _count(meta: dict, key: str, source: str, low: int) -> int:
    raw = meta[key]
    try:
        value = int(raw) if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None
    except ValueError:
        value = None
    if value is None or value < low:
        raise InputError(f"{source}: metadata key {key!r} must be an integer >= {low}, got {raw!r}{METADATA_FIX}")
    return value


def decode_metadata(props: dict[str, str], source: str = "") -> dict:
    """String key/value metadata (ONNX metadata_props) -> typed values (classes list, Preprocess, ...). Every key
    the toolkit reads is checked: a value that is not what export.py writes (not JSON, a wrong type, an img_size of
    0) is an InputError naming `source` and the key, for every reader (predict.py, eval.py, quantize.py)."""
    meta = dict(props)
    if "classes" in meta:
        classes = _json_value(meta, "classes", source)
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise InputError(f"{source}: metadata key 'classes' must be a JSON list of class names, got "
                             f"{str(meta['classes'])[:60]!r}{METADATA_FIX}")
        meta["classes"] = classes
    if "preprocess" in meta:
        raw = meta["preprocess"]
        where = f"{source}: metadata key 'preprocess'"
        meta["preprocess"] = Preprocess.from_json(raw, where) if isinstance(raw, str) else Preprocess.from_dict(raw, where)
    if "model_kwargs" in meta:
        kwargs = _json_value(meta, "model_kwargs", source)
        if not isinstance(kwargs, dict):
            raise InputError(f"{source}: metadata key 'model_kwargs' must be a JSON object, got {str(meta['model_kwargs'])[:60]!r}"
                             f"{METADATA_FIX}")
        meta["model_kwargs"] = kwargs
    for key, low in (("num_classes", 1), ("params", 0)):
        if key in meta:
            meta[key] = _count(meta, key, source, low)
    if "temperature" in meta:  # eval.py --calibrate's temperature scaling
        meta["temperature"] = _temperature(meta, source)
    if isinstance(meta.get("dynamic_size"), str):
        meta["dynamic_size"] = meta["dynamic_size"] == "true"
    return meta


def _temperature(meta: dict, source: str) -> float:
    try:
        value = float(meta["temperature"])
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < float("inf"):
        raise InputError(f"{source}: metadata key 'temperature' must be a positive number, got "
                         f"{str(meta['temperature'])[:60]!r}{METADATA_FIX}")
    return value


def describe_preprocess(pre: Preprocess) -> str:
    """One human-readable line a user of the bare artifact can reimplement."""
    mode = "RGB" if pre.channels == 3 else "grayscale (L)"
    return (f"{mode} image, EXIF orientation applied; resize shorter side to {pre.resize} ({pre.interpolation}); "
            f"center-crop {pre.img_size}x{pre.img_size}; scale to [0, 1]; normalize mean={list(pre.mean)} "
            f"std={list(pre.std)}; layout NCHW float32, {pre.channels} channel(s)")


def build_metadata(info: ModelInfo, checkpoint: str | Path, precision: str, **extra) -> dict[str, str]:
    """String key/value pairs stored in ONNX metadata_props and in TorchScript's extra files."""
    import torch  # only exporters call this, and they have torch loaded; readers of metadata must not need it

    pre: Preprocess = info.preprocess
    meta = {
        "model_name": info.model_name, "classes": json.dumps(list(info.classes)),
        "num_classes": str(len(info.classes)), "preprocess": pre.to_json(), "preprocessing": describe_preprocess(pre),
        "model_kwargs": json.dumps(info.model_kwargs, sort_keys=True), "precision": precision,
        "source_checkpoint": Path(checkpoint).name, "source_sha256": file_sha256(checkpoint),
        "torch_version": str(torch.__version__), "input": "input: float32 NCHW", "output": "logits: float32 (N, num_classes)",
    }
    if info.temperature != 1.0:  # a calibrated checkpoint: readers divide the logits by it before the softmax
        meta["temperature"] = repr(float(info.temperature))
    meta.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in extra.items()})
    return meta


def write_onnx_metadata(proto, metadata: dict[str, str]) -> None:
    """Replace an onnx.ModelProto's metadata_props with `metadata` (export.py and quantize.py's INT8 files)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
