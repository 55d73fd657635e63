#!/usr/bin/env bash
# The recipe screening: every candidate in benchmarks/screening/ trained for the same 10-epoch
# schedule on the full 45,000 training images, seed 0, one after the other, each in its own
# train.py process (benchmarks/accuracy.py), results and logs in OUT. Candidates already in OUT are
# skipped, so the same command continues a screening that was stopped.
#   bash benchmarks/screening.sh DATA [OUT] [candidate.yaml ...]
# DATA: the CIFAR-10 copy (--data-dir); OUT defaults to benchmarks/results/screening-cpu. The
# candidates run in the order given (default: the order below, most informative first). Extra
# train.py flags go in SCREENING_FLAGS (default: --accelerator cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash benchmarks/screening.sh DATA [OUT] [candidate.yaml ...]}
out=${2:-benchmarks/results/screening-cpu}
shift $(( $# >= 2 ? 2 : 1 ))
candidates=("$@")
if [ ${#candidates[@]} -eq 0 ]; then
    candidates=(
        benchmarks/screening/vgg16_bn-b512-lr0.4-cutout8.yaml
        benchmarks/screening/resnet50-b128-lr0.1.yaml
        benchmarks/screening/vgg16-b512-lr0.05.yaml
        benchmarks/screening/vgg16-b128-lr0.05-cutout8.yaml
        benchmarks/screening/vgg16_bn-b512-lr0.2-cutout8.yaml
        benchmarks/screening/resnet50-b512-lr0.05.yaml
        benchmarks/screening/resnet50-b128-lr0.1-cutout8.yaml
        benchmarks/screening/vgg16-b128-lr0.1.yaml
        benchmarks/screening/vgg16-b128-lr0.05.yaml
    )
fi
for candidate in "${candidates[@]}"; do
    # One accuracy.py call per candidate, so a failed one does not stop the others.
    python -m benchmarks.accuracy --configs "$candidate" --seeds 0 --data-dir "$data" --out "$out" --tag e10 \
        -- --epochs 10 ${SCREENING_FLAGS:---accelerator cpu} || echo "screening: $candidate failed, going on" >&2
done
