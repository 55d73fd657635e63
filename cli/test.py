"""Evaluate a checkpoint (ours or a course state dict) on the CIFAR-10 test set.

    python test.py --ckpt runs/vgg16/version_0/checkpoints/best.ckpt
    python test.py --ckpt vgg16_epoch250.ckpt --data-dir ~/data/cifar10-jpeg.tar.gz --json result.json

A checkpoint of a train.py run is tested on that run's data unless --data-dir says otherwise.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from rich.table import Table

from base.files import atomic_write_text
from cli.flags import Parser, add_data_args, add_hardware_args, batch_limit, wide_console
from datamodules import check_data_dir, describe_source
from lit_modules import TTA_MODES, ImageClassifier
from models import MODEL_NAMES
from run.build import build_datamodule, build_trainer
from run.checkpoints import build_backbone, load_checkpoint
from run.config import build_config, merge
from run.folder import CONFIG_NAME, read_config, require_run_dir, run_dashboards, run_dir_of
from run.hardware import prepare_backbone


def build_parser() -> Parser:
    parser = Parser(prog="test.py", description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    parser.add_argument("--ckpt", required=True, default=None, help="a .ckpt written by train.py, or a course state dict")
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
    parser.add_argument(
        "--limit-test-batches", type=batch_limit, help="quick check: test on only this many batches (int) or fraction"
    )
    add_data_args(parser)
    add_hardware_args(parser)
    return parser


SHARED_OPTIONS = ("data_dir", "eval_batch_size", "data_path", "workers", "cache_dir", "accelerator", "devices",
                  "precision", "channels_last", "limit_test_batches")


def data_of_run(checkpoint: str) -> dict[str, Any]:
    """``{"data_dir": ...}`` of the train.py run that wrote ``checkpoint``, if it is in a run folder."""
    run = run_dir_of(Path(checkpoint)) if Path(checkpoint).is_file() else None
    saved = read_config(run / CONFIG_NAME).get("data_dir") if run else None
    return {"data_dir": saved} if saved else {}


def evaluate(args: dict[str, Any]) -> dict[str, Any]:
    shared = {name: args[name] for name in SHARED_OPTIONS if name in args}
    # One device unless asked: a distributed sampler would pad the test set with repeated images.
    config = build_config(merge({"devices": 1}, data_of_run(args["ckpt"]), shared))
    run_dir = require_run_dir(args["ckpt"]) if args.get("log_to_run") else None
    check_data_dir(config.data_dir, download=True)
    contents = load_checkpoint(args["ckpt"], expected_model=args.get("model"))
    # A flag wins; otherwise the checkpoint is evaluated as its own run evaluated it.
    tta = args.get("tta") or contents.hparams.get("tta", "none")
    datamodule = build_datamodule(config)
    backbone = build_backbone(contents, num_classes=datamodule.num_classes)
    module = ImageClassifier(
        contents.model_name,
        backbone=prepare_backbone(backbone, channels_last=config.channels_last, compile=False),
        num_classes=contents.num_classes,
        model_options=contents.model_options,
        class_names=datamodule.classes,
        tta=tta,
    )
    dashboards = [run_dashboards(run_dir, contents, datamodule.classes)] if run_dir else []
    trainer = build_trainer(config, logger=False, callbacks=[RichProgressBar(), *dashboards])
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    per_class_prefix = "acc_per_class/test/"
    return {
        "checkpoint": str(args["ckpt"]),
        "model": contents.model_name,
        "checkpoint_kind": contents.kind,
        "tta": tta,
        "data": describe_source(config.data_dir),
        "images": int(metrics["images/test"]),
        "test_set_images": len(datamodule.test_set),
        "accuracy": metrics["acc/test"],
        "top5_accuracy": metrics["acc_top5/test"],
        "loss": metrics["loss/test"],
        "per_class_accuracy": {
            key.removeprefix(per_class_prefix): value for key, value in metrics.items() if key.startswith(per_class_prefix)
        },
        "logged_to_run": str(run_dir) if run_dir else None,
    }


def print_results(results: dict[str, Any]) -> None:
    limited = f" (of {results['test_set_images']:,}, --limit-test-batches)" if results["images"] < results["test_set_images"] else ""
    title = f"{results['model']} on {results['images']:,} test images{limited}"
    table = Table(title=title, min_width=len(title))
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, accuracy in results["per_class_accuracy"].items():
        table.add_row(name, f"{100 * accuracy:.2f} %")
    table.add_section()
    table.add_row("all (top-1)", f"{100 * results['accuracy']:.2f} %", style="bold")
    table.add_row("all (top-5)", f"{100 * results['top5_accuracy']:.2f} %")
    console = wide_console()
    console.print(table)
    # soft_wrap: a path cut over two lines cannot be copied back into a command.
    console.print(
        f"checkpoint: {results['checkpoint']} ({results['checkpoint_kind']}), test-time augmentation: {results['tta']}, "
        f"data: {results['data']}",
        soft_wrap=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    results = evaluate(args)
    print_results(results)
    if "json" in args:
        atomic_write_text(Path(args["json"]), json.dumps(results, indent=2) + "\n")
        print(f"results written to {args['json']}")
    if results["logged_to_run"]:
        print(f"added to the run's dashboards: tensorboard --logdir {results['logged_to_run']}")
    return 0
