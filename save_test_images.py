"""Save real Fashion-MNIST test images as PNG files named <index>_<class>.png, e.g. as inputs for predict.py.

Examples:
  python save_test_images.py --out data/test_images --count 3
  python save_test_images.py --out samples --count 20 --start 100
"""

from __future__ import annotations

import argparse

from utils import cli
from utils.data.fashion_mnist import save_test_images


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the PNG files to")
    p.add_argument("--count", type=cli.positive(), default=10, help="how many test images")
    p.add_argument("--start", type=cli.non_negative(), default=0, help="index of the first test image")
    p.add_argument("--data_root", default="data", help="where Fashion-MNIST lives (<data_root>/FashionMNIST/raw/)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    paths = save_test_images(args.data_root, args.out, args.count, args.start)
    print(f"wrote {len(paths)} images to {args.out}/ (first: {paths[0].name})" if paths else "no images written")
    return 0


if __name__ == "__main__":
    cli.run(main)
