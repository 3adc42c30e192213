#!/usr/bin/env bash
# The CUDA path, proven in one command on a GPU machine, within --budget seconds (default 290: under 5 minutes):
#   1. pytest_cuda: `pytest -m cuda`, the tests marked cuda (tests/test_cuda.py: fp16 + GradScaler, bf16, EMA,
#      channels_last, accumulation, tensor pipeline, evaluation, TorchScript/torch.compile, ONNX export of a
#      GPU-trained model, predict_ckpoint.py --device cuda, resume after SIGKILL)
#   2. torchrun_nccl: `torchrun --nproc_per_node=1 train.py` on NCCL (the DDP code path), NCCL_DEBUG=INFO as proof
#   3. train.py end to end on the real Fashion-MNIST (<data_root>/FashionMNIST/raw/): the FashionCNN and
#      ResNet18 recipes (recipes/*.yaml, docs/recipes.md), then the fastest recipe to 93 % test acc@1 we know
#      (ResNet18 28 px, batch 256, bf16, channels_last, data augmented on the GPU); when the budget leaves them
#      their whole limit (--budget 500), two optional ones: ResNet-9 (bf16, 8 epochs) and the ResNet18 speed run
#      with torch.compile
#
#   bash scripts/gpu_check.sh [--out DIR] [--data_root DIR] [--budget SECONDS] [--wheels DIR] [--keep_weights]
#
# Runs with the machine's python3, never .venv (PYTHON=/path/to/python to choose another). It needs torch with CUDA,
# torchvision, numpy, pillow, torchmetrics, tensorboard, tqdm, matplotlib, onnx, onnxruntime and pytest, and no
# network; --wheels DIR puts the pure-Python wheels in DIR (pytest, pluggy, iniconfig, packaging) on PYTHONPATH for a
# machine without pytest. Writes DIR (default results/gpu_check/): summary.json (made and checked by
# scripts/gpu_check_summary.py), one log per step (<step>.log), gpu_check.log (each command, exit code and time),
# machine.json, pytest_cuda.xml, runs/<step>/ (results.csv, args.json; checkpoints deleted unless --keep_weights).
# Exit codes: 0 every step passed; 1 a step failed (summary.json and its log say which and why); 2 no GPU or bad
# usage: one line on stderr, nothing written.
# GPU_CHECK_DEVICE=cpu runs the script on the CPU with 1-epoch fp32 runs, time limits x10 and no torch.compile step
# (give a small --data_root): a dry run that tests the script itself on a machine without a GPU; it proves nothing about CUDA.
# GPU_CHECK_PYTEST_ARGS adds arguments to the pytest step (e.g. "-k ema" for a quick dry run).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT=results/gpu_check
DATA_ROOT=data
BUDGET=290
WHEELS=
KEEP_WEIGHTS=0
USAGE="usage: bash scripts/gpu_check.sh [--out DIR] [--data_root DIR] [--budget SECONDS] [--wheels DIR] [--keep_weights]"

die() {
    echo "error: $*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
        --out|--data_root|--budget|--wheels)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value ($USAGE)"
            case $1 in --out) OUT=$2 ;; --data_root) DATA_ROOT=$2 ;; --budget) BUDGET=$2 ;; --wheels) WHEELS=$2 ;; esac
            shift 2 ;;
        --keep_weights) KEEP_WEIGHTS=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' ($USAGE)" ;;
    esac
done
case $BUDGET in '' | *[!0-9]*) die "--budget $BUDGET: give whole seconds, e.g. --budget 290" ;; esac
case $DEVICE in cuda | cpu) ;; *) die "GPU_CHECK_DEVICE=$DEVICE: use cuda (the default) or cpu (a dry run)" ;; esac
command -v "$PYTHON" > /dev/null 2>&1 || die "PYTHON=$PYTHON is not a command: set PYTHON to the Python that has torch with CUDA"
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || die "--wheels $WHEELS is not a directory"
    for wheel in "$WHEELS"/*.whl; do
        [ -e "$wheel" ] && PYTHONPATH="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")${PYTHONPATH:+:$PYTHONPATH}"
    done
    export PYTHONPATH
fi

# The GPU first: without one, say so on one line and write nothing.
machine=$("$PYTHON" - "$DEVICE" 2> /dev/null << 'EOF'
import importlib.metadata as md
import json
import platform
import sys

device = sys.argv[1]
try:
    import torch
except Exception as e:
    print(f"{sys.executable} cannot import torch ({type(e).__name__}: {e})")
    sys.exit(3)
if device == "cuda" and not torch.cuda.is_available():
    why = ("a CPU-only build" if torch.version.cuda is None
           else f"built for CUDA {torch.version.cuda}, but no GPU is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES")
    print(f"no CUDA GPU: torch {torch.__version__} sees none ({why}); run scripts/gpu_check.sh on a machine with an NVIDIA GPU")
    sys.exit(3)
info = {"device": device, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
        "cpu_cores": __import__("os").cpu_count()}
if device == "cuda":
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                gpu_memory_gib=round(props.total_memory / 2**30, 1), compute_capability=f"{props.major}.{props.minor}",
                cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        info["nccl"] = None
packages = {}
for name in ("torchvision", "numpy", "pillow", "torchmetrics", "tensorboard", "onnx", "onnxruntime", "onnxruntime-gpu", "pytest", "triton"):
    try:
        packages[name] = md.version(name)
    except md.PackageNotFoundError:
        packages[name] = None
info["packages"] = packages
print(json.dumps(info))
EOF
) || die "$(printf '%s\n' "$machine" | tail -n 1)"

mkdir -p "$OUT" || die "cannot create --out $OUT"
rm -rf "$OUT/runs" "$OUT"/*.log "$OUT/steps.tsv" "$OUT/summary.json" "$OUT/pytest_cuda.xml"
printf '%s\n' "$machine" > "$OUT/machine.json"
export MPLBACKEND=Agg
START=$SECONDS
SLOWER=1
[ "$DEVICE" = cpu ] && SLOWER=10

# run_step NAME KIND LIMIT COMMAND...: run it with its log, a time limit (never past the budget) and a steps.tsv line;
# OPTIONAL=1 marks a step that runs only when its whole limit fits in the budget, and whose skipping does not fail the check
run_step() {
    local name=$1 kind=$2 limit=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START)))
    limit=$((limit * SLOWER))
    if [ "$left" -lt 20 ]; then
        skip_step "$name" "$kind" "the time budget (--budget $BUDGET s) was used up"
        return
    fi
    if [ "${OPTIONAL:-0}" = 1 ] && [ "$limit" -gt "$left" ]; then
        skip_step "$name" "$kind" "it needs up to $limit s and $left s of the budget were left (raise --budget)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "[gpu_check] $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$rc" "$((SECONDS - t0))" "$limit" "$*" "${OPTIONAL:-0}" >> "$OUT/steps.tsv"
    echo "[gpu_check] $name: exit $rc after $((SECONDS - t0)) s (log: $OUT/$name.log)" | tee -a "$OUT/gpu_check.log"
}

skip_step() {
    printf '%s\t%s\t-\t0\t0\t%s\t%s\n' "$1" "$2" "$3" "${OPTIONAL:-0}" >> "$OUT/steps.tsv"
    echo "[gpu_check] $1: skipped, $3" | tee -a "$OUT/gpu_check.log"
}

# 1. the tests marked cuda (only the files that have some: the others may import tools this machine lacks)
mapfile -t cuda_files < <(grep -l "pytest.mark.cuda" tests/test_*.py)
dry=()
[ "$DEVICE" = cpu ] && dry=(env CUDA_TESTS_DEVICE=cpu)
read -r -a pytest_args <<< "${GPU_CHECK_PYTEST_ARGS:-}"
run_step pytest_cuda pytest 170 "${dry[@]}" "$PYTHON" -m pytest -m cuda "${cuda_files[@]}" -q -rA -p no:cacheprovider \
    --junitxml "$OUT/pytest_cuda.xml" "${pytest_args[@]}"

# 2 and 3: train.py on the real Fashion-MNIST
common=(--device "$DEVICE" --quiet --num_workers 4 --data_root "$DATA_ROOT" --eval_epoch 1)
short=()
amp=(--fp16)
if [ "$DEVICE" = cpu ]; then
    short=(--max_epoch 1)
    amp=()  # --fp16 is bfloat16 on a CPU, emulated (many times slower) without AVX-512 BF16/AMX
fi
have_data=1
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -e "$DATA_ROOT/FashionMNIST/raw/$f" ] || [ -e "$DATA_ROOT/FashionMNIST/raw/$f.gz" ] || have_data=0
done
no_data="no Fashion-MNIST in $DATA_ROOT/FashionMNIST/raw/ (put the four .gz files there, or give --data_root)"

train_step() {  # train_step NAME KIND LIMIT TRAIN_FLAGS...
    local name=$1 kind=$2 limit=$3
    shift 3
    if [ "$have_data" = 0 ]; then
        skip_step "$name" "$kind" "$no_data"
        return
    fi
    local launcher=("$PYTHON")
    [ "$kind" = torchrun ] && launcher=(env NCCL_DEBUG=INFO "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1)
    run_step "$name" "$kind" "$limit" "${launcher[@]}" train.py "$@" "${common[@]}" --path_to_save "$OUT/runs/$name" "${short[@]}"
}

train_step torchrun_nccl torchrun 60 --model custom --img_size 28 --max_epoch 2 --batch_size 256
# the recipes of recipes/fashion_cnn_56px.yaml and resnet18_28px.yaml (same flags; --fp16 is float16 + GradScaler on CUDA)
train_step e2e_fashioncnn train 100 --model custom --img_size 56 --max_epoch 15 --batch_size 128 "${amp[@]}" --channels_last \
    --label_smoothing 0.1 --random_erasing 0.2
train_step e2e_resnet18 train 90 --model resnet18 --img_size 28 --max_epoch 6 --batch_size 128 "${amp[@]}" --channels_last \
    --label_smoothing 0.1
# the speed run: half the optimizer steps of the ResNet18 recipe, bfloat16 (no GradScaler, so no host sync per step)
speedrun=(--model resnet18 --img_size 28 --max_epoch 6 --batch_size 256 --base_lr 4e-3 "${amp[@]}" --amp_dtype bfloat16
          --channels_last --label_smoothing 0.1)
train_step e2e_speedrun train 60 "${speedrun[@]}"
# optional, when the budget leaves them their whole limit: the DAWNBench ResNet-9 (half ResNet18's MACs at 28 px, a
# third of its layers; this recipe is untested), then the ResNet18 speed run with torch.compile
if [ "$DEVICE" = cpu ]; then
    OPTIONAL=1 skip_step e2e_speedrun_resnet9 train "dry run: the optional speed runs are for GPUs"
    OPTIONAL=1 skip_step e2e_speedrun_compile train "dry run: torch.compile of ResNet18 takes minutes on a CPU"
else
    OPTIONAL=1 train_step e2e_speedrun_resnet9 train 60 --model resnet9 --img_size 28 --max_epoch 8 --batch_size 256 \
        --base_lr 4e-3 "${amp[@]}" --amp_dtype bfloat16 --channels_last --label_smoothing 0.1
    OPTIONAL=1 train_step e2e_speedrun_compile train 150 "${speedrun[@]}" --compile
fi

[ "$KEEP_WEIGHTS" = 1 ] || find "$OUT/runs" -name '*.pth' -delete 2> /dev/null
"$PYTHON" scripts/gpu_check_summary.py --out "$OUT" --budget "$BUDGET"
