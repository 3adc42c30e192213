"""Where the spatial axes of a traced tensor go through reshapes, permutes, slices, splits, concatenations and
broadcasting (`LayoutRules`, the tracer's second half of rules)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from utils.analysis.rf_fields import AxisField, AxisPos, Field
from utils.analysis.rf_rules import FieldRules, flat


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


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


class LayoutRules(FieldRules):
    """The layout rules; a merge of paths or a split spatial axis goes through `FieldRules`."""

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
        outs = [o for o in flat([out]) if isinstance(o, torch.Tensor)]
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
