#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, get Fashion-MNIST, train FashionCNN briefly,
# evaluate it, export it to ONNX and predict a real test image.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY=${VENV:-.venv}/bin/python
EPOCHS=${EPOCHS:-3}
# Use the four official files if they sit beside the project (as in CI); otherwise train.py finds
# them in data/, in Debian's dataset-fashion-mnist, or downloads them.
if [ -d ../shared/data/FashionMNIST/raw ] && [ ! -e data/FashionMNIST/raw/train-images-idx3-ubyte.gz ]; then
  mkdir -p data/FashionMNIST/raw && cp ../shared/data/FashionMNIST/raw/*.gz data/FashionMNIST/raw/
fi
$PY train.py --model custom --img_size 28 --max_epoch "$EPOCHS" --batch_size 128 --tensorboard --quiet
$PY eval.py --weights weights/FashionMNIST/custom/best.pth --quiet
# Deploy: export to ONNX (checked against PyTorch), save three real test images as PNG, predict them
# with ONNX Runtime (no torch import; class names and preprocessing come from the .onnx metadata).
$PY export.py --weights weights/FashionMNIST/custom/best.pth
$PY save_test_images.py --out data/test_images --count 3
$PY predict.py --model weights/FashionMNIST/custom/converted_models/custom.onnx --image data/test_images --topk 3
