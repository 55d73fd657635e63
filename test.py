#!/usr/bin/env python
"""Evaluate a checkpoint (ours or a course state dict) on the CIFAR-10 test set.

The command itself lives in cli/test.py.
"""
import sys

from cli.test import main

if __name__ == "__main__":
    sys.exit(main())
