#!/usr/bin/env python
"""Train a network of the catalog (--model) on CIFAR-10, the course recipe by default, then test the best checkpoint.

    python train.py --model vgg16 --accelerator gpu
    python train.py --config configs/resnet50.yaml --epochs 30 --data-dir ~/data/cifar10-jpeg.tar.gz
    python train.py --resume last

The command itself lives in cli/train.py.
"""
import sys

from cli.train import main

if __name__ == "__main__":
    sys.exit(main())
