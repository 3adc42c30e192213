"""Receptive field, effective stride and effective padding of every feature map of a network.

Follows the real computation graph (residual additions, concatenations, squeeze-excitation, views), not just
a chain of layers: one forward pass is recorded operator by operator (see utils/analysis/rf_trace.py). For each
layer that changes the field it prints the output size, RF (px), effective stride (px) and effective padding
(px): unit i of that map sees input pixels [i*stride - padding, i*stride - padding + RF - 1] on each axis.
Global pooling, squeeze-excitation or a Linear on a flattened map make the field the whole image: said
explicitly. Written to results/receptive_field/<model>_<H>x<W>.txt and .json.

Examples:
    python receptive_field.py --model resnet18
    python receptive_field.py --model vgg16 --json
    python receptive_field.py --model fcn_resnet18 --input_size 3 448 448
"""

from __future__ import annotations

import argparse

import torch

from utils import cli
from utils.analysis.model_loading import AnalysisSpec, add_model_args, load_analysis_model, result_stem
from utils.analysis.rf_fields import format_table
from utils.analysis.rf_trace import receptive_fields
from utils.errors import InputError
from utils.io import publish_report


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    add_model_args(p)
    p.add_argument("--out_dir", default="results/receptive_field", help="where <model>_<H>x<W>.txt/.json are written")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = cli.resolve_device(args.device)
    spec = AnalysisSpec(args.model, args.weights, args.num_classes, args.input_size, args.default_model)
    # weights do not matter: without a checkpoint the model lives on the meta device (no memory, no compute)
    am = load_analysis_model(spec, device, meta=not args.weights)
    c, h, w = am.input_size
    p0 = next(iter(am.model.parameters()), None)
    try:
        report = receptive_fields(am.model, am.input_size, device=p0.device if p0 is not None else device)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{am.name} cannot run on input {tuple(am.input_size)}: {first} (fix --input_size)") from None
    table = format_table(report)
    text = (f"receptive fields of {am.name} for a {c}x{h}x{w} input (RF, stride, padding in input pixels)\n\n"
            f"{table}\n\n{report.summary()}")
    if report.warnings:
        text += "\n" + "\n".join(f"warning: {m}" for m in report.warnings)
    payload = {"model": am.name, "input_size": [c, h, w], "units": "input pixels", **report.to_dict()}
    publish_report(args.out_dir, result_stem(am), text, payload, as_json=args.json)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli.run(main)
