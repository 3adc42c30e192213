"""Classify images with any model file: ONNX (ONNX Runtime, no torch import), torch.export .pt2, a training
checkpoint .pth, or a TorchScript .pt (legacy). The output is the same for each.

Examples:
  python predict.py --model weights/FashionMNIST/custom/converted_models/custom.onnx --image shoe.png
  python predict.py --model custom.onnx --image photos/ --topk 3 --json
  python predict.py --model custom.pt2 --image 'samples/*.png' --device cuda
  python predict.py --model weights/FashionMNIST/custom/best.pth --image shoe.png
  python predict.py --model custom.onnx --image big_folder/ --output predictions.csv --batch_size 64

The engine comes from the file: .onnx -> ONNX Runtime, .pt2 -> torch.export, .pth -> PyTorch (the checkpoint's
EMA weights when it has them), .pt -> TorchScript; --engine forces one. Class names and preprocessing (size, resize,
crop, mean, std, channels) are read from the artifact's metadata (written by export.py) or the checkpoint;
--classes is only needed for artifacts without names. Images go
through the same eval transform as training-time validation (utils/data/preprocess.py): EXIF rotation,
any Pillow mode (grayscale, RGBA, palette, CMYK, 16-bit) converted to the model's channels.

Prints the top-k classes with probabilities per image, the model load time and the median inference
time per image (after warm-up). Images are decoded in threads while the model runs on batches of --batch_size;
--output FILE.csv or FILE.jsonl streams one row per image to a file instead (path, top-k classes and
probabilities, error), with a progress bar, in constant memory whatever the folder size. An image that cannot
be read (missing, not an image, truncated, refused by Pillow's decompression-bomb limit) or whose scores come
out NaN is reported on one line (and in the file's error column) and the others are still predicted; the exit
code is then 2. The ONNX path imports numpy, Pillow, tqdm and onnxruntime only.
"""

from __future__ import annotations

import argparse

from utils import cli
from utils.deploy.open_model import ENGINES, predict_files, request_from_flags
from utils.deploy.predict import add_predict_args


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, metavar="FILE",
                   help="an .onnx, .pt2 or TorchScript .pt written by export.py, or a .pth checkpoint written by train.py")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="runtime; auto = from the file (.onnx ONNX Runtime, .pt2 torch.export, .pth pytorch, .pt torchscript)")
    p.add_argument("--model_name", default=None, metavar="NAME",
                   help="for a .pth checkpoint only: override the network name stored in it (predict_ckpoint.py's -m)")
    p.add_argument("--img_size", type=cli.positive(), default=None,
                   help="crop size, only for artifacts without preprocessing metadata (ImageNet mean/std assumed)")
    add_predict_args(p)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return predict_files(request_from_flags(args.model, args.engine, args))


if __name__ == "__main__":
    cli.run(main)
