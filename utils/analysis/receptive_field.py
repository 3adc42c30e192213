"""Receptive fields: the seed's chain formulas, an exact calculator for any network graph, and the backprop check.

Notation (Araujo et al. 2019, "Computing Receptive Fields of Convolutional Neural Networks", Distill,
https://distill.pub/2019/computing-receptive-fields/), per spatial axis of a feature map:

- RF size r: how many input pixels one unit sees (before clipping by the image border);
- effective stride j: how far (in input pixels) the fields of two neighbouring units are apart;
- effective padding P: unit i sees input pixels [i*j - P, i*j - P + r - 1].

Through a layer with kernel k, stride s, padding p and dilation d (all per axis):
r_out = r_in + (d*(k-1)) * j_in,  j_out = j_in * s,  P_out = P_in + p * j_in.

`receptive_fields(model, input_size)` applies these rules to every operation of one forward pass,
recorded at the ATen level (a TorchDispatchMode) with module hooks naming the layers, so it follows
residual additions, concatenations, SE multiplications, views and permutes of any torchvision classifier.
Paths that meet are united; when their field centres or strides differ the merge is flagged as misaligned.
Global pooling, squeeze-excitation, group/layer norm over space and a Linear on a flattened map make every
later unit depend on all positions: the field is then reported as global with the image region it covers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------------------------
# The seed's formulas for a single chain of layers


def calculate_RF(layers: Sequence[tuple[int, int]]) -> int:  # noqa: N802 (the seed's name)
    """Receptive field of the last layer of a chain of (kernel, stride) layers, top-down: r = (r - 1) * s + k.

    >>> calculate_RF([(3, 1), (3, 1), (2, 2)])  # two 3x3 convs and a 2x2 pool
    6
    """
    rf = 1
    for kernel, stride in reversed(list(layers)):
        rf = (rf - 1) * stride + kernel
    return rf


def get_receptive_field(kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
                        dilation: int | Sequence[int] = 1) -> int:
    """Receptive field of a chain given per-layer kernels, strides and dilations (scalars = one layer).

    Bottom-up form of `calculate_RF` with dilation: r += d*(k-1) * j, then j *= s.

    >>> get_receptive_field([3, 3], [1, 1], [1, 2])  # a 3x3 conv, then a 3x3 conv with dilation 2
    7
    """
    kernels = [kernel] if isinstance(kernel, int) else list(kernel)
    n = len(kernels)
    strides = [stride] * n if isinstance(stride, int) else list(stride)
    dilations = [dilation] * n if isinstance(dilation, int) else list(dilation)
    if not (len(strides) == len(dilations) == n):
        raise ValueError(f"kernel, stride and dilation need one value per layer, got {n}, {len(strides)}, {len(dilations)}")
    rf, jump = 1, 1
    for k, s, d in zip(kernels, strides, dilations):
        rf += d * (k - 1) * jump
        jump *= s
    return rf


# ---------------------------------------------------------------------------------------------------------------
# Geometry of one feature map


@dataclass(frozen=True)
class AxisField:
    """Field of the units along one axis: unit i sees input pixels [start + i*stride, start + i*stride + size - 1]."""

    size: int = 1
    stride: int = 1
    start: int = 0

    @property
    def padding(self) -> int:
        """Effective padding: how far the first unit's field reaches before pixel 0."""
        return -self.start

    def span(self, i: int) -> tuple[int, int]:
        lo = self.start + i * self.stride
        return lo, lo + self.size - 1

    def center(self, i: float) -> float:
        return self.start + i * self.stride + (self.size - 1) / 2

    def through(self, kernel: int, stride: int, padding: int, dilation: int = 1) -> AxisField:
        return AxisField(self.size + dilation * (kernel - 1) * self.stride, self.stride * stride,
                         self.start - padding * self.stride)

    def union(self, other: AxisField) -> AxisField:
        lo = min(self.start, other.start)
        hi = max(self.start + self.size, other.start + other.size)
        return AxisField(hi - lo, max(self.stride, other.stride), lo)

    def extent(self, n: int) -> tuple[int, int]:
        """Input pixels seen by any of n units (unclipped)."""
        return self.start, self.start + max(n - 1, 0) * self.stride + self.size - 1


@dataclass(frozen=True)
class AxisPos:
    """Where a spatial axis lives in a tensor: dimension `dim`, inside it after `outer` elements of merged axes.

    A plain NCHW map has H at (dim=2, outer=1) and W at (dim=3, outer=1); after flatten(1) H is at
    (dim=1, outer=C) and W at (dim=1, outer=C*H).
    """

    dim: int
    outer: int
    size: int


@dataclass
class Field:
    """What is known about the input pixels behind each element of a tensor."""

    axes: tuple[AxisPos, AxisPos] | None = None        # where H and W are (None: no spatial layout)
    local: tuple[AxisField, AxisField] | None = None    # per-unit field through local operations
    global_from: str | None = None                     # first operation that mixed all positions
    global_extent: tuple[tuple[int, int], tuple[int, int]] | None = None  # clipped image region behind it
    lost_at: str | None = None                         # layout could not be followed from here on
    notes: tuple[str, ...] = ()

    @property
    def spatial(self) -> bool:
        return self.axes is not None and self.local is not None and self.lost_at is None


@dataclass
class LayerField:
    """One row of the per-layer table."""

    layer: str
    op: str
    output_size: tuple[int, int] | None
    rf: tuple[int, int] | None
    stride: tuple[int, int] | None
    padding: tuple[int, int] | None
    note: str = ""
    global_from: str | None = None   # set when the map also depends on all positions (through an earlier global op)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "output_size": self.output_size, "rf": self.rf,
                "stride": self.stride, "padding": self.padding, "note": self.note, "global_from": self.global_from}


@dataclass
class ReceptiveFieldReport:
    """Result of `receptive_fields`: the table and what the output depends on."""

    input_size: tuple[int, int]
    layers: list[LayerField] = field(default_factory=list)
    final: LayerField | None = None          # the last feature map with a local (sliding-window) field
    output: Field | None = None
    misaligned: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def output_is_global(self) -> bool:
        return self.output is not None and self.output.global_from is not None

    @property
    def covers_whole_image(self) -> bool:
        if not self.output_is_global or self.output.global_extent is None:
            return False
        (y0, y1), (x0, x1) = self.output.global_extent
        h, w = self.input_size
        return y0 <= 0 and x0 <= 0 and y1 >= h - 1 and x1 >= w - 1

    def summary(self) -> str:
        """One or two sentences on the output's field."""
        h, w = self.input_size
        lines = []
        if self.final is not None:
            f = self.final
            where = "the output map" if f.layer == "(output)" else f"{f.layer} ({f.op})"
            size = "?" if f.output_size is None else f"{f.output_size[0]}x{f.output_size[1]}"
            lines.append(f"last feature map with a sliding-window field: {where}, "
                         f"{size} units, RF {_pair(f.rf)} px, stride {_pair(f.stride)} px, "
                         f"padding {_pair(f.padding)} px" +
                         (f"; its units also see all positions through {f.global_from}" if f.global_from else ""))
        out = self.output
        if out is None:
            lines.append("the output could not be traced")
        elif out.lost_at is not None:
            lines.append(f"the spatial layout could not be followed after {out.lost_at}: the output's field is unknown")
        elif out.global_from is not None:
            if self.covers_whole_image:
                lines.append(f"every output depends on the WHOLE {h}x{w} image (global operation at {out.global_from})")
            else:
                (y0, y1), (x0, x1) = out.global_extent
                lines.append(f"every output depends on all positions (global operation at {out.global_from}), "
                             f"i.e. on image rows {y0}-{y1} and columns {x0}-{x1} of the {h}x{w} input")
        elif out.local is not None:
            lines.append("the output is a map: each unit sees only its own field (no global operation)")
        if self.misaligned:
            lines.append("misaligned merges: " + "; ".join(self.misaligned[:5]) + (" ..." if len(self.misaligned) > 5 else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = self.output
        return {
            "image_hw": list(self.input_size),
            "layers": [row.to_dict() for row in self.layers],
            "final_feature_map": self.final.to_dict() if self.final else None,
            "output": None if out is None else {
                "global": out.global_from is not None, "global_from": out.global_from,
                "global_extent": out.global_extent, "covers_whole_image": self.covers_whole_image,
                "lost_at": out.lost_at,
                "local_rf": None if out.local is None else [out.local[0].size, out.local[1].size],
            },
            "misaligned": self.misaligned,
            "warnings": self.warnings,
            "summary": self.summary(),
        }


def _pair(v, sep: str = "x") -> str:
    if v is None:
        return "-"
    return str(v[0]) if v[0] == v[1] else f"{v[0]}{sep}{v[1]}"


# ---------------------------------------------------------------------------------------------------------------
# The tracer


def _ints(v, n: int = 2, default=None) -> list[int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return list(default) if default is not None else [1] * n
    if isinstance(v, int):
        return [v] * n
    v = [int(x) for x in v]
    return v * n if len(v) == 1 else v


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


_POOL_OPS = {"max_pool2d_with_indices", "max_pool2d", "avg_pool2d"}
_ADAPTIVE_OPS = {"_adaptive_avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"}
_REDUCE_OPS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "prod",
               "logsumexp", "linalg_vector_norm", "norm", "argmax", "argmin", "nansum", "nanmean"}
_VIEW_OPS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "flatten", "unflatten", "alias", "clone",
             "contiguous", "detach", "_to_copy", "lift_fresh", "lift_fresh_copy"}
_META_IGNORED = {"empty", "zeros", "ones", "full", "arange", "scalar_tensor", "empty_like", "zeros_like", "ones_like",
                 "full_like", "empty_strided", "new_empty", "new_zeros", "new_ones", "new_full", "_local_scalar_dense",
                 "sym_size", "sym_numel", "sym_stride", "is_same_size", "size", "stride", "dim", "set_"}
_LOSING_OPS = {"flip", "roll", "sort", "cumsum", "cumprod", "index", "gather", "index_select", "as_strided",
               "take", "masked_select", "nonzero", "unfold", "im2col", "col2im", "pixel_shuffle", "pixel_unshuffle",
               "upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_nearest_exact2d",
               "_upsample_bilinear2d_aa", "grid_sampler_2d"}


class _Tracer(TorchDispatchMode):
    def __init__(self, input_hw: tuple[int, int]):
        super().__init__()
        self.fields = WeakTensorKeyDictionary()
        self.stack: list[str] = []
        self.rows: list[LayerField] = []
        self.misaligned: list[str] = []
        self.warnings: list[str] = []
        self.unknown_ops: set[str] = set()
        self.hw = input_hw
        self.last: Field | None = None

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def layer(self) -> str:
        return self.stack[-1] if self.stack else "(model)"

    def get(self, t) -> Field | None:
        return self.fields.get(t) if isinstance(t, torch.Tensor) else None

    def row(self, op: str, out: torch.Tensor, f: Field, note: str = "") -> None:
        size = tuple(_axis_sizes(out, f.axes)) if f.axes is not None else None
        if f.spatial:
            rf = (f.local[0].size, f.local[1].size)
            st = (f.local[0].stride, f.local[1].stride)
            pad = (f.local[0].padding, f.local[1].padding)
        else:
            rf = st = pad = None
        self.rows.append(LayerField(self.layer(), op, size, rf, st, pad, note, f.global_from))

    def set(self, out, f: Field | None) -> None:
        if isinstance(out, torch.Tensor) and f is not None:
            self.fields[out] = f
            self.last = f

    # --- field algebra --------------------------------------------------------------------------------------
    def make_global(self, f: Field, sizes: tuple[int, int] | None, where: str) -> Field:
        extent = self.coverage(f, sizes)
        if f.global_extent is not None:
            extent = _union_extent(extent, f.global_extent) if extent is not None else f.global_extent
        return Field(axes=None, local=None, global_from=f.global_from or where, global_extent=extent,
                     lost_at=f.lost_at, notes=f.notes)

    def coverage(self, f: Field, sizes) -> tuple[tuple[int, int], tuple[int, int]] | None:
        if f.local is None or sizes is None:
            return None
        out = []
        for ax, n, limit in zip(f.local, sizes, self.hw):
            lo, hi = ax.extent(n)
            out.append((max(lo, 0), min(hi, limit - 1)))
        return out[0], out[1]

    def merge(self, fields: list[Field], where: str) -> Field:
        """United field of several inputs that meet element-wise (add, mul, cat along channels)."""
        fields = [f for f in fields if f is not None]
        if len(fields) == 1:
            return fields[0]
        lost = next((f.lost_at for f in fields if f.lost_at), None)
        glob = next((f.global_from for f in fields if f.global_from), None)
        extents = [f.global_extent for f in fields if f.global_extent is not None]
        extent = None
        for e in extents:
            extent = e if extent is None else _union_extent(extent, e)
        locals_ = [f for f in fields if f.local is not None and f.axes is not None]
        axes = locals_[0].axes if locals_ else None
        local = None
        notes = tuple(n for f in fields for n in f.notes)
        if locals_:
            local = locals_[0].local
            for other in locals_[1:]:
                merged = []
                for a, b, name in zip(local, other.local, "HW"):
                    if a.stride != b.stride:
                        msg = f"{where}: paths with effective strides {a.stride} and {b.stride} meet on axis {name}"
                        self._misaligned(msg)
                        merged.append(a if a.size >= b.size else b)
                        continue
                    if a.center(0) != b.center(0):
                        self._misaligned(f"{where}: field centres differ by {abs(a.center(0) - b.center(0)):g} px on axis {name}")
                    merged.append(a.union(b))
                local = (merged[0], merged[1])
        return Field(axes=axes, local=local, global_from=glob, global_extent=extent, lost_at=lost, notes=notes)

    def _misaligned(self, msg: str) -> None:
        if msg not in self.misaligned:
            self.misaligned.append(msg)

    def lose(self, f: Field, where: str) -> Field:
        return Field(axes=None, local=None, global_from=f.global_from, global_extent=f.global_extent,
                     lost_at=f.lost_at or where, notes=f.notes)

    # --- dispatch -------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in _META_IGNORED:
            return out
        tensors_in = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        fields_in = [self.fields.get(t) for t in tensors_in if t in self.fields]
        if not fields_in:
            return out
        try:
            self.handle(name, func, args, kwargs, out, fields_in)
        except Exception as e:  # a rule that does not fit an unusual call: follow the layout no further
            where = f"{self.layer()} ({name})"
            self.warnings.append(f"{where}: {type(e).__name__}: {e}")
            for o in _flat([out]):
                if isinstance(o, torch.Tensor):
                    self.set(o, self.lose(fields_in[0], where))
        return out

    def handle(self, name, func, args, kwargs, out, fields_in):  # noqa: C901 (one rule per operator family)
        where = f"{self.layer()} ({name})"
        x = args[0] if args else None
        fx = self.get(x)
        first_out = out[0] if isinstance(out, (tuple, list)) else out

        if name == "convolution":
            transposed = bool(args[6])
            if transposed:
                self.set(first_out, self.lose(fx, where + ": transposed convolution"))
                return
            self.set(first_out, self.window(fx, x, first_out, where, "conv", kernel=list(args[1].shape[2:]),
                                            stride=_ints(args[3]), padding=_ints(args[4]), dilation=_ints(args[5])))
            return
        if name in _POOL_OPS:
            kernel = _ints(args[1])
            stride = _ints(args[2] if len(args) > 2 else None, default=kernel)
            padding = _ints(args[3] if len(args) > 3 else 0)
            dilation = _ints(args[4] if len(args) > 4 and name != "avg_pool2d" else 1)
            op = "maxpool" if "max" in name else "avgpool"
            self.set(first_out, self.window(fx, x, first_out, where, op, kernel, stride, padding, dilation))
            return
        if name in _ADAPTIVE_OPS:
            self.set(first_out, self.adaptive(fx, x, first_out, where))
            return
        if name == "constant_pad_nd" or name.startswith(("reflection_pad", "replication_pad")):
            self.set(first_out, self.pad(fx, x, first_out, args[1], where))
            return
        if name in _REDUCE_OPS:
            dims = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim")
            keepdim = bool(args[2]) if len(args) > 2 and isinstance(args[2], bool) else bool(kwargs.get("keepdim", False))
            for o in _flat([out]):
                if isinstance(o, torch.Tensor):
                    self.set(o, self.reduce(fx, x, dims, keepdim, where))
            return
        if name in ("_softmax", "_log_softmax", "softmax", "log_softmax"):
            self.set(first_out, self.along(fx, x, [args[1]], where))
            return
        if name in ("native_group_norm",):
            sizes = _axis_sizes(x, fx.axes) if fx.axes else None
            self.set(first_out, self.make_global(fx, sizes, where + ": normalises over all positions"))
            return
        if name == "native_layer_norm":
            nd = len(args[1])
            self.set(first_out, self.along(fx, x, list(range(x.dim() - nd, x.dim())), where))
            return
        if name in ("_native_batch_norm_legit", "native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm") and \
                _training_flag(name, args):
            self.set(first_out, self.make_global(fx, _axis_sizes(x, fx.axes) if fx.axes else None,
                                                 where + ": batch statistics (train mode)"))
            return
        if name in ("mm", "addmm", "bmm", "baddbmm", "matmul"):
            self.set(first_out, self.matmul(name, args, first_out, where))
            return
        if name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention", "_scaled_dot_product_attention_math"):
            f = self.merge([self.get(a) for a in args[:3] if self.get(a) is not None], where)
            self.set(first_out, self.along(f, args[0], [args[0].dim() - 2], where))
            return
        if name in _VIEW_OPS:
            self.set(first_out, self.view(fx, x, first_out, where))
            return
        if name in ("permute", "transpose", "t", "squeeze", "unsqueeze", "expand", "select", "slice", "split",
                    "split_with_sizes", "unbind", "chunk", "narrow", "repeat"):
            self.structural(name, fx, x, args, out, where)
            return
        if name in ("cat", "stack"):
            self.concat(name, args, kwargs, first_out, where)
            return
        if name in ("copy_",):
            src = self.get(args[1])
            if src is not None:
                self.set(first_out, src)
            return
        if name in _LOSING_OPS:
            self.set(first_out, self.lose(fx, where))
            self.unknown_ops.add(name)
            return
        # everything else: element-wise when every traced input broadcasts to the (first) output
        if not isinstance(first_out, torch.Tensor):
            return
        traced = [(t, self.fields[t]) for t in _flat(args) + _flat(list(kwargs.values()))
                  if isinstance(t, torch.Tensor) and t in self.fields]
        if not all(_broadcastable(t.shape, first_out.shape) for t, _ in traced):
            self.unknown_ops.add(name)
            self.set(first_out, self.lose(traced[0][1], where + ": unhandled shape-changing operation"))
            return
        merged = self.merge([self.broadcast(f, t, first_out, where) for t, f in traced], where)
        self.set(first_out, merged)
        n_local = sum(1 for _, f in traced if f.local is not None)
        joins_global = any(f.global_from and f.local is None for _, f in traced)
        if n_local >= 2 or (n_local >= 1 and joins_global):
            self.row(name, first_out, merged, f"merge of {len(traced)} paths" +
                     (" (one is global: every position's summary, e.g. squeeze-excitation)" if joins_global else ""))

    # --- rules ----------------------------------------------------------------------------------------------
    def window(self, f: Field, x, out, where, op, kernel, stride, padding, dilation) -> Field:
        if f.lost_at or (f.axes is None and f.global_from):  # e.g. the 1x1 convs of squeeze-excitation
            return f
        if f.axes is None:
            return self.lose(f, where)
        if x.dim() < 4 or (f.axes[0].dim, f.axes[1].dim) != (x.dim() - 2, x.dim() - 1) or f.axes[0].outer != 1:
            return self.lose(f, where + ": spatial axes are not the last two dimensions")
        kernel, stride, padding, dilation = (_ints(v) for v in (kernel, stride, padding, dilation))
        local = f.local
        if local is None:  # a global map convolved further stays global
            new = replace(f, axes=(AxisPos(out.dim() - 2, 1, out.shape[-2]), AxisPos(out.dim() - 1, 1, out.shape[-1])))
        else:
            local = tuple(a.through(k, s, p, d) for a, k, s, p, d in zip(local, kernel, stride, padding, dilation))
            new = replace(f, local=local, axes=(AxisPos(out.dim() - 2, 1, out.shape[-2]), AxisPos(out.dim() - 1, 1, out.shape[-1])))
        self.row(op, out, new, f"k={_pair(kernel)} s={_pair(stride)} p={_pair(padding)}" +
                 (f" d={_pair(dilation)}" if dilation != [1, 1] else ""))
        return new

    def adaptive(self, f: Field, x, out, where) -> Field:
        if f.lost_at or f.axes is None:
            return f
        n_in, n_out = list(x.shape[-2:]), list(out.shape[-2:])
        if n_out == [1, 1] and n_in != [1, 1]:
            g = self.make_global(f, tuple(n_in), where)
            self.row("global pool", out, g, f"global pooling: every output sees all {n_in[0]}x{n_in[1]} positions")
            return g
        if f.local is None:
            return replace(f, axes=(AxisPos(out.dim() - 2, 1, n_out[0]), AxisPos(out.dim() - 1, 1, n_out[1])))
        local, notes = [], []
        for a, i, o in zip(f.local, n_in, n_out):
            if i == o:
                local.append(a)
            elif i == 1:
                local.append(AxisField(a.size, 0, a.start))
                notes.append("1 unit repeated")
            elif i % o == 0:
                local.append(a.through(i // o, i // o, 0))
            else:
                widest = max(math.ceil((k + 1) * i / o) - math.floor(k * i / o) for k in range(o))
                local.append(a.through(widest, max(1, i // o), 0))
                notes.append(f"adaptive windows of unequal width ({i}->{o}): RF is the widest window's")
        new = replace(f, local=(local[0], local[1]), axes=(AxisPos(out.dim() - 2, 1, n_out[0]), AxisPos(out.dim() - 1, 1, n_out[1])))
        self.row("adaptive pool", out, new, "; ".join(notes) or f"{n_in[0]}x{n_in[1]} -> {n_out[0]}x{n_out[1]}")
        return new

    def pad(self, f: Field, x, out, pads, where) -> Field:
        if f.lost_at or f.axes is None or f.local is None:
            return f
        pads = [int(p) for p in pads]
        # pads are (last-dim left, last-dim right, second-to-last top, bottom, ...)
        before = {x.dim() - 1 - i // 2: pads[i] for i in range(0, len(pads), 2)}
        local = list(f.local)
        for k, ax in enumerate(f.axes):
            if ax.outer != 1 and before.get(ax.dim, 0):
                return self.lose(f, where + ": padding of a merged axis")
            local[k] = replace(local[k], start=local[k].start - before.get(ax.dim, 0) * local[k].stride)
        axes = tuple(replace(ax, size=out.shape[ax.dim]) for ax in f.axes)
        new = replace(f, local=(local[0], local[1]), axes=axes)
        self.row("pad", out, new, f"pad {pads}")
        return new

    def reduce(self, f: Field, x, dims, keepdim: bool, where: str) -> Field:
        if f.lost_at:
            return f
        ndim = x.dim()
        dims = list(range(ndim)) if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0) else \
            [d % ndim for d in ([dims] if isinstance(dims, int) else dims)]
        if f.axes is None:
            return f
        if any(ax.dim in dims for ax in f.axes):
            g = self.make_global(f, tuple(_axis_sizes(x, f.axes)), where)
            hw = "x".join(str(v) for v in _axis_sizes(x, f.axes))
            self.rows.append(LayerField(self.layer(), f"{func_name(where)} (global)", None, None, None, None,
                                        f"reduces over all {hw} positions", g.global_from))
            return g
        if keepdim:
            return f
        axes = tuple(replace(ax, dim=ax.dim - sum(1 for d in dims if d < ax.dim)) for ax in f.axes)
        return replace(f, axes=axes)

    def along(self, f: Field, x, dims, where: str) -> Field:
        """Operation mixing values along `dims` (softmax, layer norm, attention): global if a spatial axis is among them."""
        if f.lost_at or f.axes is None:
            return f
        dims = [d % x.dim() for d in dims]
        if any(ax.dim in dims for ax in f.axes):
            return self.make_global(f, tuple(_axis_sizes(x, f.axes)), where)
        return f

    def matmul(self, name, args, out, where) -> Field:
        if name in ("addmm", "baddbmm"):
            a, b = args[1], args[2]
            bias = self.get(args[0])
        else:
            a, b = args[0], args[1]
            bias = None
        fa, fb = self.get(a), self.get(b)
        results = []
        for f, t, contracted, keep_map in ((fa, a, a.dim() - 1, "a"), (fb, b, b.dim() - 2, "b")):
            if f is None:
                continue
            if f.lost_at or f.axes is None:
                results.append(f)
                continue
            if any(ax.dim == contracted for ax in f.axes):
                g = self.make_global(f, tuple(_axis_sizes(t, f.axes)), where)
                self.rows.append(LayerField(self.layer(), name, None, None, None, None,
                                            "Linear/matmul over flattened positions", g.global_from))
                results.append(g)
                continue
            if keep_map == "a":  # rows of a stay rows of the output
                shift = out.dim() - t.dim()
                results.append(replace(f, axes=tuple(replace(ax, dim=ax.dim + shift) for ax in f.axes)))
            else:  # columns of b become the last output dim
                axes = tuple(replace(ax, dim=out.dim() - 1) if ax.dim == t.dim() - 1 else ax for ax in f.axes)
                results.append(replace(f, axes=axes))
        if bias is not None:
            results.append(bias)
        return self.merge(results, where)

    def view(self, f: Field, x, out, where) -> Field:
        if f.lost_at or f.axes is None:
            return f
        if tuple(x.shape) == tuple(out.shape):
            return f
        axes = []
        for ax in f.axes:
            new = _relocate(x.shape, out.shape, ax)
            if new is None:
                return self.lose(f, where + ": reshape splits a spatial axis")
            axes.append(new)
        return replace(f, axes=(axes[0], axes[1]))

    def structural(self, name, f: Field, x, args, out, where) -> None:
        outs = [o for o in _flat([out]) if isinstance(o, torch.Tensor)]
        if f.lost_at or f.axes is None:
            for o in outs:
                self.set(o, f)
            return
        nd = x.dim()
        if name == "permute":
            perm = [d % nd for d in args[1]]
            self.set(outs[0], replace(f, axes=tuple(replace(ax, dim=perm.index(ax.dim)) for ax in f.axes)))
        elif name in ("transpose", "t"):
            d0, d1 = (0, 1) if name == "t" else (args[1] % nd, args[2] % nd)
            swap = {d0: d1, d1: d0}
            self.set(outs[0], replace(f, axes=tuple(replace(ax, dim=swap.get(ax.dim, ax.dim)) for ax in f.axes)))
        elif name in ("squeeze", "unsqueeze", "expand", "repeat"):
            if name == "expand" or name == "repeat":
                sizes = list(x.shape)
                axes = []
                for ax in f.axes:
                    od = ax.dim + (outs[0].dim() - nd)
                    if outs[0].shape[od] != sizes[ax.dim] and not (name == "expand" and sizes[ax.dim] == 1):
                        self.set(outs[0], self.lose(f, where))
                        return
                    axes.append(replace(ax, dim=od))
                self.set(outs[0], replace(f, axes=tuple(axes)))
            else:
                self.set(outs[0], self.view(f, x, outs[0], where))
        elif name in ("select",):
            d = args[1] % nd
            if any(ax.dim == d for ax in f.axes):
                self.set(outs[0], self.lose(f, where + ": selects one row/column"))
            else:
                self.set(outs[0], replace(f, axes=tuple(replace(ax, dim=ax.dim - (1 if ax.dim > d else 0)) for ax in f.axes)))
        elif name in ("slice", "narrow"):
            d = args[1] % nd if len(args) > 1 else 0
            hit = [k for k, ax in enumerate(f.axes) if ax.dim == d]
            if not hit:
                self.set(outs[0], f)
                return
            k = hit[0]
            if f.axes[k].outer != 1 or f.local is None:
                self.set(outs[0], self.lose(f, where + ": slices a merged axis"))
                return
            size = x.shape[d]
            if name == "slice":
                start = args[2] if len(args) > 2 and args[2] is not None else 0
                step = args[4] if len(args) > 4 else 1
            else:
                start, step = args[2], 1
            start = int(start) + (size if int(start) < 0 else 0)
            start = min(max(start, 0), size)
            local = list(f.local)
            a = local[k]
            local[k] = AxisField(a.size, a.stride * int(step), a.start + start * a.stride)
            axes = list(f.axes)
            axes[k] = replace(axes[k], size=outs[0].shape[d])
            new = replace(f, local=(local[0], local[1]), axes=(axes[0], axes[1]))
            if (start, step) != (0, 1) or outs[0].shape[d] != size:
                self.row("slice", outs[0], new, f"rows/cols from {start} step {step}")
            self.set(outs[0], new)
        elif name in ("split", "split_with_sizes", "unbind", "chunk"):
            d = (args[2] if len(args) > 2 else 0) % nd if name != "unbind" else (args[1] if len(args) > 1 else 0) % nd
            if any(ax.dim == d for ax in f.axes):
                for o in outs:
                    self.set(o, self.lose(f, where + ": splits along a spatial axis"))
            else:
                for o in outs:
                    self.set(o, f if name != "unbind" else
                             replace(f, axes=tuple(replace(ax, dim=ax.dim - (1 if ax.dim > d else 0)) for ax in f.axes)))

    def concat(self, name, args, kwargs, out, where) -> None:
        tensors = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        fields = [(t, self.get(t)) for t in tensors]
        traced = [f for _, f in fields if f is not None]
        if not traced:
            return
        nd = tensors[0].dim()
        dim = dim % (nd + (1 if name == "stack" else 0))
        ref = next(f for f in traced if f.axes is not None) if any(f.axes for f in traced) else traced[0]
        if ref.axes is not None and name == "cat" and any(ax.dim == dim for ax in ref.axes):
            self.set(out, self.lose(self.merge(traced, where), where + ": concatenation along a spatial axis"))
            return
        if any(f is None for _, f in fields):
            # an untraced piece (e.g. a class token) joins: positions along `dim` shift, but the field is unchanged
            pass
        merged = self.merge(traced, where)
        if name == "stack" and merged.axes is not None:
            merged = replace(merged, axes=tuple(replace(ax, dim=ax.dim + (1 if ax.dim >= dim else 0)) for ax in merged.axes))
        if sum(1 for f in traced if f.local is not None) >= 2:
            self.row(name, out, merged, f"concatenation of {len(traced)} paths")
        self.set(out, merged)

    def broadcast(self, f: Field, t, o, where) -> Field:
        """An input broadcast to the output's shape: 1x1 maps repeated over all positions keep their field."""
        if f.axes is None or f.lost_at:
            return f
        shift = o.dim() - t.dim()
        axes = []
        for ax in f.axes:
            if t.shape[ax.dim] == 1 and o.shape[ax.dim + shift] != 1:
                if f.local is not None:
                    return self.lose(f, where + ": a single unit broadcast over a map")
            axes.append(replace(ax, dim=ax.dim + shift, size=o.shape[ax.dim + shift] if ax.outer == 1 else ax.size))
        return replace(f, axes=(axes[0], axes[1]))


def func_name(where: str) -> str:
    """'layer (op)' -> 'op'."""
    return where.rsplit("(", 1)[-1].rstrip(")") if "(" in where else where


def _training_flag(name: str, args) -> bool:
    if name == "_native_batch_norm_legit":
        return bool(args[5]) if len(args) > 5 else False
    if name in ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"):
        return bool(args[5]) if len(args) > 5 else False
    return False


def _flat(xs) -> list:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flat(x))
        else:
            out.append(x)
    return out


def _broadcastable(a, b) -> bool:
    """Whether shape a broadcasts to shape b (dimensions aligned from the right)."""
    return len(a) <= len(b) and all(x == y or x == 1 for x, y in zip(reversed(a), reversed(b)))


def _axis_sizes(t: torch.Tensor, axes) -> list[int]:
    return [ax.size for ax in axes]


def _union_extent(a, b):
    return tuple((min(p[0], q[0]), max(p[1], q[1])) for p, q in zip(a, b))


def _relocate(in_shape, out_shape, ax: AxisPos) -> AxisPos | None:
    """Where a spatial axis lands after a reshape (contiguous semantics), or None if the reshape splits it."""
    prefix = _prod(in_shape[:ax.dim]) * ax.outer     # elements of all outer axes
    block = prefix * ax.size
    acc = 1
    for k, n in enumerate(out_shape):
        if acc <= prefix and acc * n >= block and prefix % acc == 0 and (acc * n) % block == 0:
            return AxisPos(k, prefix // acc, ax.size)
        acc *= n
    return None


def receptive_fields(model: nn.Module, input_size: Sequence[int] = (3, 224, 224),
                     device: str | torch.device | None = None) -> ReceptiveFieldReport:
    """Receptive field, effective stride and padding of every feature map of `model` for one (C, H, W) input.

    Runs one forward pass in eval mode (on the meta device when `device` is "meta": no memory, no compute).
    """
    c, h, w = (int(v) for v in input_size)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    tracer = _Tracer((h, w))
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def pre(m, _inp):
        tracer.stack.append(names.get(m, type(m).__name__) or "(model)")

    def post(m, _inp, _out):
        if tracer.stack:
            tracer.stack.pop()

    for m in model.modules():
        if m is model:
            continue
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    x = torch.zeros(1, c, h, w, device=device)
    tracer.fields[x] = Field(axes=(AxisPos(2, 1, h), AxisPos(3, 1, w)), local=(AxisField(), AxisField()))
    try:
        with torch.no_grad(), tracer:
            y = model(x)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    y = y[0] if isinstance(y, (tuple, list)) else (y.logits if hasattr(y, "logits") else y)
    report = ReceptiveFieldReport((h, w), tracer.rows, misaligned=tracer.misaligned, warnings=list(tracer.warnings))
    report.output = tracer.fields.get(y) if isinstance(y, torch.Tensor) else None
    if report.output is not None and report.output.spatial and report.output.global_from is None:
        out = report.output
        report.final = LayerField("(output)", "output", tuple(_axis_sizes(y, out.axes)),
                                  (out.local[0].size, out.local[1].size), (out.local[0].stride, out.local[1].stride),
                                  (out.local[0].padding, out.local[1].padding))
    else:
        report.final = next((r for r in reversed(tracer.rows) if r.rf is not None), None)
    if tracer.unknown_ops:
        report.warnings.append("operations that stop the layout from being followed: " + ", ".join(sorted(tracer.unknown_ops)))
    return report


def format_table(report: ReceptiveFieldReport) -> str:
    """The per-layer table (layer, op, output size, RF, stride, padding, note) as aligned text."""
    head = ("layer", "op", "output", "RF px", "stride px", "padding px", "all positions", "note")
    rows = [(r.layer, r.op, "-" if r.output_size is None else f"{r.output_size[0]}x{r.output_size[1]}",
             _pair(r.rf), _pair(r.stride), _pair(r.padding),
             "yes" if r.global_from else "", r.note) for r in report.layers]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    widths[-1] = 0
    lines = ["  ".join(str(v).ljust(wd) for v, wd in zip(head, widths)).rstrip()]
    lines.append("-" * (sum(widths[:-1]) + 2 * (len(widths) - 1) + 10))
    lines += ["  ".join(str(v).ljust(wd) for v, wd in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Backprop: the field as the support of an output unit's input gradient

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                nn.ELU, nn.Mish, nn.PReLU)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.Dropout)


def theoretical_model(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A copy whose input gradient is positive exactly on the theoretical receptive field.

    Convolutions and Linear layers get constant positive weights (1/fan-in, bias 0), activations, batch norm
    and dropout become identities and max pools become average pools with the same window, so no path is
    switched off and no two paths cancel. float64 keeps the tiny contributions of the field's corners.
    """
    twin = copy.deepcopy(model).to(dtype).eval()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, _ACTIVATIONS + _NORMS):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d) and child.dilation in (1, (1, 1)):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
            else:
                swap(child)

    swap(twin)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.fill_(1.0 / fan_in)
                if m.bias is not None:
                    m.bias.zero_()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def input_gradient(model: nn.Module, image: torch.Tensor, pixel: tuple[int, int] | None = None,
                   channel: int | None = None, weights: torch.Tensor | None = None) -> np.ndarray:
    """Gradient of output unit(s) w.r.t. a (1, C, H, W) image, as a (C, H, W) float64 array.

    pixel=(y, x) with channel=None backpropagates the sum over channels of that output position, with a
    channel its score only; `weights` (h, w) backpropagates the weighted sum of the channel's whole map.
    """
    p = next(iter(model.parameters()))
    x = image.detach().to(device=p.device, dtype=p.dtype).clone().requires_grad_(True)
    out = model(x)
    if out.dim() == 2:
        out = out[:, :, None, None]
    maps = out[0] if channel is None else out[0, channel:channel + 1]
    if weights is not None:
        target = (maps * weights.to(maps)).sum()
    else:
        y, xx = pixel if pixel is not None else (out.shape[-2] // 2, out.shape[-1] // 2)
        target = maps[:, y, xx].sum()
    (grad,) = torch.autograd.grad(target, x)
    return grad[0].detach().double().cpu().numpy()


def support_box(grad: np.ndarray, threshold: float = 0.0) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right), inclusive, of pixels whose |gradient| (summed over channels), normalised
    to a maximum of 1, exceeds `threshold` (0 = any non-zero gradient). None when nothing does."""
    mag = np.abs(grad).sum(axis=0) if grad.ndim == 3 else np.abs(grad)
    peak = mag.max()
    if peak <= 0:
        return None
    ys, xs = np.nonzero(mag / peak > threshold)
    if ys.size == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def analytic_box(local: tuple[AxisField, AxisField], pixel: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the analytic field of unit `pixel`, clipped to the image."""
    (y0, y1), (x0, x1) = local[0].span(pixel[0]), local[1].span(pixel[1])
    h, w = image_hw
    return max(y0, 0), max(x0, 0), min(y1, h - 1), min(x1, w - 1)


def is_interior(local: tuple[AxisField, AxisField], pixel: tuple[int, int], image_hw: tuple[int, int]) -> tuple[bool, bool]:
    """Whether the field of `pixel` lies inside the image along (y, x)."""
    out = []
    for ax, i, n in zip(local, pixel, image_hw):
        lo, hi = ax.span(i)
        out.append(lo >= 0 and hi <= n - 1)
    return out[0], out[1]
