"""What a receptive field is: the geometry of one feature map (`AxisField`, `AxisPos`, `Field`) and the report
of a traced model (`LayerField` rows, `ReceptiveFieldReport`, `format_table`). Torch-free.

Notation (Araujo et al. 2019, "Computing Receptive Fields of Convolutional Neural Networks", Distill,
https://distill.pub/2019/computing-receptive-fields/), per spatial axis of a feature map:

- RF size r: how many input pixels one unit sees (before clipping by the image border);
- effective stride j: how far (in input pixels) the fields of two neighbouring units are apart;
- effective padding P: unit i sees input pixels [i*j - P, i*j - P + r - 1].

Through a layer with kernel k, stride s, padding p and dilation d (all per axis):
r_out = r_in + (d*(k-1)) * j_in,  j_out = j_in * s,  P_out = P_in + p * j_in.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
                         f"{size} units, RF {pair_text(f.rf)} px, stride {pair_text(f.stride)} px, "
                         f"padding {pair_text(f.padding)} px" +
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


def pair_text(v, sep: str = "x") -> str:
    if v is None:
        return "-"
    return str(v[0]) if v[0] == v[1] else f"{v[0]}{sep}{v[1]}"


def format_table(report: ReceptiveFieldReport) -> str:
    """The per-layer table (layer, op, output size, RF, stride, padding, note) as aligned text."""
    head = ("layer", "op", "output", "RF px", "stride px", "padding px", "all positions", "note")
    rows = [(r.layer, r.op, "-" if r.output_size is None else f"{r.output_size[0]}x{r.output_size[1]}",
             pair_text(r.rf), pair_text(r.stride), pair_text(r.padding),
             "yes" if r.global_from else "", r.note) for r in report.layers]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    widths[-1] = 0
    lines = ["  ".join(str(v).ljust(wd) for v, wd in zip(head, widths)).rstrip()]
    lines.append("-" * (sum(widths[:-1]) + 2 * (len(widths) - 1) + 10))
    lines += ["  ".join(str(v).ljust(wd) for v, wd in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
