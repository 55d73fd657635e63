"""Classify image files with a checkpoint: the predicted CIFAR-10 class and the top-k probabilities.

    python predict.py --ckpt runs/vgg16/version_0/checkpoints/best.ckpt photo.jpg holiday/
    python predict.py --ckpt vgg16_epoch250.ckpt --top-k 5 --json pictures/ > predictions.jsonl

Any size and colour mode is accepted: each picture is centre-cropped to a square and resized to
32x32 (see run/inference.py for why). Folders are searched recursively, through symbolic links.
A checkpoint trained with --tta flip (or flip-translate) predicts with it (the mean logits of each picture and its
mirror), as its run measured its accuracy, unless --tta none says otherwise. An image that cannot
be decoded is skipped with a warning on stderr and the exit code is 1; the others are still
classified. A missing path, a folder without images or a bad checkpoint stop at once (exit 2).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from base.errors import UserError
from base.files import printable
from base.schema import IMAGE_SUFFIXES, positive_int
from cli.flags import Parser, add_options, closest, one_line_errors, program, wide_console
from models.catalog import entry
from run.paths import left_out_files
from run.preflight import check_predict

PROG = program("predict.py")
# The top-k shown when --top-k is not given; a checkpoint of fewer classes shows them all: a default
# never refuses a checkpoint (one of two classes).
DEFAULT_TOP_K = 3
# How many left-out file names the warning shows.
_SHOWN = 5


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders of images")
    parser.add_argument(
        "--ckpt", required=True, help="a .ckpt written by train.py, a course state dict, or an exported .safetensors"
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=None,
        help=f"how many of the most probable classes to show (default: {DEFAULT_TOP_K}, or all the classes of a "
        "checkpoint that has fewer)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per image (JSON Lines) instead of a table"
    )
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images decoded and classified at once")
    parser.add_argument(
        "--explain",
        metavar="OUT_DIR",
        type=Path,
        help="also write, per image, OUT_DIR/NAME.gradcam.png: the picture beside its Grad-CAM heat map "
        "(where the network found the evidence for the predicted class), at the picture's size",
    )
    parser.add_argument("--explain-class", metavar="NAME", help="with --explain: explain this class instead of the prediction")
    add_options(
        parser,
        ("tta", "accelerator"),
        help={"tta": "test-time augmentation; flip: mean logits of each image and its mirror; flip-translate: also of "
              "both moved a pixel up-left and down-right (default: what the "
              "checkpoint's training run validated and tested with, as test.py does; none for course state dicts)"},
        defaults={"tta": None},
    )
    return parser


def prediction_record(path: Path, probabilities: list[float], classes: list[int], names: list[str]) -> dict[str, Any]:
    """What is printed for one image; ``probabilities`` and ``classes`` are its top-k, best first."""
    return {
        "file": printable(path),
        "class": names[classes[0]],
        "probability": round(probabilities[0], 6),
        "top_k": [{"class": names[c], "probability": round(p, 6)} for c, p in zip(classes, probabilities)],
    }


def print_table(records: list[dict[str, Any]], title: str, top_k: int) -> None:
    table = Table(title=title, min_width=len(title))  # a title cut over two lines cuts the path in it
    table.add_column("file", overflow="fold")
    table.add_column("class")
    table.add_column("probability", justify="right")
    if top_k > 1:
        table.add_column(f"top {top_k}")
    for record in records:
        row = [printable(record["file"]), record["class"], f"{100 * record['probability']:.1f} %"]
        if top_k > 1:
            row.append(", ".join(f"{t['class']} {100 * t['probability']:.1f} %" for t in record["top_k"]))
        table.add_row(*row)
    wide_console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    with one_line_errors(argv):
        args = build_parser().parse_args(argv)
        paths = check_predict(args)
        left_out = left_out_files(args.inputs)
        if left_out:
            # Every file of a folder is classified or named: a photo.heic is not silently passed over.
            shown = ", ".join(printable(path) for path in left_out[:_SHOWN]) + (", ..." if len(left_out) > _SHOWN else "")
            print(f"{PROG}: warning: left out {len(left_out)} file(s) of the folders not named like images "
                  f"({', '.join(IMAGE_SUFFIXES)}): {shown}; name a file on the command line to classify it anyway",
                  file=sys.stderr)
        # torch loads only now: --help and a mistaken flag answer at once.
        from models.explain import cam_layer
        from run.checkpoints import build_backbone, checkpoint_dataset
        from run.checkpoints import load_any_checkpoint
        from run.inference import (
            checkpoint_tta,
            explain_images,
            inference_device,
            load_images,
            predict_probabilities,
            with_tta,
        )

        device = inference_device(args.accelerator)
        contents = load_any_checkpoint(args.ckpt)
        cam_path = entry(contents.model_name).cam_layer
        if args.explain and cam_path is None:
            raise UserError(
                f"--explain: {contents.model_name} has no Grad-CAM layer (its models/catalog.py entry names no "
                "cam_layer); run without --explain"
            )
        if args.top_k is None:
            args.top_k = min(DEFAULT_TOP_K, contents.num_classes)
        elif args.top_k > contents.num_classes:
            raise UserError(
                f"--top-k {args.top_k}: {args.ckpt} has {contents.num_classes} classes; choose 1 to {contents.num_classes}"
            )
        # The classes and the normalisation of the data set the checkpoint was trained on.
        dataset = checkpoint_dataset(contents)
        names = list(dataset.classes)
        if args.explain_class is not None and args.explain_class not in names:
            hint = closest(args.explain_class, names, dashes=False)
            raise UserError(
                f"--explain-class {args.explain_class!r}: not a class of {printable(args.ckpt)}"
                + (f" (did you mean {hint}?)" if hint else "") + f"; choose one of {', '.join(names)}"
            )
        model = build_backbone(contents).to(device)
        # Scored as the run validated and tested it: a --tta flip checkpoint averages each image's
        # logits with its mirror's, unless --tta says otherwise. Grad-CAM explains the plain image.
        tta = args.tta or checkpoint_tta(contents)
        scorer = with_tta(model, tta)
        explained_layer = cam_layer(model, contents.model_name) if args.explain else None

        skipped: list[Exception] = []

        def skip(error: Exception) -> None:
            print(f"{PROG}: warning: {error}; skipped", file=sys.stderr)
            skipped.append(error)

        records: list[dict[str, Any]] = []
        for start in range(0, len(paths), args.batch_size):
            images, kept = load_images(paths[start : start + args.batch_size], on_unreadable=skip, dataset=dataset)
            if not kept:
                continue
            top = predict_probabilities(scorer, images, args.batch_size).topk(args.top_k, dim=1)
            explained = (
                explain_images(model, explained_layer, images, top.indices[:, 0], kept, args.explain, args.explain_class,
                               names)
                if args.explain
                else [None] * len(kept)
            )
            for path, probabilities, classes, picture in zip(kept, top.values.tolist(), top.indices.tolist(), explained):
                record = prediction_record(path, probabilities, classes, names)
                if picture is not None:
                    record["explanation"] = picture
                records.append(record)
                if args.json:
                    # One line per image as soon as its batch is done, so long runs can be piped and followed.
                    print(json.dumps(record), flush=True)
        if not records:
            raise UserError(f"none of the {len(paths)} image(s) could be read (see the warnings above)")
        if not args.json:
            title = f"{contents.model_name} ({contents.num_classes} classes) from {printable(args.ckpt)}, test-time augmentation: {tta}"
            print_table(records, title, args.top_k)
            if skipped:
                print(f"{len(records)} image(s) classified, {len(skipped)} skipped (unreadable)")
        if args.explain and not args.json:
            print(f"Grad-CAM pictures (layer {cam_path}) written to {printable(args.explain)}")
        return 1 if skipped else 0
