#!/usr/bin/env bash
# Trains ResNet50 briefly on the CPU on a few thousand real CIFAR-10 images, tests the best checkpoint
# on all 10,000 real test images with test.py, and fails unless accuracy is well above chance.
#   bash scripts/real_data_check.sh [DATA] [MIN_ACCURACY]
# DATA defaults to $CIFAR10_DATA, else the copy beside the checkout (../shared/data), else the
# machine's shared copy, so that a clone anywhere (CI's, a mktemp folder) finds it.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-${CIFAR10_DATA:-}}
if [ -z "$data" ]; then
    for candidate in ../shared/data/cifar10-jpeg.tar.gz /work/shared/data/cifar10-jpeg.tar.gz; do
        if [ -e "$candidate" ]; then data=$candidate; break; fi
    done
fi
if [ -z "$data" ]; then
    echo "real_data_check.sh: error: no CIFAR-10 archive found; pass its path or set CIFAR10_DATA" >&2
    exit 2
fi
min_accuracy=${2:-0.25}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

python train.py --model resnet50 --accelerator cpu --data-dir "$data" --train-limit 8000 --val-size 1000 \
    --epochs 3 --log-every-n-steps 10 --output-dir "$out/runs" --workers 0
python test.py --ckpt "$out/runs/resnet50/version_0/checkpoints/best.ckpt" --data-dir "$data" \
    --accelerator cpu --workers 0 --json "$out/result.json"
python - "$out/result.json" "$min_accuracy" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
accuracy, floor = result["accuracy"], float(sys.argv[2])
assert result["images"] == 10000, f"tested {result['images']} images, expected all 10000"
assert accuracy >= floor, f"real-data accuracy {accuracy:.4f} is below {floor} (chance is 0.10)"
print(f"real-data check passed: {100 * accuracy:.2f} % on {result['images']} real test images (floor {100 * floor:.0f} %)")
PY
