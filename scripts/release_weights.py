"""Make a shipped model from a training checkpoint: a weights-only checkpoint (EMA weights, no optimizer or EMA copy)
written to --out, with its size and sha256 printed for docs/models.md. Export its ONNX file with export.py.

Example:
    python scripts/release_weights.py --weights weights/recipes/FashionMNIST/speednet_10min/best.pth \
        --out weights/fashion_mnist/speednet.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import cli  # noqa: E402
from utils.checkpoint import load_checkpoint, release_checkpoint, save_checkpoint  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.io import file_sha256  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--weights", required=True, metavar="CKPT", help="checkpoint written by train.py (best.pth)")
    p.add_argument("--out", required=True, metavar="FILE.pth", help="where the weights-only checkpoint goes")
    p.add_argument("--exist_ok", action="store_true", help="allow replacing an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.exist_ok:
        raise InputError(f"{out} exists: pass --exist_ok to replace it")
    save_checkpoint(release_checkpoint(load_checkpoint(args.weights)), out)
    print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, sha256 {file_sha256(out)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
