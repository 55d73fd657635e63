"""Evaluate a checkpoint (ours, a course state dict or an exported .safetensors) on the CIFAR-10 test set.

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

from rich.table import Table

from base.files import atomic_write_text
from cli.flags import EVAL_DATA, HARDWARE, Parser, add_options, one_line_errors, program, wide_console
from run.loggers import dashboards_hint
from run.preflight import check_test


def build_parser() -> Parser:
    parser = Parser(prog=program("test.py"), description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    parser.add_argument(
        "--ckpt",
        required=True,
        default=None,
        help="a .ckpt written by train.py, a course state dict (torch.save), or a .safetensors written by export.py",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--log-to-run",
        action="store_true",
        help="also add the test metrics, confusion matrix and misclassified images to the dashboards of the "
        "train.py run that --ckpt belongs to (runs/<model>/version_N/checkpoints/), through the loggers its "
        "config.yaml records (tensorboard, csv, mlflow; tensorboard for runs that record none)",
    )
    add_options(
        parser,
        ("model", "tta", "limit_test_batches", *EVAL_DATA, *HARDWARE),
        help={
            "model": "expected network (default: read from the checkpoint)",
            "tta": "test-time augmentation; flip: mean logits of each image and its mirror; flip-translate: also of "
            "both moved a pixel up-left and down-right (default: what the "
            "checkpoint's training run validated and tested with, as train.py reported it; none for course state dicts)",
            "limit_test_batches": "quick check: test on only this many batches (int) or fraction",
        },
    )
    return parser


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
    with one_line_errors(argv):
        args = vars(build_parser().parse_args(argv))
        values = check_test(args)
        # torch and Lightning load only now: --help and a mistaken flag answer at once.
        from run.evaluate import evaluate

        results = evaluate(args, values)
        print_results(results)
        if "json" in args:
            atomic_write_text(Path(args["json"]), json.dumps(results, indent=2) + "\n")
            print(f"results written to {args['json']}")
        if results["logged_to_run"]:
            print(f"added to the run's dashboards: {dashboards_hint(Path(results['logged_to_run']), results['run_loggers'])}")
        return 0
