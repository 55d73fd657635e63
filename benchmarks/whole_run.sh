#!/usr/bin/env bash
# One whole run of a recipe on the CPU, seed 0, the run folder in runs/whole/ and its output in a
# log: the runs behind README's results table. A run that was stopped (SIGTERM, Ctrl-C, the end of
# a working session) continues exactly where it stopped with the same command plus --resume.
#   bash benchmarks/whole_run.sh CONFIG DATA [--resume]
#   nohup bash benchmarks/whole_run.sh configs/vgg16_bn_fast.yaml ~/data/cifar10-jpeg.tar.gz > vgg16_bn.log 2>&1 &
# The test results and timings go to runs/whole/NAME-seed0.json (train.py --results-json); copy
# it, the log and the curves (python benchmarks/curves.py RUN_FOLDER) into benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: bash benchmarks/whole_run.sh CONFIG DATA [--resume]}
data=${2:?usage: bash benchmarks/whole_run.sh CONFIG DATA [--resume]}
name=$(basename "$config" .yaml)-seed0
extra=()
if [ "${3:-}" = "--resume" ]; then extra=(--resume last); fi
exec python train.py --config "$config" --seed 0 --accelerator cpu --data-dir "$data" \
    --output-dir runs/whole --run-name "$name" --results-json "runs/whole/$name.json" \
    --time-to-accuracy 0.93 "${extra[@]}"
