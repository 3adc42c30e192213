"""`receptive_fields(model, input_size)`: the receptive field, effective stride and padding of every feature map of
any network, from one forward pass recorded at the ATen level (a TorchDispatchMode) with module hooks naming the layers.

Each operation is handed to the rules of `rf_rules` and `rf_layout` (notation in `rf_fields`), so the trace follows
residual additions, concatenations, SE multiplications, views and permutes of any torchvision classifier.
Paths that meet are united; when their field centres or strides differ the merge is flagged as misaligned.
Global pooling, squeeze-excitation, group/layer norm over space and a Linear on a flattened map make every
later unit depend on all positions: the field is then reported as global with the image region it covers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from utils.analysis.rf_fields import AxisField, AxisPos, Field, LayerField, ReceptiveFieldReport
from utils.analysis.rf_layout import LayoutRules
from utils.analysis.rf_rules import FieldRules, axis_sizes, flat, ints

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


def _training_flag(name: str, args) -> bool:
    if name == "_native_batch_norm_legit":
        return bool(args[5]) if len(args) > 5 else False
    if name in ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"):
        return bool(args[5]) if len(args) > 5 else False
    return False


def _broadcastable(a, b) -> bool:
    """Whether shape a broadcasts to shape b (dimensions aligned from the right)."""
    return len(a) <= len(b) and all(x == y or x == 1 for x, y in zip(reversed(a), reversed(b)))


class _Tracer(LayoutRules, TorchDispatchMode):
    """Hands every ATen operation on a traced tensor to the rule of its operator family."""

    def __init__(self, input_hw: tuple[int, int]):
        TorchDispatchMode.__init__(self)
        FieldRules.__init__(self, input_hw)

    # --- dispatch -------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in _META_IGNORED:
            return out
        tensors_in = [a for a in flat(args) + flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        fields_in = [self.fields.get(t) for t in tensors_in if t in self.fields]
        if not fields_in:
            return out
        try:
            self.handle(name, func, args, kwargs, out, fields_in)
        except Exception as e:  # a rule that does not fit an unusual call: follow the layout no further
            where = f"{self.layer()} ({name})"
            self.warnings.append(f"{where}: {type(e).__name__}: {e}")
            for o in flat([out]):
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
                                            stride=ints(args[3]), padding=ints(args[4]), dilation=ints(args[5])))
            return
        if name in _POOL_OPS:
            kernel = ints(args[1])
            stride = ints(args[2] if len(args) > 2 else None, default=kernel)
            padding = ints(args[3] if len(args) > 3 else 0)
            dilation = ints(args[4] if len(args) > 4 and name != "avg_pool2d" else 1)
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
            for o in flat([out]):
                if isinstance(o, torch.Tensor):
                    self.set(o, self.reduce(fx, x, dims, keepdim, where))
            return
        if name in ("_softmax", "_log_softmax", "softmax", "log_softmax"):
            self.set(first_out, self.along(fx, x, [args[1]], where))
            return
        if name in ("native_group_norm",):
            sizes = axis_sizes(x, fx.axes) if fx.axes else None
            self.set(first_out, self.make_global(fx, sizes, where + ": normalises over all positions"))
            return
        if name == "native_layer_norm":
            nd = len(args[1])
            self.set(first_out, self.along(fx, x, list(range(x.dim() - nd, x.dim())), where))
            return
        if name in ("_native_batch_norm_legit", "native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm") and \
                _training_flag(name, args):
            self.set(first_out, self.make_global(fx, axis_sizes(x, fx.axes) if fx.axes else None,
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
        traced = [(t, self.fields[t]) for t in flat(args) + flat(list(kwargs.values()))
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
        report.final = LayerField("(output)", "output", tuple(axis_sizes(y, out.axes)),
                                  (out.local[0].size, out.local[1].size), (out.local[0].stride, out.local[1].stride),
                                  (out.local[0].padding, out.local[1].padding))
    else:
        report.final = next((r for r in reversed(tracer.rows) if r.rf is not None), None)
    if tracer.unknown_ops:
        report.warnings.append("operations that stop the layout from being followed: " + ", ".join(sorted(tracer.unknown_ops)))
    return report
