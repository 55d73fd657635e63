#!/usr/bin/env python
"""Evaluate a checkpoint (ours or a course state dict) on the CIFAR-10 test set.

The command itself lives in cli/test.py.
"""
from cli.test import main
from cli.flags import run_main

if __name__ == "__main__":
    run_main(main)
