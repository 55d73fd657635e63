#!/usr/bin/env python
"""Export a checkpoint's network to ONNX, TorchScript or safetensors, for use outside this project.

The command itself lives in cli/export.py.
"""
from cli.export import main
from cli.flags import run_main

if __name__ == "__main__":
    run_main(main)
