"""Count params and MACs with thop (pytorch-OpCounter's profile). thop's 'ops' are MACs.

Prints totals (params, MACs, FLOPs = 2 x MACs unless stated), a per-module table and by-operator totals,
and writes them to results/complexity/<model>_<H>x<W>_thop.txt and .json. Runs on CPU by default.

Examples:
    python complexity_thop.py --model resnet18
    python complexity_thop.py --model vgg16 --input_size 3 224 224 --max_depth 1 --json
    python complexity_thop.py --weights weights/FashionMNIST/custom/best.pth
"""

from __future__ import annotations

import argparse

from utils import cli
from utils.analysis import complexity as cx
from utils.analysis.model_loading import AnalysisSpec


def get_args_parser() -> argparse.ArgumentParser:
    return cx.tool_parser("thop", __doc__)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    spec = AnalysisSpec(args.model, args.weights, args.num_classes, args.input_size, args.default_model)
    return cx.run_tool_cli("thop", spec, device=args.device, max_depth=args.max_depth, out_dir=args.out_dir,
                           as_json=args.json)


if __name__ == "__main__":
    cli.run(main)
