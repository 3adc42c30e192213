"""Model complexity with fvcore, ptflops, thop, torchscan and torch's FlopCounterMode, in named units.

Units: a MAC is one multiply-accumulate (a*b + c); FLOPs here means 2 x MACs unless a tool is said to define
its own FLOPs (torchscan's module FLOPs also count additions, comparisons and divisions one by one).
Every runner returns a `ToolResult` with params, MACs, FLOPs, the tool's native unit and what it counts,
so scripts never mislabel one for the other. The shared flags and model loading of the analysis scripts
(complexity_*.py, receptive_field*.py) live here too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as pkg_version
from pathlib import Path

import torch
from torch import nn

from models import MODEL_NAMES, build_model, count_parameters
from utils import cli
from utils.analysis.rf_trace import receptive_fields
from utils.checkpoint import build_from_checkpoint, load_checkpoint
from utils.errors import InputError
from utils.io import publish_report

COMPLEXITY_DIR = Path("results/complexity")

# What each tool counts (checked against the sources of the pinned versions; see tests/test_complexity.py).
CONVENTIONS = {
    "fvcore": "native unit: MACs (fvcore calls one fused multiply-add one 'flop'). Counts conv and linear/matmul "
              "(weights only, no bias), batch norm (2 per element with affine), adaptive average pooling "
              "(1 per input element), group/layer norm, upsampling. Skips ReLU, max pooling and additions "
              "(listed as 'not counted').",
    "ptflops": "native unit: MACs ('GMac'). pytorch backend: module hooks count conv and Linear with bias "
               "(+1 per output element), BN (2 per element with affine), ReLU/ReLU6/GELU (1 per element), "
               "pooling (1 per input element); torch.add/torch.mul and F.relu calls add MACs not attributed to a "
               "module; `x + y` operators, Hardswish, SiLU and Sigmoid count 0. aten backend: conv and matmul only.",
    "thop": "native unit: MACs. Counts conv and Linear (weights only, no bias), BN (4 per element with affine), "
            "AvgPool (1 per output element), AdaptiveAvgPool (window + 1 per output element); ReLU, max pooling "
            "and Dropout count 0, and so do module types it has no rule for (Hardswish, SiLU, Sigmoid, custom).",
    "torchscan": "reports MACs, its own FLOPs and DMAs (memory accesses). MACs: conv and Linear (weights only, the "
                 "bias 'rides in the accumulation'), BN (2 per element with affine), max pooling (k-1 per output), "
                 "average pooling (k per output); Hardswish, SiLU and other unknown modules count 0. Its FLOPs count "
                 "every multiply, add, comparison and division, so they are not exactly 2 x MACs.",
    "FlopCounterMode": "torch.utils.flop_counter: native unit FLOPs = 2 x MACs of convolutions and matrix "
                       "products only (no bias, BN, activations, pooling or additions).",
}

CATEGORY_ORDER = ("conv", "linear", "norm", "activation", "pool", "elementwise", "other")


@dataclass
class ToolResult:
    """One tool's count for one model and input, in explicit units."""

    tool: str
    version: str
    params: int
    macs: float | None          # multiply-accumulates (MACs)
    flops: float | None         # FLOPs as this tool defines them (2 x MACs unless stated)
    native_unit: str
    convention: str
    per_module: list[dict] = field(default_factory=list)   # {"module", "type", "depth", "params", "macs"}
    by_operator: dict[str, float] = field(default_factory=dict)  # operator or module type -> MACs
    by_category: dict[str, float] = field(default_factory=dict)  # conv/linear/norm/activation/pool/... -> MACs
    extra: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Shared CLI pieces for the analysis scripts


def add_model_args(p: argparse.ArgumentParser, default_model: str = "resnet18") -> None:
    """--model, --num_classes, --input_size, --weights, --device, --json."""
    p.add_argument("--model", default=None,
                   help=f"registry name (custom, resnet18..152, mobilenet_v2/v3, efficientnet_b0, fcn_resnet18) or any "
                        f"torchvision classifier (vgg16, alexnet, ...); default {default_model}, or the checkpoint's model")
    p.add_argument("--num_classes", type=cli.positive(), default=None,
                   help="output classes; default 10 for the registry's training models, 1000 for other "
                        "(ImageNet) architectures and fcn_resnet18")
    p.add_argument("--input_size", type=cli.positive(), nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input tensor size without the batch dimension; default 3 224 224 (or the checkpoint's)")
    p.add_argument("--weights", default=None, metavar="CKPT",
                   help="project checkpoint (train.py): model, classes and input size come from it")
    cli.add_device_arg(p, default="cpu")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout instead of tables")
    p.set_defaults(default_model=default_model)


def default_num_classes(name: str) -> int:
    return 10 if name in MODEL_NAMES else 1000


@dataclass
class AnalysisModel:
    model: nn.Module
    name: str
    num_classes: int
    input_size: tuple[int, int, int]
    source: str
    classes: list[str] | None = None


def _build(name: str, num_classes: int, img_size: int, in_channels: int, fast_init: bool, meta: bool = False,
           **model_kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchvision's googlenet/inception init notices
        if fast_init:
            try:
                with torch.device("meta"):
                    model = build_model(name, num_classes, img_size=img_size, in_channels=in_channels, **model_kwargs)
                return model if meta else model.to_empty(device="cpu")
            except (NotImplementedError, RuntimeError):
                pass  # builders that compute with tensors (regnet) cannot run on the meta device
        return build_model(name, num_classes, img_size=img_size, in_channels=in_channels, **model_kwargs)


def load_analysis_model(args: argparse.Namespace, device: torch.device | str = "cpu", fast_init: bool = False,
                        meta: bool = False) -> AnalysisModel:
    """The model the analysis flags describe, in eval mode on `device`.

    fast_init=True skips weight initialisation (the values do not matter for counting operations);
    meta=True leaves it on the meta device when possible (shapes only: for receptive fields).
    """
    if args.input_size is not None and any(v <= 0 for v in args.input_size):
        raise InputError(f"--input_size must be three positive integers C H W, got {' '.join(map(str, args.input_size))}")
    if args.num_classes is not None and args.num_classes <= 0:
        raise InputError(f"--num_classes must be positive, got {args.num_classes}")
    if args.weights:
        ckpt = load_checkpoint(args.weights)
        model, info = build_from_checkpoint(ckpt, model_name=args.model)
        pre = info.preprocess
        size = tuple(args.input_size) if args.input_size else (pre.channels, pre.img_size, pre.img_size)
        return AnalysisModel(model.to(device).eval(), info.model_name, info.num_classes, size,
                             f"checkpoint {args.weights}", info.classes)
    name = args.model or getattr(args, "default_model", "resnet18")
    num_classes = args.num_classes or default_num_classes(name)
    size = tuple(args.input_size) if args.input_size else (3, 224, 224)
    # img_size is the size the network is built for: FashionCNN's Linear depends on it; the FCN keeps its
    # 224-px pooling window whatever the analysed input (that is the point of it)
    img_size = 224 if name == "fcn_resnet18" else size[1]
    model = _build(name, num_classes, img_size=img_size, in_channels=size[0], fast_init=fast_init or meta, meta=meta)
    source = "uninitialised weights (values do not matter for counting)" if fast_init or meta else "random initialisation"
    if not (meta and next(iter(model.parameters()), torch.empty(0)).is_meta):
        model = model.to(device)
    return AnalysisModel(model.eval(), name, num_classes, size, source)


def check_forward(am: AnalysisModel, device) -> None:
    """Run one forward pass; a shape problem becomes an InputError naming --input_size."""
    x = torch.zeros(1, *am.input_size, device=device)
    try:
        with torch.no_grad():
            am.model(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{am.name} cannot run on input {tuple(am.input_size)}: {first} "
                         "(fix --input_size: channels must match the model, the image large enough)") from None


def result_stem(am: AnalysisModel) -> str:
    c, h, w = am.input_size
    return f"{am.name}_{h}x{w}" + ("" if c == 3 else f"_c{c}")


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def category(kind: str) -> str:
    """Group an operator or module type name into conv / linear / norm / activation / pool / elementwise / other."""
    k = kind.lower()
    if "conv" in k:
        return "conv"
    if any(s in k for s in ("linear", "addmm", "matmul", "bmm", "einsum", "mm")):
        return "linear"
    if "norm" in k:
        return "norm"
    if "pool" in k:
        return "pool"
    if any(s in k for s in ("relu", "gelu", "silu", "swish", "sigmoid", "tanh", "elu", "hardswish", "softmax", "mish")):
        return "activation"
    if any(s in k for s in ("add", "mul", "sub", "div", "functional")):
        return "elementwise"
    return "other"


def by_category(by_operator: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in by_operator.items():
        c = category(k)
        out[c] = out.get(c, 0) + float(v)
    return {c: out[c] for c in CATEGORY_ORDER if c in out}


def _module_params(model: nn.Module) -> dict[str, int]:
    return {name: count_parameters(m) for name, m in model.named_modules()}


def _per_module_from_leaves(model: nn.Module, leaf_macs: dict[str, float], extra_root: float = 0.0) -> list[dict]:
    """Inclusive per-module MACs (every module = sum of its leaves), in model order."""
    params = _module_params(model)
    rows = []
    for name, m in model.named_modules():
        prefix = name + "." if name else ""
        total = sum(v for k, v in leaf_macs.items() if k == name or k.startswith(prefix)) if name else \
            sum(leaf_macs.values()) + extra_root
        rows.append({"module": name or "(model)", "type": type(m).__name__, "depth": name.count(".") + 1 if name else 0,
                     "params": params[name], "macs": total})
    return rows


def _leaf_types(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if n and not any(m.children())}


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.3f} {prefix}{unit}"
    return f"{v:.0f} {unit}".rstrip()


@contextlib.contextmanager
def _quiet():
    """Silence the tools' own prints and warnings (their findings are returned, not printed)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _input(model: nn.Module, input_size, device) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    return torch.zeros(1, *input_size, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# The tools


def run_fvcore(model: nn.Module, input_size, device="cpu") -> ToolResult:
    with _quiet():  # fvcore scripts helpers with torch.jit at import time, which warns
        from fvcore.nn import FlopCountAnalysis, parameter_count

    x = _input(model, input_size, device)
    with _quiet():
        fca = FlopCountAnalysis(model, (x,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = fca.total()
        by_op = dict(fca.by_operator())
        by_mod = dict(fca.by_module())
        unsupported = dict(fca.unsupported_ops())
    params = parameter_count(model)
    rows = [{"module": n or "(model)", "type": type(m).__name__, "depth": n.count(".") + 1 if n else 0,
             "params": int(params.get(n, 0)), "macs": float(by_mod.get(n, 0))} for n, m in model.named_modules()]
    warns = [f"not counted by fvcore: {', '.join(f'{k} x{v}' for k, v in sorted(unsupported.items()))}"] if unsupported else []
    return ToolResult("fvcore", pkg_version("fvcore"), int(params[""]), float(total), 2.0 * total, "MACs",
                      CONVENTIONS["fvcore"], rows, {k: float(v) for k, v in by_op.items()}, by_category(by_op),
                      {"not_counted": unsupported}, warns)


def run_ptflops(model: nn.Module, input_size, device="cpu", backend: str = "pytorch") -> ToolResult:
    """ptflops through its own counting machinery, keeping the per-module counts its public API only prints."""
    import ptflops
    from ptflops import pytorch_engine as pe

    x = _input(model, input_size, device)
    types = _leaf_types(model)
    if backend == "aten":
        from ptflops.aten_engine import FlopCounterMode as PtFlopCounter

        with _quiet():
            counter = PtFlopCounter(model, output_params={"serialize_params": {}, "print_params": {"file": io.StringIO()}})
            with torch.no_grad(), counter:
                model(x)
        counts = {k: dict(v) for k, v in counter.flop_counts.items()}
        total = float(sum(counts.get("Global", {}).values()))
        by_op = {str(k): float(v) for k, v in counts.get("Global", {}).items()}
        params = _module_params(model)
        rows = [{"module": "(model)", "type": type(model).__name__, "depth": 0, "params": params[""], "macs": total}]
        rows += [{"module": n, "type": type(m).__name__, "depth": 1, "params": params[n],
                  "macs": float(sum(counts.get(n, {}).values()))} for n, m in model.named_children()]
        conv = "native unit: MACs. aten backend: counts aten convolution, mm, addmm, bmm only (per top-level module)."
        return ToolResult("ptflops", ptflops.__version__ if hasattr(ptflops, "__version__") else pkg_version("ptflops"),
                          int(pe.get_model_parameters_number(model)), total, 2 * total, "MACs", conv, rows, by_op,
                          by_category(by_op), {"backend": "aten"})
    if backend != "pytorch":
        raise InputError(f"unknown ptflops backend {backend!r}: use pytorch or aten")
    func_macs: list[float] = []
    tensor_macs: list[float] = []
    leaf_macs: dict[str, float] = {}
    with _quiet():
        flops_model = pe.add_flops_counting_methods(model)
        flops_model.eval()
        flops_model.start_flops_count(ost=io.StringIO(), verbose=False, ignore_list=[])
        pe.patch_functional(func_macs)
        pe.patch_tensor_ops(tensor_macs)
        try:
            with torch.no_grad():
                model(x)
            batches = max(getattr(model, "__batch_counter__", 1), 1)
            for name in types:
                m = model.get_submodule(name)
                if pe.is_supported_instance(m):
                    leaf_macs[name] = float(m.__flops__) / batches
            module_total = flops_model.compute_average_flops_cost()[0]
        finally:
            flops_model.stop_flops_count()
            pe.unpatch_functional()
            pe.unpatch_tensor_ops()
            for attr in ("start_flops_count", "stop_flops_count", "reset_flops_count", "compute_average_flops_cost"):
                model.__dict__.pop(attr, None)
    extra = float(sum(func_macs) + sum(tensor_macs))
    total = float(module_total) + extra
    by_op: dict[str, float] = {}
    for name, v in leaf_macs.items():
        by_op[types[name]] = by_op.get(types[name], 0) + v
    if extra:
        by_op["functional (torch.add/mul, F.relu, F.*pool, not attributed to a module)"] = extra
    rows = _per_module_from_leaves(model, leaf_macs, extra)
    params = pe.get_model_parameters_number(model)
    return ToolResult("ptflops", pkg_version("ptflops"), int(params), total, 2 * total, "MACs", CONVENTIONS["ptflops"],
                      rows, by_op, by_category(by_op), {"backend": "pytorch", "functional_macs": extra},
                      ["ptflops counts trainable parameters only"] if params != count_parameters(model) else [])


def run_thop(model: nn.Module, input_size, device="cpu") -> ToolResult:
    import thop

    x = _input(model, input_size, device)
    types = _leaf_types(model)
    with _quiet():
        try:
            total, params, tree = thop.profile(model, inputs=(x,), verbose=False, ret_layer_info=True)
        finally:  # thop leaves its counters as buffers on container modules
            for m in model.modules():
                m._buffers.pop("total_ops", None)
                m._buffers.pop("total_params", None)
    leaf_macs: dict[str, float] = {}

    def walk(node: dict, prefix: str) -> None:
        for name, (ops, _params, children) in node.items():
            path = f"{prefix}{name}"
            if children:
                walk(children, path + ".")
            elif path in types:
                leaf_macs[path] = float(ops)

    walk(tree, "")
    by_op: dict[str, float] = {}
    for name, v in leaf_macs.items():
        by_op[types[name]] = by_op.get(types[name], 0) + v
    counted = sum(leaf_macs.values())
    warns = []
    from thop.profile import register_hooks

    known = {t.__name__ for t in register_hooks}
    zero_types = sorted({t for t in types.values() if t not in known and t != "Identity"})
    if zero_types:
        warns.append("module types thop has no rule for (counted as 0): " + ", ".join(zero_types))
    true_params = count_parameters(model)
    if int(params) != true_params:
        warns.append(f"thop's params ({int(params):,}) miss parameters of modules it has no rule for (true count {true_params:,})")
    rows = _per_module_from_leaves(model, leaf_macs, float(total) - counted)
    return ToolResult("thop", pkg_version("thop"), int(params), float(total), 2.0 * float(total), "MACs",
                      CONVENTIONS["thop"], rows, by_op, by_category(by_op), {}, warns)


def chain_receptive_field(layers: list[dict]) -> list[dict]:
    """torchscan's per-module (kernel, stride, padding) composed in call order, as if the network were one chain.

    r += (k - 1) * j, padding += p * j, j *= s (torchscan 0.1's cumulative column). Only right for single-path
    networks: utils.analysis.rf_trace follows the real graph.
    """
    r, j, pad = 1.0, 1.0, 0.0
    out = []
    for layer in layers:
        m = layer["metrics"]
        if not all(k in m and m[k]["value"] is not None for k in ("receptive_field", "effective_stride", "effective_padding")):
            continue
        k, s, p = m["receptive_field"]["value"], m["effective_stride"]["value"], m["effective_padding"]["value"]
        r += (k - 1) * j
        pad += p * j
        j *= s
        out.append({"module": layer["path"], "kernel": k, "stride": s, "padding": p, "rf": r, "eff_stride": j, "eff_padding": pad})
    return out


def is_single_chain(model: nn.Module, input_size, device="cpu") -> bool:
    """True when no two paths meet (no residual add, concatenation or squeeze-excitation multiply)."""
    report = receptive_fields(model, input_size, device=device)
    return not any(row.note.startswith(("merge of", "concatenation")) for row in report.layers)


def run_torchscan(model: nn.Module, input_size, device="cpu") -> ToolResult:
    import torchscan

    with _quiet():
        report = torchscan.crawl_module(model, tuple(int(v) for v in input_size), device=device)
    totals = report["totals"]

    def value(key):
        t = totals.get(key)
        return None if t is None else (t["value"] if t["status"] == "complete" else t["known_value"])

    leaves = {}
    by_op: dict[str, float] = {}
    dmas: dict[str, float] = {}
    for layer in report["layers"]:
        macs = layer["metrics"].get("macs")
        if macs is None or layer["path"] == "":
            continue
        v = macs["value"] if macs["value"] is not None else (macs["known_value"] or 0)
        leaves[layer["path"]] = leaves.get(layer["path"], 0) + float(v)
        by_op[layer["type"]] = by_op.get(layer["type"], 0) + float(v)
        d = layer["metrics"].get("dmas")
        if d and d["value"] is not None:
            dmas[layer["path"]] = dmas.get(layer["path"], 0) + float(d["value"])
    rows = _per_module_from_leaves(model, leaves)
    for row in rows:
        prefix = row["module"] + "."
        row["dmas"] = sum(v for k, v in dmas.items() if row["module"] == "(model)" or k == row["module"] or k.startswith(prefix))
    size_bytes = (value("parameter_bytes") or 0) + (value("buffer_bytes") or 0)
    chain = chain_receptive_field(report["layers"])
    extra = {"dmas": value("dmas"), "module_flops": value("module_flops"), "operator_flops": value("operator_flops"),
             "model_size_bytes": size_bytes, "model_size_mb": size_bytes / 1024 ** 2, "chain_receptive_field": chain,
             "diagnostics": [d["message"] for d in report["diagnostics"]]}
    warns = []
    extra["single_chain"] = is_single_chain(model, input_size, device)
    if not extra["single_chain"]:
        warns.append("this model is not a single chain of layers (residual additions, concatenations or "
                     "squeeze-excitation): torchscan's receptive-field column, composed as a chain, is NOT its "
                     "receptive field; use receptive_field.py for the exact graph-aware values")
    incomplete = [k for k in ("macs", "module_flops", "dmas") if totals[k]["status"] != "complete"]
    if incomplete:
        warns.append(f"torchscan marks {', '.join(incomplete)} as incomplete (modules it has no formula for count 0): "
                     + "; ".join(sorted({d['message'] for d in report['diagnostics'] if d.get('metric') != 'flops'}))[:300])
    return ToolResult("torchscan", pkg_version("torchscan"), int(value("parameters")), float(value("macs") or 0),
                      float(value("module_flops") or 0), "MACs, FLOPs (own definition) and DMAs",
                      CONVENTIONS["torchscan"], rows, by_op, by_category(by_op), extra, warns)


def flop_counter_mode() -> type:
    """torch.utils.flop_counter.FlopCounterMode, imported quietly: torch 2.11's CUDA builds log a warning on import
    when triton is missing (about triton kernels, never counted here), which would add a line to every script's output."""
    logger = logging.getLogger("torch.utils.flop_counter")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.flop_counter import FlopCounterMode
    finally:
        logger.setLevel(level)
    return FlopCounterMode


def run_flop_counter(model: nn.Module, input_size, device="cpu") -> ToolResult:
    x = _input(model, input_size, device)
    with _quiet(), torch.no_grad(), flop_counter_mode()(display=False) as counter:
        model(x)
    flops = float(counter.get_total_flops())
    by_op = {str(k): float(v) / 2 for k, v in counter.get_flop_counts().get("Global", {}).items()}
    params = count_parameters(model)
    return ToolResult("FlopCounterMode", torch.__version__, params, flops / 2, flops, "FLOPs",
                      CONVENTIONS["FlopCounterMode"], [], by_op, by_category(by_op))


def registry_macs(model_name: str, num_classes: int, model_kwargs: dict | str | None, img_size: int,
                  channels: int = 3) -> float | None:
    """Conv + matmul MACs of one image (FlopCounterMode FLOPs / 2) for a registry model, built without weights on
    the meta device (milliseconds, no memory). None when the model cannot be rebuilt from its name and kwargs."""
    kwargs = json.loads(model_kwargs) if isinstance(model_kwargs, str) else dict(model_kwargs or {})
    size, in_channels = kwargs.pop("img_size", img_size), kwargs.pop("in_channels", channels)
    try:
        model = _build(model_name, num_classes, size, in_channels, fast_init=True, meta=True, **kwargs).eval()
        device = next(model.parameters()).device
        return run_flop_counter(model, (in_channels, img_size, img_size), device).macs
    except Exception:  # noqa: BLE001 - a report without MACs beats no report
        return None


RUNNERS = {"fvcore": run_fvcore, "ptflops": run_ptflops, "thop": run_thop, "torchscan": run_torchscan,
           "FlopCounterMode": run_flop_counter}


def run_tool(tool: str, model: nn.Module, input_size, device="cpu", **kwargs) -> ToolResult:
    """Run one tool; a tool that fails on this model raises InputError naming the tool and the reason."""
    try:
        return RUNNERS[tool](model, input_size, device, **kwargs)
    except InputError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{tool} could not analyse this model: {type(e).__name__}: {first[:300]}") from None


# ---------------------------------------------------------------------------------------------------------------
# Text output


def format_result(res: ToolResult, am: AnalysisModel, max_depth: int = 2) -> str:
    c, h, w = am.input_size
    lines = [f"{res.tool} {res.version}: {am.name} ({am.num_classes} classes, {am.source}), input 1x{c}x{h}x{w}",
             "",
             f"  params : {res.params:,} ({_fmt(res.params)})",
             f"  MACs   : {res.macs:,.0f} ({_fmt(res.macs, 'MACs')})" if res.macs is not None else "  MACs   : -",
             (f"  FLOPs  : {res.flops:,.0f} ({_fmt(res.flops, 'FLOPs')})" +
              (" = 2 x MACs" if res.macs and abs(res.flops - 2 * res.macs) < 1 else " (torchscan's own count, not 2 x MACs)"))
             if res.flops is not None else "  FLOPs  : -",
             f"  native unit: {res.native_unit}",
             f"  counts : {res.convention}"]
    if res.extra.get("dmas") is not None:
        lines.append(f"  DMAs   : {res.extra['dmas']:,.0f} ({_fmt(res.extra['dmas'])}) memory accesses")
    if "model_size_mb" in res.extra:
        lines.append(f"  model size: {res.extra['model_size_mb']:.2f} MiB (params + buffers)")
    lines += [f"  warning: {w_}" for w_ in res.warnings]
    chain = res.extra.get("chain_receptive_field")
    if chain:
        trust = "single chain: the values are the receptive field" if res.extra.get("single_chain") else \
            "NOT a single chain: these chain values are wrong for this model (see receptive_field.py)"
        lines += ["", f"torchscan receptive field (its per-module kernel/stride/padding composed in call order; {trust}):",
                  f"  {'module':40s} {'k':>4} {'s':>3} {'p':>3} {'RF px':>7} {'stride px':>9} {'padding px':>10}"]
        for r in chain:
            if r["kernel"] > 1 or r["stride"] > 1:
                lines.append(f"  {r['module'][:40]:40s} {r['kernel']:>4.0f} {r['stride']:>3.0f} {r['padding']:>3.0f} "
                             f"{r['rf']:>7.0f} {r['eff_stride']:>9.0f} {r['eff_padding']:>10.0f}")
    if res.per_module:
        lines += ["", f"per module (depth <= {max_depth}; MACs include submodules):", format_module_table(res, max_depth)]
    if res.by_operator:
        total = res.macs or 1
        lines += ["", "by operator / module type:"]
        width = max(len(k) for k in res.by_operator)
        for k, v in sorted(res.by_operator.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {k.ljust(width)}  {_fmt(v, 'MACs'):>14}  {100 * v / total:6.2f} %")
    return "\n".join(lines)


def format_module_table(res: ToolResult, max_depth: int) -> str:
    rows = [r for r in res.per_module if r["depth"] <= max_depth]
    has_dmas = any("dmas" in r for r in rows)
    head = ["module", "type", "params", "MACs", "% MACs"] + (["DMAs"] if has_dmas else [])
    total = res.macs or 1
    body = [["  " * r["depth"] + r["module"], r["type"], f"{r['params']:,}", _fmt(r["macs"], "MACs"),
             f"{100 * r['macs'] / total:.2f}"] + ([_fmt(r.get("dmas"))] if has_dmas else []) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    out = ["  ".join(str(v).ljust(wd) if i < 2 else str(v).rjust(wd) for i, (v, wd) in enumerate(zip(row, widths)))
           for row in [head, *body]]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def pick_unit(value: float) -> tuple[float, str]:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return scale, prefix
    return 1.0, ""


CATEGORY_NAMES = {"norm": "norm layers", "activation": "activations", "pool": "pooling", "elementwise": "add/mul",
                  "other": "other ops"}


def explain(res: ToolResult, baseline: ToolResult) -> str:
    """Why a tool's MACs differ from the conv + matmul count of FlopCounterMode, from its own by-category numbers."""
    if res.tool == "FlopCounterMode":
        return "baseline: conv + matmul only"
    parts = []
    base_core = sum(v for k, v in baseline.by_category.items() if k in ("conv", "linear"))
    core = sum(v for k, v in res.by_category.items() if k in ("conv", "linear"))
    if abs(core - base_core) >= 0.5:
        parts.append(f"{core - base_core:+,.0f} MACs in conv/linear (bias adds)")
    for cat in ("norm", "activation", "pool", "elementwise", "other"):
        v = res.by_category.get(cat, 0)
        if v:
            parts.append(f"+{_fmt(v, 'MACs')} {CATEGORY_NAMES[cat]}")
    return "; ".join(parts) or "same operations as the baseline"


def compare_table(results: list[ToolResult], am: AnalysisModel) -> str:
    """One markdown table in one unit (the baseline's prefix), with each tool's difference explained."""
    base = next(r for r in results if r.tool == "FlopCounterMode")
    scale, prefix = pick_unit(base.macs or 1)
    c, h, w = am.input_size
    lines = [f"**{am.name}**, input 1x{c}x{h}x{w}, {am.num_classes} classes. MACs = multiply-accumulates; "
             f"FLOPs = 2 x MACs; all in {prefix}MACs / {prefix}FLOPs.",
             "",
             f"| tool | params | {prefix}MACs | {prefix}FLOPs (2 x MACs) | vs conv+matmul | tool's native output | what differs |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in results:
        native = {"fvcore": f"{r.macs / scale:.4f} {prefix} 'flops' (= MACs)",
                  "ptflops": f"{r.macs / scale:.4f} {prefix}Mac",
                  "thop": f"{r.macs / scale:.4f} {prefix} 'ops' (= MACs)",
                  "torchscan": f"{r.macs / scale:.4f} {prefix}MACs, {r.flops / scale:.4f} {prefix}FLOPs (own), "
                               f"{(r.extra.get('dmas') or 0) / scale:.4f} {prefix}DMAs",
                  "FlopCounterMode": f"{r.flops / scale:.4f} {prefix}FLOPs"}[r.tool]
        diff = 100.0 * ((r.macs or 0) - base.macs) / base.macs if base.macs else 0.0
        lines.append(f"| {r.tool} {r.version} | {r.params:,} | {r.macs / scale:.4f} | {2 * r.macs / scale:.4f} | "
                     f"{diff:+.2f} % | {native} | {explain(r, base)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The per-tool scripts (complexity_<tool>.py) share this body


def tool_parser(tool: str, description: str) -> argparse.ArgumentParser:
    p = cli.parser(description)
    add_model_args(p)
    p.add_argument("--max_depth", type=cli.non_negative(), default=2,
                   help="deepest module level shown in the per-module table (0 = whole model)")
    p.add_argument("--out_dir", default=str(COMPLEXITY_DIR), help=f"where <model>_<H>x<W>_{tool}.txt/.json are written")
    return p


def run_tool_cli(tool: str, args: argparse.Namespace, **tool_kwargs) -> int:
    """Load the model the flags describe, count with `tool`, print and write text + JSON."""
    if args.max_depth < 0:
        raise InputError(f"--max_depth must be >= 0, got {args.max_depth}")
    device = cli.resolve_device(args.device)
    am = load_analysis_model(args, device, fast_init=args.weights is None)
    check_forward(am, device)
    res = run_tool(tool, am.model, am.input_size, device, **tool_kwargs)
    text = format_result(res, am, args.max_depth)
    payload = {"model": am.name, "num_classes": am.num_classes, "input_size": list(am.input_size), "source": am.source,
               "units": {"params": "parameters", "macs": "multiply-accumulates",
                         "flops": "2 x MACs" if tool != "torchscan" else "torchscan's own FLOPs"},
               **res.to_dict()}
    payload["per_module"] = [r for r in res.per_module if r["depth"] <= args.max_depth]
    publish_report(args.out_dir, f"{result_stem(am)}_{tool}", text, payload, as_json=args.json)
    return 0
