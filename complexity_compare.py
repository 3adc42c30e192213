"""Compare fvcore, ptflops, thop, torchscan and torch's FlopCounterMode on one model, in one unit.

The tools disagree because they count different operations, not because one is wrong: FlopCounterMode counts
convolutions and matrix products only (the baseline; its FLOPs / 2 are torchvision's published "_ops", which its
docs label GFLOPS but which are GMACs); the others add batch norm, pooling, activations or bias terms by their own rules.
The table gives params, MACs and FLOPs (= 2 x MACs) in the same unit, the difference to the baseline and,
from each tool's own per-operator numbers, what makes it up. Written to
results/complexity/<model>_<H>x<W>_compare.md and .json.

Examples:
    python complexity_compare.py --model resnet18 --num_classes 1000
    python complexity_compare.py --model mobilenet_v3_small --json
"""

from __future__ import annotations

import argparse

from utils import cli
from utils.analysis.complexity import COMPLEXITY_DIR, compare_table, explain
from utils.analysis.complexity_tools import run_tool
from utils.analysis.model_loading import AnalysisSpec, add_model_args, check_forward, load_analysis_model, result_stem
from utils.io import publish_report

TOOLS = ("fvcore", "ptflops", "thop", "torchscan", "FlopCounterMode")


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    add_model_args(p)
    p.add_argument("--out_dir", default=str(COMPLEXITY_DIR), help="where <model>_<H>x<W>_compare.md/.json are written")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = cli.resolve_device(args.device)
    spec = AnalysisSpec(args.model, args.weights, args.num_classes, args.input_size, args.default_model)
    am = load_analysis_model(spec, device, fast_init=args.weights is None)
    check_forward(am, device)
    results = [run_tool(tool, am.model, am.input_size, device) for tool in TOOLS]
    table = compare_table(results, am)
    notes = "\n".join(f"- **{r.tool}**: {r.convention}" + "".join(f" Warning: {w}" for w in r.warnings) for r in results)
    text = f"{table}\n\nWhat each tool counts:\n\n{notes}\n"
    payload = {"model": am.name, "num_classes": am.num_classes, "input_size": list(am.input_size), "source": am.source,
               "units": {"params": "parameters", "macs": "multiply-accumulates", "flops": "2 x MACs"},
               "tools": [{k: v for k, v in r.to_dict().items() if k != "per_module"} | {"explanation": explain(r, results[-1])}
                         for r in results]}
    publish_report(args.out_dir, f"{result_stem(am)}_compare", text, payload, as_json=args.json, text_suffix=".md")
    return 0


if __name__ == "__main__":
    cli.run(main)
