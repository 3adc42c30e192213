"""How operations change a receptive field: the tracer's state, the field algebra (merge, make global, lose the
layout) and the rules of convolutions, pooling, padding, reductions, softmax/norm and matmul (`FieldRules`)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from utils.analysis.rf_fields import AxisField, AxisPos, Field, LayerField, pair_text


def ints(v, n: int = 2, default=None) -> list[int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return list(default) if default is not None else [1] * n
    if isinstance(v, int):
        return [v] * n
    v = [int(x) for x in v]
    return v * n if len(v) == 1 else v


def func_name(where: str) -> str:
    """'layer (op)' -> 'op'."""
    return where.rsplit("(", 1)[-1].rstrip(")") if "(" in where else where


def flat(xs) -> list:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(flat(x))
        else:
            out.append(x)
    return out


def axis_sizes(t: torch.Tensor, axes) -> list[int]:
    return [ax.size for ax in axes]


def _union_extent(a, b):
    return tuple((min(p[0], q[0]), max(p[1], q[1])) for p, q in zip(a, b))


class FieldRules:
    """The tracer's state and how operations change a `Field`: the field algebra (merge, make global, lose the
    layout) and the rules of sliding windows, adaptive pooling, padding, reductions, softmax/norm and matmul.
    Each rule adds a row to the per-layer table where the field changes."""

    def __init__(self, input_hw: tuple[int, int]):
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
        size = tuple(axis_sizes(out, f.axes)) if f.axes is not None else None
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

    # --- rules ----------------------------------------------------------------------------------------------
    def window(self, f: Field, x, out, where, op, kernel, stride, padding, dilation) -> Field:
        if f.lost_at or (f.axes is None and f.global_from):  # e.g. the 1x1 convs of squeeze-excitation
            return f
        if f.axes is None:
            return self.lose(f, where)
        if x.dim() < 4 or (f.axes[0].dim, f.axes[1].dim) != (x.dim() - 2, x.dim() - 1) or f.axes[0].outer != 1:
            return self.lose(f, where + ": spatial axes are not the last two dimensions")
        kernel, stride, padding, dilation = (ints(v) for v in (kernel, stride, padding, dilation))
        local = f.local
        if local is None:  # a global map convolved further stays global
            new = replace(f, axes=(AxisPos(out.dim() - 2, 1, out.shape[-2]), AxisPos(out.dim() - 1, 1, out.shape[-1])))
        else:
            local = tuple(a.through(k, s, p, d) for a, k, s, p, d in zip(local, kernel, stride, padding, dilation))
            new = replace(f, local=local, axes=(AxisPos(out.dim() - 2, 1, out.shape[-2]), AxisPos(out.dim() - 1, 1, out.shape[-1])))
        self.row(op, out, new, f"k={pair_text(kernel)} s={pair_text(stride)} p={pair_text(padding)}" +
                 (f" d={pair_text(dilation)}" if dilation != [1, 1] else ""))
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
            g = self.make_global(f, tuple(axis_sizes(x, f.axes)), where)
            hw = "x".join(str(v) for v in axis_sizes(x, f.axes))
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
            return self.make_global(f, tuple(axis_sizes(x, f.axes)), where)
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
                g = self.make_global(f, tuple(axis_sizes(t, f.axes)), where)
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
