#!/usr/bin/env python
"""Train VGG16 or ResNet50 on CIFAR-10 (the course recipe by default), then test the best checkpoint.

    python train.py --model vgg16 --accelerator gpu
    python train.py --config configs/resnet50.yaml --epochs 30 --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python train.py --resume last
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor

from common.checkpoints import build_backbone, load_checkpoint
from common.cli import (
    Parser,
    add_data_args,
    add_hardware_args,
    batch_limit,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    quiet_lightning,
    resolve_hardware,
    run_main,
)
from common.config import config_to_argv, read_config, write_config
from common.run_report import run_results, write_results_json
from common.runs import CONFIG_NAME, log_final_hparams, run_dir_of, run_logger
from common.speed import prepare_backbone, use_channels_last
from common.errors import UserError
from datamodules import CIFAR10DataModule, check_data_dir, describe_source
from lit_modules import OPTIMIZERS, SCHEDULERS, TTA_MODES, ImageClassifier
from lit_modules.callbacks import NamedCheckpoint
from lit_modules.dashboards import Dashboards
from lit_modules.progress import EpochLines, ThrottledProgressBar
from lit_modules.recipes import TimeToAccuracy, recipe_callbacks
from lit_modules.reliability import (
    REQUEUE_SIGNALS,
    AtomicCheckpointIO,
    FiniteLossGuard,
    PreemptionCheckpoint,
    ResumableRNG,
)
from models import MODEL_NAMES, build_model

DEFAULT_MODEL = "vgg16"
# The course trained VGG16 for 250 epochs and ResNet50 for 285; that is the default run length.
COURSE_EPOCHS = {"vgg16": 250, "vgg16_bn": 250, "resnet50": 285}
# Options that belong to one invocation, not to the recipe a resumed run should continue with.
RUN_SPECIFIC = ("resume", "weights")
RUN_VERSION_ENV = "CIFAR10_LIGHTNING_RUN_VERSION"


def build_parser() -> Parser:
    parser = Parser(description=__doc__.splitlines()[0], epilog="Flags typed on the command line override --config.")
    parser.add_argument("--config", help="YAML file of option defaults, e.g. configs/vgg16.yaml")

    group = parser.add_argument_group("model and recipe (defaults: the course's)")
    group.add_argument("--model", choices=MODEL_NAMES, default=None, help=f"network (default: {DEFAULT_MODEL})")
    group.add_argument(
        "--identity-shortcut",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="resnet50: identity shortcut where shapes match, instead of the course's projection everywhere",
    )
    group.add_argument("--epochs", type=positive_int, default=None, help="default: 250 for vgg16, 285 for resnet50")
    group.add_argument(
        "--batch-size", type=positive_int, default=100, help="per device: each step trains on batch x devices x nodes"
    )
    group.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (peak for onecycle)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="optimiser")
    group.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    group.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="sgd only")
    group.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty (decoupled for adamw)")
    group.add_argument("--scheduler", choices=SCHEDULERS, default="step", help="step: per epoch; cosine, onecycle: per step")
    group.add_argument("--step-size", type=positive_int, default=20, help="step scheduler: epochs between decays")
    group.add_argument("--gamma", type=positive_float, default=1 / 3, help="step scheduler: decay factor")
    group.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    group.add_argument(
        "--ema-decay",
        type=open_fraction,
        metavar="DECAY",
        default=None,
        help="keep an exponential moving average of the weights, updated every step with decay min(DECAY, "
        "(1 + n) / (10 + n)) after n updates (e.g. 0.998); validation, the saved checkpoints and the final test "
        "use the averaged weights (default: off)",
    )
    group.add_argument(
        "--tta",
        choices=TTA_MODES,
        default="none",
        help="test-time augmentation of validation and test; flip: mean logits of each image and its mirror. "
        "Saved in the checkpoints, where test.py takes it from unless given its own --tta",
    )

    add_data_args(parser)
    group = parser.add_argument_group("data split")
    group.add_argument("--val-size", type=positive_int, default=5000, help="training images held out for validation")
    group.add_argument("--train-limit", type=positive_int, default=None, help="train on only the first N images")

    add_hardware_args(parser)
    parser.add_argument_group("speed").add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the network; the first steps (and the first evaluation) are spent compiling",
    )
    group = parser.add_argument_group("scale-out")
    group.add_argument("--num-nodes", type=positive_int, default=1, help="machines, for multi-node DDP")
    group.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")

    group = parser.add_argument_group("run and checkpoints")
    group.add_argument("--output-dir", default="runs", help="runs go to OUTPUT_DIR/MODEL/version_N")
    group.add_argument("--seed", type=non_negative_int, default=0, help="seeds weights, split, shuffling, augmentation")
    group.add_argument("--resume", metavar="PATH|last", help="continue a run from a checkpoint; last: newest run")
    group.add_argument("--weights", metavar="PATH", help="start from these weights (course state dict or .ckpt)")
    group.add_argument("--checkpoint-every", type=positive_int, default=20, help="keep a checkpoint every N epochs")
    group.add_argument("--results-json", metavar="PATH", help="also write the run's test results and timings as JSON")
    group.add_argument(
        "--time-to-accuracy",
        type=open_fraction,
        metavar="ACC",
        default=None,
        help="benchmark only: evaluate the TEST set after every epoch and record, in --results-json, the training "
        "time at which its accuracy first reaches ACC (e.g. 0.93); model selection still uses validation only",
    )
    group.add_argument("--log-every-n-steps", type=positive_int, default=50, help="training curves' resolution")
    group.add_argument(
        "--requeue-signal",
        choices=REQUEUE_SIGNALS,
        default=None,
        help="also save last.ckpt and exit 143 on this signal, as on SIGTERM (e.g. SLURM --signal=USR1@90)",
    )

    group = parser.add_argument_group("quick runs (Lightning's limits)")
    group.add_argument("--fast-dev-run", type=non_negative_int, default=0, help="run N batches of each stage, no output")
    group.add_argument("--limit-train-batches", type=batch_limit, default=None, help="batches (int) or fraction per epoch")
    group.add_argument("--limit-val-batches", type=batch_limit, default=None, help="as --limit-train-batches")
    group.add_argument("--limit-test-batches", type=batch_limit, default=None, help="as --limit-train-batches")
    return parser


def resolve_resume(resume: str | None, output_dir: Path, model: str | None) -> Path | None:
    """The checkpoint that --resume names; ``last`` is the newest last.ckpt under the output folder."""
    if resume is None:
        return None
    if resume != "last":
        return Path(resume)
    found = sorted(output_dir.glob(f"{model or '*'}/*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        runs = f"{model} runs" if model else "runs"
        raise UserError(
            f"--resume last: no {runs} with a checkpoints/last.ckpt under {output_dir}/; "
            "start without --resume, or pass a checkpoint path"
        )
    return found[-1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags win over --config, which wins over a resumed run's saved config, then built-in defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    defaults: list[str] = []
    if first.resume:
        run = run_dir_of(resolve_resume(first.resume, Path(first.output_dir), first.model))
        if run is not None:
            saved = {k: v for k, v in read_config(run / CONFIG_NAME).items() if k not in RUN_SPECIFIC}
            defaults += _validated_argv(parser, saved, str(run / CONFIG_NAME))
    if first.config:
        defaults += _validated_argv(parser, read_config(first.config), first.config)
    return parser.parse_args(defaults + argv)


def _validated_argv(parser: Parser, config: dict[str, Any], source: str) -> list[str]:
    argv = config_to_argv(config, parser, source)
    parser.error_source = source
    parser.parse_args(argv)  # a bad value is reported against the file it came from
    parser.error_source = None
    return argv


def check_schedule_length(args: argparse.Namespace, resume: Path) -> None:
    """Refuse to resume a per-step schedule with another run length than it was built for.

    One-cycle and cosine schedules are sized from the epoch count when a run starts, and their
    state comes back with the checkpoint: more epochs would step one-cycle past its end (a
    PyTorch error) and run cosine on a wrong curve, fewer would cut it short.
    """
    run = run_dir_of(resume)
    if args.scheduler not in ("onecycle", "cosine") or run is None or not (run / CONFIG_NAME).exists():
        return
    planned = read_config(run / CONFIG_NAME).get("epochs")
    if planned is not None and planned != args.epochs:
        raise UserError(
            f"--epochs {args.epochs}: this run's {args.scheduler} schedule was built for {planned} epochs and "
            f"cannot be stretched; resume with --epochs {planned}, or start a new run from it with --weights {resume}"
        )


def next_version(run_root: Path) -> str:
    taken = [int(p.name.split("_")[1]) for p in run_root.glob("version_*") if p.name.split("_")[1].isdigit()]
    return f"version_{max(taken, default=-1) + 1}"


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    hardware = resolve_hardware(args.accelerator, args.devices, args.precision)
    channels_last = use_channels_last(args.channels_last, hardware)
    check_data_dir(args.data_dir, download=True)
    output_dir = Path(args.output_dir)
    resume = resolve_resume(args.resume, output_dir, args.model)

    # The architecture comes from the checkpoint being resumed or started from, when there is one.
    start = load_checkpoint(resume or args.weights, expected_model=args.model) if (resume or args.weights) else None
    model_name = start.model_name if start else (args.model or DEFAULT_MODEL)
    model_options = start.model_options if start else ({"identity_shortcut": True} if args.identity_shortcut else {})
    if args.identity_shortcut and model_name != "resnet50":
        raise UserError("--identity-shortcut applies to resnet50 only")
    args.model = model_name
    args.epochs = args.epochs or COURSE_EPOCHS[model_name]
    if resume:
        check_schedule_length(args, resume)

    quiet_lightning()
    L.seed_everything(args.seed, workers=True, verbose=False)
    datamodule = CIFAR10DataModule(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        val_size=args.val_size,
        num_workers=args.workers,
        seed=args.seed,
        train_limit=args.train_limit,
        cache_dir=args.cache_dir,
        download=True,
        data_path=args.data_path,
        channels_last=channels_last,
    )
    datamodule.prepare_data()  # a failed download must not leave an empty run folder behind
    if args.weights and not resume:
        backbone = build_backbone(start, num_classes=datamodule.num_classes)
    else:
        backbone = build_model(model_name, datamodule.num_classes, **model_options)
    backbone = prepare_backbone(backbone, channels_last=channels_last, compile=args.compile)
    module = ImageClassifier(
        backbone,
        model_name=model_name,
        num_classes=datamodule.num_classes,
        model_options=model_options,
        class_names=datamodule.classes,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
        step_size=args.step_size,
        gamma=args.gamma,
        label_smoothing=args.label_smoothing,
        tta=args.tta,
    )

    # A resumed run keeps writing into its own folder, so its curves continue where they stopped.
    resumed_run = run_dir_of(resume) if resume else None
    if resumed_run is not None:
        version = resumed_run.name
        logger = run_logger(resumed_run)
    else:
        # DDP workers re-run this script after rank 0 created the folder: they inherit its name.
        version = os.environ.get(RUN_VERSION_ENV) or next_version(output_dir / model_name)
        logger = run_logger(output_dir / model_name / version)
    run_dir = Path(logger.log_dir)
    checkpoint_dir = run_dir / "checkpoints"
    best = NamedCheckpoint(
        dirpath=checkpoint_dir,
        filename="best",
        monitor="acc/val",
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # Its own callback rather than save_last=True: Lightning 2.6 refreshes save_last only in
    # epochs where the monitored checkpoint was also saved, and resuming needs every epoch.
    latest = NamedCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, enable_version_counter=False)
    periodic = NamedCheckpoint(
        dirpath=checkpoint_dir,
        filename="epoch{epoch:03d}",
        every_n_epochs=args.checkpoint_every,
        save_top_k=-1,
        auto_insert_metric_name=False,
    )
    # Fast recipes (lit_modules/recipes.py): EMA of the weights, time-to-accuracy benchmark.
    extras = recipe_callbacks(args.ema_decay, args.time_to_accuracy)
    trainer = L.Trainer(
        accelerator=hardware.accelerator,
        devices=hardware.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=hardware.precision,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[
            best,
            latest,
            periodic,
            LearningRateMonitor(),
            # Confusion matrices, per-class validation accuracy, misclassified test images.
            Dashboards(datamodule.classes),
            ThrottledProgressBar(),
            EpochLines(),
            # Reliability (lit_modules/reliability.py): stop on a NaN loss, save on SIGTERM, exact resume.
            FiniteLossGuard(),
            PreemptionCheckpoint(checkpoint_dir / "last.ckpt", requeue_signal=args.requeue_signal),
            ResumableRNG(),
            *extras,
        ],
        plugins=[AtomicCheckpointIO()],
        fast_dev_run=args.fast_dev_run,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        limit_test_batches=args.limit_test_batches,
        log_every_n_steps=args.log_every_n_steps,
        benchmark=hardware.accelerator == "gpu",
    )
    resolved = {k: v for k, v in vars(args).items() if k != "config"}
    resolved.update(accelerator=hardware.accelerator, precision=hardware.precision, resume=str(resume) if resume else None)
    if trainer.is_global_zero and not args.fast_dev_run:
        write_config(resolved, run_dir / (CONFIG_NAME if resumed_run is None else "config.resumed.yaml"))
        print(f"run folder: {run_dir}  (tensorboard --logdir {run_dir})")

    os.environ[RUN_VERSION_ENV] = version
    fit_started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    finally:
        os.environ.pop(RUN_VERSION_ENV, None)
    # Read before testing: trainer.test restores the callbacks' state from the tested checkpoint.
    outcome = {
        "best": best.best_model_path or None,
        "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
        "last": latest.best_model_path or None,
    }
    epochs_trained, test_started = trainer.current_epoch, time.perf_counter()
    results = trainer.test(module, datamodule=datamodule, ckpt_path=outcome["best"], weights_only=True, verbose=False)
    if trainer.is_global_zero and outcome["best"]:
        # Lightning counts epochs from 0 (epoch000.ckpt holds the first); people count from 1.
        outcome["best_epoch"] = load_checkpoint(outcome["best"]).epoch + 1
        tested = results[0] if results else {}
        final = {
            "hp/best_val_acc": outcome["best_score"],
            "hp/best_epoch": outcome["best_epoch"],
            "hp/test_acc": tested.get("acc/test"),
            "hp/test_loss": tested.get("loss/test"),
        }
        log_final_hparams(logger, resolved, final, step=trainer.global_step)
    if trainer.is_global_zero:
        print_summary(args, run_dir, outcome, results[0] if results else {}, describe_source(args.data_dir))
    if trainer.is_global_zero and args.results_json:
        finished = time.perf_counter()
        clock = next((callback for callback in extras if isinstance(callback, TimeToAccuracy)), None)
        report = run_results(
            args=vars(args),
            hardware={"accelerator": hardware.accelerator, "precision": hardware.precision, "devices": trainer.world_size},
            outcome=outcome,
            test_metrics=results[0] if results else {},
            epochs_trained=epochs_trained,
            seconds={
                "setup": fit_started - started,
                "fit": test_started - fit_started,
                "test": finished - test_started,
                "total": finished - started,
            },
            time_to_accuracy=clock.report() if clock else None,
            data=describe_source(args.data_dir),
            argv=list(sys.argv[1:] if argv is None else argv),
        )
        write_results_json(args.results_json, report)
        print(f"results written to {args.results_json}")
    return 0


def print_summary(
    args: argparse.Namespace, run_dir: Path, outcome: dict[str, Any], results: dict[str, float], data: str
) -> None:
    lines = [("test accuracy", f"{100 * results['acc/test']:.2f} % on {data}" if "acc/test" in results else "n/a")]
    if outcome["best"]:
        score = f", acc/val {100 * outcome['best_score']:.2f} %" if outcome["best_score"] is not None else ""
        lines += [
            ("best epoch", f"{outcome['best_epoch']} of {args.epochs} (counting from 1){score}"),
            ("best checkpoint", f"{outcome['best']}{score}"),
            ("last checkpoint", outcome["last"]),
            ("config", str(run_dir / CONFIG_NAME)),
            ("dashboards", f"tensorboard --logdir {run_dir}"),
            ("test again", f"python test.py --ckpt {outcome['best']} --data-dir {args.data_dir}"),
        ]
    else:
        lines.append(("checkpoints", "none written (--fast-dev-run)"))
    width = max(len(label) for label, _ in lines)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in lines))


if __name__ == "__main__":
    run_main(main)
