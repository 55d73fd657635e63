#!/usr/bin/env bash
# One whole run of a recipe on the CPU, seed 0, the run folder in runs/whole/ and its output in a
# log: the runs behind README's results table. A run that was stopped (SIGTERM, Ctrl-C, the end of
# a working session) continues exactly where it stopped with the same command plus --resume.
#   bash benchmarks/whole_run.sh CONFIG DATA [--resume] [train.py flags ...]
#   nohup bash benchmarks/whole_run.sh configs/vgg16_fast.yaml ~/data/cifar10-jpeg.tar.gz > vgg16.log 2>&1 &
# --time-to-accuracy 0.93 adds the test set after every epoch (for the time to 93 %); on 2 CPU
# cores that evaluation adds about a quarter to each epoch, so only the batch-512 vgg16_bn run had
# it. The test results and timings go to runs/whole/NAME-seed0.json (train.py --results-json);
# copy it, the log and the curves (python benchmarks/curves.py RUN_FOLDER) into
# benchmarks/results/whole-cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash benchmarks/whole_run.sh CONFIG DATA [--resume] [train.py flags ...]"
config=${1:?$usage}
data=${2:?$usage}
shift 2
name=$(basename "$config" .yaml)-seed0
resume=()
if [ "${1:-}" = "--resume" ]; then resume=(--resume last); shift; fi
exec python train.py --config "$config" --seed 0 --accelerator cpu --data-dir "$data" \
    --output-dir runs/whole --run-name "$name" --results-json "runs/whole/$name.json" \
    "${resume[@]}" "$@"
