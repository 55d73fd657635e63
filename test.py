#!/usr/bin/env python
"""Evaluate a checkpoint (ours or a course state dict) on the CIFAR-10 test set.

    python test.py --ckpt runs/vgg16/version_0/checkpoints/best.ckpt
    python test.py --ckpt vgg16_epoch250.ckpt --data-dir ../shared/data/cifar10-jpeg.tar.gz --json result.json
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from rich.console import Console
from rich.table import Table

from common.checkpoints import build_backbone, load_checkpoint
from common.cli import Parser, add_data_args, add_hardware_args, quiet_lightning, resolve_hardware, run_main
from common.files import atomic_write_text
from common.runs import require_run_dir, run_dashboards
from common.speed import prepare_backbone, use_channels_last
from datamodules import CIFAR10DataModule, check_data_dir, describe_source
from lit_modules import TTA_MODES, ImageClassifier
from models import MODEL_NAMES


def build_parser() -> Parser:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a .ckpt written by train.py, or a course state dict")
    parser.add_argument(
        "--model", choices=MODEL_NAMES, default=None, help="expected network (default: read from the checkpoint)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--log-to-run",
        action="store_true",
        help="also add the test metrics, confusion matrix and misclassified images to the TensorBoard "
        "dashboards of the train.py run that --ckpt belongs to (runs/<model>/version_N/checkpoints/)",
    )
    parser.add_argument(
        "--tta",
        choices=TTA_MODES,
        default=None,
        help="test-time augmentation; flip: mean logits of each image and its mirror (default: what the "
        "checkpoint's training run validated and tested with, as train.py reported it; none for course state dicts)",
    )
    add_data_args(parser)
    add_hardware_args(parser)
    return parser


def evaluate(args: Any) -> dict[str, Any]:
    hardware = resolve_hardware(args.accelerator, args.devices, args.precision)
    run_dir = require_run_dir(args.ckpt) if args.log_to_run else None
    check_data_dir(args.data_dir, download=True)
    contents = load_checkpoint(args.ckpt, expected_model=args.model)
    # A flag wins; otherwise the checkpoint is evaluated as its own run evaluated it.
    tta = args.tta or contents.hparams.get("tta", "none")
    channels_last = use_channels_last(args.channels_last, hardware)
    datamodule = CIFAR10DataModule(
        data_dir=args.data_dir,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.workers,
        cache_dir=args.cache_dir,
        download=True,
        data_path=args.data_path,
        channels_last=channels_last,
    )
    backbone = build_backbone(contents, num_classes=datamodule.num_classes)
    module = ImageClassifier(
        prepare_backbone(backbone, channels_last=channels_last, compile=False),
        model_name=contents.model_name,
        num_classes=contents.num_classes,
        model_options=contents.model_options,
        class_names=datamodule.classes,
        tta=tta,
    )
    dashboards = [run_dashboards(run_dir, contents, datamodule.classes)] if run_dir else []
    quiet_lightning()
    # One device: a distributed sampler would pad the test set with repeated images.
    devices = 1 if hardware.devices in ("auto", -1) else hardware.devices
    trainer = L.Trainer(
        accelerator=hardware.accelerator,
        devices=devices,
        precision=hardware.precision,
        logger=False,
        callbacks=[RichProgressBar(), *dashboards],
    )
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    per_class_prefix = "acc_per_class/test/"
    return {
        "checkpoint": str(args.ckpt),
        "model": contents.model_name,
        "checkpoint_kind": contents.kind,
        "tta": tta,
        "data": describe_source(args.data_dir),
        "images": len(datamodule.test_set),
        "accuracy": metrics["acc/test"],
        "top5_accuracy": metrics["acc_top5/test"],
        "loss": metrics["loss/test"],
        "per_class_accuracy": {
            key.removeprefix(per_class_prefix): value for key, value in metrics.items() if key.startswith(per_class_prefix)
        },
        "logged_to_run": str(run_dir) if run_dir else None,
    }


def print_results(results: dict[str, Any]) -> None:
    title = f"{results['model']} on {results['images']:,} test images"
    table = Table(title=title, min_width=len(title))
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, accuracy in results["per_class_accuracy"].items():
        table.add_row(name, f"{100 * accuracy:.2f} %")
    table.add_section()
    table.add_row("all (top-1)", f"{100 * results['accuracy']:.2f} %", style="bold")
    table.add_row("all (top-5)", f"{100 * results['top5_accuracy']:.2f} %")
    console = Console()
    console.print(table)
    # soft_wrap: a path cut over two lines cannot be copied back into a command.
    console.print(f"checkpoint: {results['checkpoint']} ({results['checkpoint_kind']}), test-time augmentation: {results['tta']}", soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = evaluate(args)
    print_results(results)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")
    if results["logged_to_run"]:
        print(f"added to the run's dashboards: tensorboard --logdir {results['logged_to_run']}")
    return 0


if __name__ == "__main__":
    run_main(main)
