"""What a complexity count is: `ToolResult` (one tool's params, MACs and FLOPs in explicit units), the conventions
each tool counts by, and the operator categories that explain why the tools differ.

Units: a MAC is one multiply-accumulate (a*b + c); FLOPs here means 2 x MACs unless a tool is said to define
its own FLOPs (torchscan's module FLOPs also count additions, comparisons and divisions one by one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
