#!/usr/bin/env python
"""Where the time of one training step goes: torch.profiler's table of the most expensive operators.

The step is the one train.py runs (our backbone, cross-entropy, the LightningModule's optimiser)
on a fixed random batch, so that the data path is out of the picture and what remains is the
network's own cost on this device and precision.

    python benchmarks/profile_step.py --model resnet50 --accelerator cpu
    python benchmarks/profile_step.py --model vgg16 --accelerator gpu --precision bf16-mixed
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch
from torch.profiler import ProfilerActivity, profile

from base.schema import positive_int
from cli.flags import Parser, one_line_errors
from run.hardware import resolve_hardware
from models import prepare_backbone
from run.hardware import use_channels_last
from lit_modules import ImageClassifier
from models import MODEL_NAMES, build_model


def build_parser() -> Parser:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="resnet50", help="network to profile")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per step")
    parser.add_argument("--steps", type=positive_int, default=5, help="profiled steps, after as many warm-up steps")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="one device of it")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true", help="autocast or not")
    parser.add_argument("--rows", type=positive_int, default=15, help="operators listed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    with one_line_errors(argv):
        args = build_parser().parse_args(argv)
        hardware = resolve_hardware(args.accelerator, "1", args.precision)
        device = torch.device("cuda" if hardware.accelerator == "gpu" else "cpu")
        channels_last = use_channels_last(None, hardware)
        torch.manual_seed(0)
        backbone = prepare_backbone(build_model(args.model).to(device), channels_last=channels_last, compile=False)
        module = ImageClassifier(args.model, backbone=backbone)
        optimizer = module.configure_optimizers()["optimizer"]
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        images = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
        labels = torch.randint(0, 10, (args.batch_size,), device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = module.criterion(backbone(images), labels)
            loss.backward()
            optimizer.step()

        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(
            f"{args.model}, batch {args.batch_size}, {hardware.precision}, channels_last {channels_last}, "
            f"{torch.get_num_threads()} CPU threads: {args.steps * args.batch_size / seconds:.1f} images/s, "
            f"{1000 * seconds / args.steps:.1f} ms per step (unprofiled)"
        )
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows))
        return 0


if __name__ == "__main__":
    sys.exit(main())
