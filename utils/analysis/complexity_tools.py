"""The counting tools: fvcore, ptflops, thop, torchscan and torch's FlopCounterMode, each run quietly on one model
and input and returned as a `ToolResult` (params, MACs, FLOPs, the tool's native unit and what it counts), so
scripts never mislabel one for the other. Also `registry_macs`, the conv + matmul MACs of a registry model."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from importlib.metadata import version as pkg_version

import torch
from torch import nn

from models import count_parameters
from utils.analysis.complexity_result import CONVENTIONS, ToolResult, by_category
from utils.analysis.model_loading import build_analysis_network
from utils.analysis.rf_trace import receptive_fields
from utils.errors import InputError


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


@contextlib.contextmanager
def _quiet():
    """Silence the tools' own prints (their findings are returned, not printed) and the two deprecation notices they
    trigger, which are theirs to fix, not ours or the user's: fvcore scripts helpers with torch.jit when it is
    imported, and thop compares versions with distutils' LooseVersion. Any other warning still shows."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.script` is deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"distutils Version classes are deprecated")
        yield


def _input(model: nn.Module, input_size, device) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    return torch.zeros(1, *input_size, device=device, dtype=dtype)


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
        model = build_analysis_network(model_name, num_classes, size, in_channels, fast_init=True, meta=True, **kwargs).eval()
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
