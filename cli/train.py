"""Train VGG16 or ResNet50 on CIFAR-10 (the course recipe by default), then test the best checkpoint.

    python train.py --model vgg16 --accelerator gpu
    python train.py --config configs/resnet50.yaml --epochs 30 --data-dir ~/data/cifar10-jpeg.tar.gz
    python train.py --resume last

train.py's flags, turned (with ``--config``) into one resolved ``RunConfig``, and its ``main``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cli.config_file import parse_config_file
from cli.flags import (
    Parser,
    add_data_args,
    add_hardware_args,
    batch_limit,
    non_negative_float,
    non_negative_int,
    open_fraction,
    learning_rate,
    logger_list,
    positive_float,
    positive_int,
    unit_fraction,
)
from base.options import MODEL_NAMES, OPTIMIZERS, REQUEUE_SIGNALS, SCHEDULERS, STRATEGIES, TTA_MODES
from run.config import RunConfig
from run.history import RunFinished
from run.paths import check_input_name
from run.resolve import resolve_run_config


def build_train_parser(prog: str | None = None, description: str | None = None) -> Parser:
    parser = Parser(
        prog=prog,
        description=description or __doc__.splitlines()[0],
        argument_default=argparse.SUPPRESS,
        epilog="Flags typed on the command line override --config.",
    )
    parser.add_argument("--config", help="YAML file of option defaults, e.g. configs/vgg16.yaml")

    group = parser.add_argument_group("model and recipe (defaults: the course's)")
    group.add_argument("--model", choices=MODEL_NAMES, help="network")
    group.add_argument(
        "--identity-shortcut",
        action=argparse.BooleanOptionalAction,
        help="resnet50: identity shortcut where shapes match, instead of the course's projection everywhere",
    )
    group.add_argument("--epochs", type=positive_int, help="default: 250 for vgg16, 285 for resnet50")
    group.add_argument(
        "--batch-size", type=positive_int, help="per device: each step trains on batch x devices x nodes"
    )
    group.add_argument(
        "--lr", type=learning_rate, help="learning rate (peak for onecycle), or find: run the range test first and use its suggestion"
    )
    group.add_argument(
        "--find-lr",
        action="store_true",
        help="only run the learning-rate range test (Lightning's lr_find) on this model, data and optimiser: "
        "prints the suggested rate and saves the plot, then exits",
    )
    group.add_argument("--optimizer", choices=OPTIMIZERS, help="optimiser")
    group.add_argument("--momentum", type=unit_fraction, help="sgd only")
    group.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="sgd only")
    group.add_argument("--weight-decay", type=non_negative_float, help="L2 penalty (decoupled for adamw)")
    group.add_argument("--scheduler", choices=SCHEDULERS, help="step: per epoch; cosine, onecycle: per step")
    group.add_argument("--step-size", type=positive_int, help="step scheduler: epochs between decays")
    group.add_argument("--gamma", type=positive_float, help="step scheduler: decay factor")
    group.add_argument("--label-smoothing", type=unit_fraction, help="cross-entropy label smoothing")
    group.add_argument(
        "--ema-decay",
        type=open_fraction,
        metavar="DECAY",
        help="keep an exponential moving average of the weights, updated every step with decay min(DECAY, "
        "(1 + n) / (10 + n)) after n updates (e.g. 0.998); validation, the saved checkpoints and the final test "
        "use the averaged weights (default: off)",
    )
    group.add_argument(
        "--tta",
        choices=TTA_MODES,
        help="test-time augmentation of validation and test; flip: mean logits of each image and its mirror. "
        "Saved in the checkpoints, where test.py takes it from unless given its own --tta",
    )

    add_data_args(parser)
    group = parser.add_argument_group("data split")
    group.add_argument("--val-size", type=positive_int, help="training images held out for validation")
    group.add_argument("--train-limit", type=positive_int, help="train on only the first N images")

    add_hardware_args(parser)
    parser.add_argument_group("speed").add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the network; the first steps (and the first evaluation) are spent compiling",
    )
    group = parser.add_argument_group("scale-out")
    group.add_argument("--num-nodes", type=positive_int, help="machines, for multi-node DDP")
    group.add_argument("--strategy", choices=STRATEGIES, help="Lightning strategy: auto picks DDP for several devices")

    group = parser.add_argument_group("run and checkpoints")
    group.add_argument("--output-dir", help="runs go to OUTPUT_DIR/MODEL/RUN_NAME")
    group.add_argument(
        "--run-name",
        help="the run's folder name (default: the next free version_N); with --resume last, continue this run "
        "if it has a checkpoint, else start it: one command for a job's first start and its requeues",
    )
    group.add_argument("--seed", type=non_negative_int, help="seeds weights, split, shuffling, augmentation")
    group.add_argument("--resume", metavar="PATH|last", help="continue a run: its folder, a checkpoint in it, or last (the newest run, or --run-name's)")
    group.add_argument(
        "--rewind",
        action="store_true",
        help="with --resume of a checkpoint older than the run's latest (best.ckpt, epochNNN.ckpt): go back to it and "
        "train on from there; the later checkpoints are moved into RUN/rewound/ (without it such a resume is refused)",
    )
    group.add_argument("--weights", metavar="PATH", help="start from these weights (course state dict or .ckpt)")
    group.add_argument("--checkpoint-every", type=positive_int, help="keep a checkpoint every N epochs")
    group.add_argument("--results-json", metavar="PATH", help="also write the run's test results and timings as JSON")
    group.add_argument(
        "--time-to-accuracy",
        type=open_fraction,
        metavar="ACC",
        help="benchmark only: evaluate the TEST set after every epoch and record, in --results-json, the training "
        "time at which its accuracy first reaches ACC (e.g. 0.93); model selection still uses validation only",
    )
    group.add_argument("--log-every-n-steps", type=positive_int, help="training curves' resolution")
    group.add_argument(
        "--logger", type=logger_list, metavar="NAMES", help="where curves and pictures go: tensorboard, csv, mlflow, comma-separated"
    )
    group.add_argument(
        "--requeue-signal",
        choices=REQUEUE_SIGNALS,
        help="also save last.ckpt and exit 143 on this signal, as on SIGTERM (e.g. SLURM --signal=USR1@90)",
    )

    group = parser.add_argument_group("quick runs (Lightning's limits)")
    group.add_argument("--fast-dev-run", type=non_negative_int, help="run N batches of each stage, no output")
    group.add_argument("--limit-train-batches", type=batch_limit, help="batches (int) or fraction per epoch")
    group.add_argument("--limit-val-batches", type=batch_limit, help="as --limit-train-batches")
    group.add_argument("--limit-test-batches", type=batch_limit, help="as --limit-train-batches")
    return parser


def parse_run_config(argv: Sequence[str], prog: str | None = None, description: str | None = None) -> RunConfig:
    """Flags win over ``--config``, which wins over a resumed run's saved options, then the defaults."""
    parser = build_train_parser(prog, description)
    typed = vars(parser.parse_args(list(argv)))
    if "config" in typed:
        check_input_name(Path(typed["config"]), "--config")
    config_file = parse_config_file(parser, typed["config"]) if "config" in typed else {}
    return resolve_run_config(config_file, typed)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_run_config(argv)
    except RunFinished as finished:
        print(finished)
        return 0
    from run.training import find_lr_only, summary_lines, train

    if config.find_lr:
        find_lr_only(config)
        return 0
    outcome = train(config, argv)
    if outcome.is_global_zero:
        lines = summary_lines(outcome)
        width = max(len(label) for label, _ in lines)
        print("\n".join(f"{label:<{width}}  {value}" for label, value in lines))
    return 1 if outcome.test_error else 0
