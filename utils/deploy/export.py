"""Export a trained network to ONNX, a torch.export archive (.pt2) or TorchScript, prove the file computes what
PyTorch computes, then publish it.

Each export is written to a temporary name, checked (onnx.checker full check; numeric parity with ONNX
Runtime, the reloaded .pt2 program or the reloaded TorchScript module against the PyTorch model on random batches
and real preprocessed images; metadata round trip) and only then renamed to its final path. A failed check
removes the temporary file and raises ParityError.

Choices, and why:
- ONNX exporter: the torch.export-based exporter (`dynamo=True`, opset 18) is the default: it is what PyTorch 2.x
  maintains, and the batch axis (H/W too with dynamic_size) is made dynamic through `dynamic_shapes`
  (torch.export.Dim). It is slower to run (4-32 s per registry model on one core here, against 0.1-7 s; docs/deploy.md) but
  that is paid once per export. The TorchScript-based exporter (`exporter="legacy"`, opset 17, `dynamic_axes`) is
  kept for runtimes older than opset 18; PyTorch deprecates it, so choosing it prints one line of ours instead of
  the library's DeprecationWarning.
- .pt2: `torch.export.export` + `torch.export.save`, metadata in the archive's extra files; loaded back through
  utils.deploy.pt2's safety check (torch.export.load alone is not weights_only).
- TorchScript: legacy (torch.jit is deprecated in PyTorch 2.x; kept because users have .pt files and runtimes
  built on libtorch). Scripted (`torch.jit.script`), not traced, so the saved program keeps Python control flow
  and has no shapes baked in; models that cannot be scripted fall back to tracing, with a message saying so.
- FP16: ONNX is exported in FP32 and converted with onnxruntime's float16 converter keeping float32 inputs
  and outputs; .pt2 and TorchScript wrap the half-precision network in a float32 -> float16 -> float32 cast.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import count_parameters
from utils.data.preprocess import Preprocess
from utils.deploy.artifacts import (
    TORCHSCRIPT_DEPRECATED,
    HalfPrecision,
    deprecation_note,
    legacy_torchscript,
    load_torchscript,
    warn_stderr,
)
from utils.deploy.metadata import TORCHSCRIPT_METADATA_FILE, build_metadata, write_onnx_metadata
from utils.deploy.parity import (
    FP32_ATOL,
    FP32_RTOL,
    ParityError,
    ParityReport,
    check_parity,
    describe_tolerance,
    probe_size,
    random_batches,
    reference_outputs,
    supports_dynamic_size,
    torch_forward,
)
from utils.deploy.pt2 import load_program, save_program
from utils.deploy.runtime import OnnxModel
from utils.errors import InputError
from utils.io import atomic_path
from utils.model_info import ModelInfo

DYNAMO_MIN_OPSET = 18
DEFAULT_OPSET = DYNAMO_MIN_OPSET  # the default (dynamo) exporter's
LEGACY_OPSET = 17  # the TorchScript-based exporter's default, for runtimes without opset 18
EXPORTERS = ("dynamo", "legacy")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
LEGACY_ONNX_NOTE = ("note: --exporter legacy uses PyTorch's TorchScript-based ONNX exporter, deprecated since PyTorch 2.9 "
                    "and kept here only for runtimes older than opset 18; the default (dynamo) exporter writes opset 18+")


def default_output(checkpoint: str | Path, model_name: str, engine: str, half: bool = False) -> Path:
    """<checkpoint dir>/converted_models/<model>[_fp16].onnx|.pt2|.pt"""
    return Path(checkpoint).parent / "converted_models" / f"{model_name}{'_fp16' if half else ''}{SUFFIXES[engine]}"


@contextlib.contextmanager
def legacy_onnx_exporter(log=warn_stderr):
    """The TorchScript-based ONNX exporter, chosen explicitly (--exporter legacy): its DeprecationWarning ("You are using
    the legacy TorchScript-based ONNX export...") and that of the torch.onnx helper it calls ("The feature will be
    removed...") become one line of ours; any other warning still shows. Its stdout chatter is dropped."""
    rules = [(DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export"),
             (DeprecationWarning, r"The feature will be removed"), (FutureWarning, TORCHSCRIPT_DEPRECATED)]
    with deprecation_note(rules, LEGACY_ONNX_NOTE, log), contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def quiet_stdout():
    """torch.onnx's dynamo exporter prints its progress ("[torch.onnx] Obtain model graph ...") on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def topological_sort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (onnx.checker requires it)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    produced_by_graph = {o for n in graph.node for o in n.output}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available or i not in produced_by_graph for i in n.input)]
        if not ready:
            raise ParityError("the ONNX graph has a cycle after FP16 conversion")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    nodes = [copy.deepcopy(n) for n in ordered]
    del graph.node[:]
    graph.node.extend(nodes)


def write_onnx(model: nn.Module, path: Path, pre: Preprocess, metadata: dict[str, str], opset: int,
               dynamic_size: bool, half: bool, exporter: str = "dynamo", log=print) -> None:
    """Export (FP32 graph, optional FP16 conversion), attach metadata, run onnx.checker's full check."""
    import onnx

    example = torch.zeros(2, pre.channels, pre.img_size, pre.img_size)
    with torch.inference_mode():
        out_rank = model(example).dim()
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch", min=1)}
        if dynamic_size:
            dims.update({2: torch.export.Dim("height", min=1), 3: torch.export.Dim("width", min=1)})
        with quiet_stdout():
            program = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=(dims,), verbose=False)
        program.save(str(path))
    elif exporter == "legacy":
        in_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
        out_axes = {0: "batch", 2: "out_height", 3: "out_width"} if dynamic_size and out_rank == 4 else {0: "batch"}
        with legacy_onnx_exporter(log):
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": in_axes, "logits": out_axes},
                              do_constant_folding=True)
    else:
        raise InputError(f"unknown ONNX exporter {exporter!r}: use dynamo or legacy")
    proto = onnx.load(str(path))
    if half:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = convert_float_to_float16(proto, keep_io_types=True)
        topological_sort(proto.graph)  # the converter appends the input Casts after their consumers
    write_onnx_metadata(proto, metadata)
    proto.doc_string = f"{metadata['model_name']} image classifier exported from {metadata['source_checkpoint']}"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def save_torchscript(module: nn.Module, path: Path, metadata: dict[str, str], example: torch.Tensor, log=warn_stderr) -> str:
    """Script `module` (or trace it on `example` when it cannot be scripted, saying so) and save it with the metadata
    as the extra file metadata.json. Returns 'scripted' or 'traced' (also recorded in the metadata)."""
    note = None
    with legacy_torchscript(log):
        try:
            program, method = torch.jit.script(module), "scripted"
        except Exception as e:  # TorchScript raises many different frontend errors
            note = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            program, method = torch.jit.trace(module, example), "traced"
        extra = {TORCHSCRIPT_METADATA_FILE: json.dumps(dict(metadata, torchscript=method), indent=1)}
        torch.jit.save(program, str(path), _extra_files=extra)
    if note:
        log(f"note: torch.jit.script failed ({note}); traced instead, so Python control flow is frozen to the path "
            "taken by the example input")
    return method


def write_torchscript(model: nn.Module, path: Path, pre: Preprocess, metadata: dict[str, str], half: bool, log=warn_stderr) -> str:
    """The network (in float16 behind float32 casts with `half`) as a TorchScript program; returns how it was made."""
    module = HalfPrecision(copy.deepcopy(model)) if half else model
    return save_torchscript(module, path, metadata, torch.zeros(1, pre.channels, pre.img_size, pre.img_size), log)


def write_pt2(model: nn.Module, path: Path, pre: Preprocess, metadata: dict[str, str], half: bool, dynamic_size: bool) -> None:
    """The network (in float16 behind float32 casts with `half`) as a torch.export program with a dynamic batch."""
    module = HalfPrecision(copy.deepcopy(model)) if half else model
    save_program(module, path, metadata, torch.zeros(2, pre.channels, pre.img_size, pre.img_size), dynamic_size)


@dataclass
class ExportResult:
    path: Path
    engine: str
    precision: str
    parity: ParityReport
    size_mb: float
    method: str  # exporter / scripted / traced


def _check_metadata(meta: dict, info: ModelInfo) -> None:
    if meta.get("classes") != list(info.classes) or meta.get("model_name") != info.model_name:
        raise ParityError("metadata did not survive the round trip (classes/model name differ after reload)")
    if meta.get("preprocess") != info.preprocess:
        raise ParityError("preprocessing metadata did not survive the round trip")


def export_artifact(model: nn.Module, info: ModelInfo, checkpoint: str | Path, engine: str, output: str | Path,
                    opset: int | None = None, dynamic_size: bool = False, half: bool = False, exporter: str = "dynamo",
                    real: tuple[str, np.ndarray] | None = None, atol: float = FP32_ATOL, rtol: float = FP32_RTOL,
                    log=print, note=warn_stderr) -> ExportResult:
    """Write one artifact (engine 'onnx', 'pt2' or 'torchscript') to a temporary file, verify it, then rename to
    `output`. `opset` None: the exporter's default. `log` gets the parity lines, `note` the legacy-API notes.

    Raises ParityError (temporary file removed, `output` untouched) when a check fails.
    """
    if opset is None:
        opset = LEGACY_OPSET if exporter == "legacy" else DEFAULT_OPSET
    model = model.float().eval().cpu()
    pre: Preprocess = info.preprocess
    output = Path(output)
    if dynamic_size and not supports_dynamic_size(model, pre):
        raise InputError(f"--dynamic_size: {info.model_name} has layers of fixed input size (e.g. a Linear on flattened "
                         f"features) and fails at {probe_size(pre)} px; drop --dynamic_size (fully convolutional or "
                         "global-pooled models such as fcn_resnet18, ResNets, MobileNets support it)")
    precision = "fp16" if half else "fp32"
    params = count_parameters(model)
    batches = random_batches(pre, dynamic_size) + ([real] if real is not None else [])
    expected = reference_outputs(torch_forward(model), batches, str(checkpoint))
    with atomic_path(output) as tmp:
        if engine == "onnx":
            if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
                raise InputError(f"--opset {opset}: the default (dynamo) exporter writes opset {DYNAMO_MIN_OPSET} or newer; "
                                 f"for opset {opset} add --exporter legacy")
            if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
                raise InputError("the ONNX exporter (dynamo, the default) needs the onnxscript package (pip install -r "
                                 "requirements.txt, which pins it); --exporter legacy needs only onnx")
            meta = build_metadata(info, checkpoint, precision, exporter=exporter, opset=opset, dynamic_size=dynamic_size,
                                  params=params)
            write_onnx(model, tmp, pre, meta, opset, dynamic_size, half, exporter, note)
            method = f"torch.onnx ({exporter} exporter, opset {opset})"
            candidate = OnnxModel(tmp, device="cpu")
            _check_metadata(candidate.metadata, info)
            forward = candidate.raw
        elif engine == "pt2":
            meta = build_metadata(info, checkpoint, precision, dynamic_size=dynamic_size, params=params)
            write_pt2(model, tmp, pre, meta, half, dynamic_size)
            method = f"torch.export (torch {torch.__version__})"
            program, loaded_meta = load_program(tmp)
            _check_metadata(loaded_meta, info)
            forward = torch_forward(program)
        elif engine == "torchscript":
            meta = build_metadata(info, checkpoint, precision, dynamic_size=dynamic_size, params=params)
            method = write_torchscript(model, tmp, pre, meta, half, note)
            program, loaded_meta = load_torchscript(tmp, log=lambda _: None)  # the note was given once, on writing
            _check_metadata(loaded_meta, info)
            forward = torch_forward(program)
        else:
            raise InputError(f"unknown engine {engine!r}: use onnx, pt2 or torchscript")
        report = check_parity(expected, forward, batches, precision, atol, rtol)
        log(f"{engine} {precision} parity vs PyTorch (tolerance {describe_tolerance(precision, report, atol, rtol)}):")
        for line in report.lines():
            log(line)
        if not report.passed:
            raise ParityError(f"{engine} {precision} export differs from PyTorch by {report.max_abs_diff:.3g} "
                              f"> tolerance {report.tolerance:.3g}; nothing written to {output}")
    return ExportResult(output, engine, precision, report, output.stat().st_size / 1e6, method)
