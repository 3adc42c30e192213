"""Complexity results as text: one tool's report (`format_result`, per-module table), the comparison of all
tools in one unit (`compare_table`, `explain`), and the body the complexity_<tool>.py scripts share (`tool_parser`,
`run_tool_cli`). The counts come from `complexity_tools`, the model from `model_loading`."""

from __future__ import annotations

import argparse
from pathlib import Path

from utils import cli
from utils.analysis.complexity_result import ToolResult
from utils.analysis.complexity_tools import run_tool
from utils.analysis.model_loading import AnalysisModel, AnalysisSpec, add_model_args, check_forward, load_analysis_model, result_stem
from utils.errors import InputError
from utils.io import publish_report

COMPLEXITY_DIR = Path("results/complexity")


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.3f} {prefix}{unit}"
    return f"{v:.0f} {unit}".rstrip()


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


def run_tool_cli(tool: str, spec: AnalysisSpec, *, device: str, max_depth: int, out_dir: str, as_json: bool,
                 tool_kwargs: dict | None = None) -> int:
    """Load the model `spec` describes on `device` (a --device value), count with `tool`, print and write text + JSON
    (the per-module rows down to `max_depth`)."""
    if max_depth < 0:
        raise InputError(f"--max_depth must be >= 0, got {max_depth}")
    device = cli.resolve_device(device)
    am = load_analysis_model(spec, device, fast_init=spec.weights is None)
    check_forward(am, device)
    res = run_tool(tool, am.model, am.input_size, device, **(tool_kwargs or {}))
    text = format_result(res, am, max_depth)
    payload = {"model": am.name, "num_classes": am.num_classes, "input_size": list(am.input_size), "source": am.source,
               "units": {"params": "parameters", "macs": "multiply-accumulates",
                         "flops": "2 x MACs" if tool != "torchscan" else "torchscan's own FLOPs"},
               **res.to_dict()}
    payload["per_module"] = [r for r in res.per_module if r["depth"] <= max_depth]
    publish_report(out_dir, f"{result_stem(am)}_{tool}", text, payload, as_json=as_json)
    return 0
