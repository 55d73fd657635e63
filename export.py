#!/usr/bin/env python
"""Export a checkpoint's network to ONNX, TorchScript or safetensors, for use outside this project.

The command itself lives in cli/export.py.
"""
import sys

from cli.export import main

if __name__ == "__main__":
    sys.exit(main())
