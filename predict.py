#!/usr/bin/env python
"""Classify image files with a checkpoint: the predicted CIFAR-10 class and the top-k probabilities.

The command itself lives in cli/predict.py.
"""
import sys

from cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
