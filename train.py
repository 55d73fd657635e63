#!/usr/bin/env python
"""Train VGG16 or ResNet50 on CIFAR-10 (the course recipe by default), then test the best checkpoint.

    python train.py --model vgg16 --accelerator gpu
    python train.py --config configs/resnet50.yaml --epochs 30 --data-dir ~/data/cifar10-jpeg.tar.gz
    python train.py --resume last
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from cli.flags import run_main
from cli.train_args import parse_run_config
from run.training import summary_lines, train


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_run_config(argv, description=__doc__.splitlines()[0])
    outcome = train(config, argv)
    if outcome.is_global_zero:
        lines = summary_lines(outcome)
        width = max(len(label) for label, _ in lines)
        print("\n".join(f"{label:<{width}}  {value}" for label, value in lines))
    return 0


if __name__ == "__main__":
    run_main(main)
