"""Merge the JSON reports under results/ into markdown tables.

Examples:
  python summarize_results.py                      # results/*.json + results/quantization/*.json -> results/summary.md
  python summarize_results.py --results_dir runs/results --output summary.md

Table 1 has one row per eval.py report (results/*.json: checkpoints, FP16 checkpoints, ONNX, TorchScript,
INT8), so accuracy, size and speed of every model and format sit side by side. Table 2 lists the
quantization runs (results/quantization/*.json written by quantize.py). Sizes are MB (10^6 bytes):
weights as stored for checkpoints, file size for exported artifacts. MMACs: millions of multiply-accumulates per
image in convolutions and matrix products (FlopCounterMode; FLOPs = 2 x MACs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils import cli
from utils.evaluation.report import write_summary


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--results_dir", default="results", help="folder holding eval.py's JSON reports")
    p.add_argument("--output", default=None, help="markdown file to write (default <results_dir>/summary.md)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.output) if args.output else Path(args.results_dir) / "summary.md"
    print(write_summary(Path(args.results_dir), out))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
