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
# Each run gets its own directory (weights/FashionMNIST/custom, then custom-2, ...): follow the one this run
# printed as "run_dir: <path>", so running the demo again uses the new run.
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
$PY train.py --model custom --img_size 28 --max_epoch "$EPOCHS" --batch_size 128 --tensorboard --quiet | tee "$LOG"
RUN=$(sed -n 's/^run_dir: //p' "$LOG" | tail -n 1)
$PY eval.py --weights "$RUN/best.pth" --quiet
# Deploy: export to ONNX (checked against PyTorch), save three real test images as PNG, predict them
# with ONNX Runtime (no torch import; class names and preprocessing come from the .onnx metadata).
$PY export.py --weights "$RUN/best.pth"
$PY save_test_images.py --out data/test_images --count 3
$PY predict.py --model "$RUN/converted_models/custom.onnx" --image data/test_images --topk 3
