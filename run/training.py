"""``train(config)``: one training run from a resolved configuration, start to results.

Opens (or, on resume, continues) the run's folder, fits, tests the best checkpoint, and records
the run's options and results. train.py only parses flags into a ``RunConfig`` and prints what
this returns.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from lightning import LightningModule
from lightning.pytorch.utilities.exceptions import SIGTERMException

from base.errors import Interrupted, UserError, ctrl_c_raises
from base.slurm import DEFAULT_REQUEUE_SIGNAL, check_layout, process_rank, slurm_task
from callbacks.pictures import log_figure
from callbacks.checkpoints import PreemptionCheckpoint
from callbacks.resume import SameData, check_same_data, data_fingerprint
from datamodules import describe_source
from run.build import Assembly, build, build_data_and_module, console_kind
from run.checkpoints import load_checkpoint
from run.config import RunConfig, write_config
from run.runs.start import Resume, Start, plan_start
from run.runs.folder import (
    CONFIG_NAME,
    CONSOLE_ENV,
    RESUME_ENV,
    RESUMED_CONFIG_NAME,
    RUN_DIR_ENV,
    announce_run_dir,
    create_run_dir,
    discard_if_unfinished,
    handed_down,
    hold_run,
    join_run_dir,
    joins_run,
    withdraw_announcement,
)
from run.hardware import worker_failures_explained
from run.runs.history import check_resumed_data, record_final_test, rewind
from run.lr_find import MAX_LR, MIN_LR, STEPS, find_lr
from run.paths import existing_ancestor
from run.report import run_results, write_results_json
from run.loggers import build_loggers, check_loggers, dashboards_hint, log_final_hparams, remember_mlflow_run



@dataclass
class RunOutcome:
    """What a finished run reports: its folder, checkpoints, and test metrics (``acc/test``...)."""

    config: RunConfig
    run_dir: Path
    is_global_zero: bool
    best: str | None = None
    best_score: float | None = None
    best_epoch: int | None = None
    last: str | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    data: str = ""
    test_error: str | None = None  # the final test failed; the run's checkpoints are kept


# The share of the free disk above which the checkpoints a run will keep are announced before it starts.
DISK_HEADS_UP = 0.25


def check_outputs(config: RunConfig, module: LightningModule) -> None:
    """Refuse, before any heavy work, a disk too full for the checkpoints this run keeps, and say
    so on stderr when they will take more than ``DISK_HEADS_UP`` of the free space.

    Those are best, last and one every ``--checkpoint-every`` epochs, each with the optimiser's
    state, plus one temporary file while saving. (Whether the paths can be written at all was
    checked with the flags, by ``run.runs.resolve``.)
    """
    if config.fast_dev_run:
        return
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    copies = 1 + {"sgd": 1 if config.momentum else 0}.get(config.optimizer, 2) + (2 if config.ema_decay else 0)
    kept = 3 + config.epochs // config.checkpoint_every
    needed = weights * copies * kept
    free = shutil.disk_usage(existing_ancestor(config.output_dir)).free
    keeps = (f"this run keeps about {needed / 2**30:.1f} GiB of checkpoints ({kept} of {weights * copies / 2**20:.0f} "
             f"MiB: best, last, one every {config.checkpoint_every} epochs)")
    if free < needed:
        raise UserError(
            f"--output-dir {config.output_dir}: {free / 2**30:.1f} GiB free, and {keeps}; free space, "
            "choose another --output-dir, or keep fewer with a larger --checkpoint-every"
        )
    if needed > DISK_HEADS_UP * free and process_rank() == 0:
        # Before the run, not when the disk fills hours into it.
        print(f"heads-up: {keeps}, {100 * needed / free:.0f} % of the {free / 2**30:.1f} GiB free under "
              f"{config.output_dir}; a larger --checkpoint-every keeps fewer", file=sys.stderr, flush=True)


def open_run_dir(config: RunConfig) -> tuple[Path, bool]:
    """(the run's folder, whether this process created it): a resumed run's own, else a new one.

    A DDP worker started by Lightning inherits the folder from rank 0; a SLURM task other than 0
    waits for the one its job's task 0 announces (``run.runs.folder.join_run_dir``).
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited), False
    if joins_run():
        return join_run_dir(config.output_dir, config.resume), False
    if config.resume is not None:
        return config.resume.parent.parent, False
    return create_run_dir(config.output_dir, config.model, config.run_name), True


def describe(config: RunConfig) -> str:
    """The options that make the run, in one line."""
    schedule = f"{config.scheduler} schedule" if config.scheduler != "none" else "constant lr"
    parts = [
        config.described_model,
        f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}",
        f"batch {config.batch_size}",
        f"{config.optimizer} lr {config.lr:g}",
        schedule,
        *_recipe_extras(config),
        f"seed {config.seed}",
        f"{config.accelerator} x{config.hardware.device_count} {config.precision}"
        + (f" ({config.precision_reason})" if config.precision_reason and config.precision_reason != "asked for" else ""),
    ]
    return ", ".join(parts)


def _recipe_extras(config: RunConfig) -> list[str]:
    """What a recipe adds to the course's (label smoothing, augmentation, EMA, TTA), so that the
    first line shows a config was applied; nothing for the course's own recipe."""
    extras = [f"label smoothing {config.label_smoothing:g}"] if config.label_smoothing else []
    if (config.translate, config.translate_padding) != (4, "zeros"):
        extras.append(f"shifts of {config.translate} ({config.translate_padding})")
    extras += [f"cutout {config.cutout}"] if config.cutout else []
    extras += [f"EMA {config.ema_decay:g}"] if config.ema_decay else []
    extras += [f"TTA {config.tta}"] if config.tta != "none" else []
    return extras


def find_lr_only(config: RunConfig) -> Path:
    """``--find-lr``: the range test alone, its plot and numbers in ``OUTPUT_DIR/MODEL/lr_find/version_N``."""
    check_loggers(config.logger)
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        find_lr(config)  # a DDP worker takes part in rank 0's test; rank 0 writes the results
        return Path(inherited)
    print(f"learning-rate range test: {config.model}, {config.optimizer}, batch {config.batch_size}, rate from "
          f"{MIN_LR:g} to {MAX_LR:g} over {STEPS} steps", flush=True)
    made: list[Path] = []

    def make_folder() -> None:
        # Made before the test's Trainer starts the other DDP processes (Lightning's launcher), which
        # inherit it: each would otherwise make a folder of its own.
        made.append(create_run_dir(config.output_dir / config.model, "lr_find", None))
        os.environ[RUN_DIR_ENV] = str(made[0])

    try:
        with handed_down(**{CONSOLE_ENV: console_kind()}):
            finding = find_lr(config, make_folder)
    except BaseException:
        if made:
            shutil.rmtree(made[0], ignore_errors=True)  # nothing of the test was written
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    folder = made[0]
    picture = finding.save(folder)
    # The plot, to the loggers of --logger that take pictures (a CSV logger has no number to take).
    takers = [name for name in config.logger if name != "csv"]
    loggers = build_loggers(takers, folder, config.model)
    log_figure(loggers, "lr_find", finding.figure, step=0)
    for logger in loggers:
        logger.finalize("success")
    print(finding.describe())
    print(f"plot: {picture}" + (f" (also in {dashboards_hint(folder, takers)})" if takers else ""))
    print(f"train with it: python train.py --lr {finding.suggestion:.3g} ..., or let train.py do both: --lr find")
    return folder


def train(config: RunConfig, argv: list[str] | None = None, start: Start | None = None) -> RunOutcome:
    """Fit ``config``'s run, test its best checkpoint, record everything; returns the outcome.

    ``start``: how the run starts, as ``run.runs.resolve.resolve_run`` planned it (read here from
    ``config.resume`` or ``config.weights`` when not given).

    Raises ``UserError`` for problems found on the way (before any heavy work where they can be
    known), ``SIGTERMException`` after saving ``last.ckpt`` on SIGTERM, ``Interrupted`` after
    saving it on Ctrl-C.
    """
    check_layout(config.hardware.device_count, config.num_nodes)
    # A logger whose library is missing (--logger mlflow without MLflow): refused before the data
    # is read. (run.runs.resolve may refuse it earlier still, with the flags.)
    check_loggers(config.logger)
    if config.requeue_signal is None and slurm_task() is not None:
        # Under SLURM the requeue signal defaults to Lightning's (SIGUSR1); the run's config records it.
        config = dataclasses.replace(config, requeue_signal=DEFAULT_REQUEUE_SIGNAL)
    # Decided here, once, and inherited by the DDP workers that Lightning's launcher starts from
    # this process: which checkpoint a resume continues, and the console display (whose kinds run
    # different collectives at an epoch's end).
    hand_down = {RESUME_ENV: str(config.resume or ""), CONSOLE_ENV: console_kind()}
    try:
        with ExitStack() as held:
            held.enter_context(handed_down(**hand_down))
            if config.resume is not None and not joins_run():
                # Refused at once when another process trains this run (DDP workers, the job's other
                # SLURM tasks: rank 0 holds it).
                held.enter_context(hold_run(config.resume.parent.parent))
            return _train(config, argv, held, start or plan_start(config))
    except UserError as exc:
        # The job's other SLURM tasks may be waiting for task 0 to name the run folder: they stop
        # with this error rather than at their timeout. (Nothing to do in any other process.)
        announce_run_dir(config.output_dir, error=str(exc))
        raise


def _open_run(config: RunConfig, held: ExitStack) -> tuple[Path, bool]:
    """``open_run_dir``, held when this process created it, announced to the job's other SLURM tasks,
    and handed down to the DDP workers that Lightning's launcher starts from here on."""
    run_dir, created = open_run_dir(config)
    if created:
        # A named run's folder may be another process's that has not saved a checkpoint yet: refused
        # here, before anything of it could be discarded below.
        held.enter_context(hold_run(run_dir))
    # Under srun, SLURM task 0 tells the job's other tasks which folder this is (once it holds it).
    held.callback(withdraw_announcement, announce_run_dir(config.output_dir, run_dir, config.resume))
    held.enter_context(handed_down(**{RUN_DIR_ENV: str(run_dir)}))
    return run_dir, created


def _train(config: RunConfig, argv: list[str] | None, held: ExitStack, start: Start) -> RunOutcome:
    started = time.perf_counter()
    finding = None
    run_dir, created, assembly = None, False, None
    try:
        if config.lr == "find":
            def open_first() -> None:
                # The range test's Trainer starts the other DDP processes: the run folder is opened
                # before, once the test's checks passed, so that they inherit it (each would
                # otherwise make one of its own).
                nonlocal run_dir, created
                run_dir, created = _open_run(config, held)

            finding = find_lr(config, open_first)
            if finding.is_global_zero:
                print(finding.describe(), flush=True)
            config = dataclasses.replace(config, lr=finding.suggestion)  # what the run records is what it uses
        if config.resume is not None:
            check_resumed_data(config.resume.parent.parent, config.data_dir)  # not downloaded anew where it was
        # Everything that can be checked before training is, and before the run folder exists: the
        # data (downloaded if need be; both splits read, so a missing test split is found now, not
        # after hours of training), the weights to start from, the output paths and free disk.
        parts = build_data_and_module(config, start)
        check_outputs(config, parts[1])
        parts[0].prepare_data()
        parts[0].setup()
        if isinstance(start, Resume):
            check_same_data(start.saved_callback_state(SameData.__qualname__), data_fingerprint(parts[0]))
        if run_dir is None:
            run_dir, created = _open_run(config, held)
        assembly = build(config, run_dir, parts=parts, start=start)
        trainer = assembly.trainer
        if trainer.is_global_zero:
            remember_mlflow_run(trainer.loggers, run_dir)  # a resume continues the same MLflow run
        if finding is not None and trainer.is_global_zero:
            finding.save(run_dir)
            log_figure(trainer.loggers, "lr_find", finding.figure, step=0)
        if trainer.is_global_zero and not config.fast_dev_run:
            write_config(config.to_dict(), run_dir / (RESUMED_CONFIG_NAME if config.resume else CONFIG_NAME))
        if trainer.is_global_zero:
            verb = f"resuming {run_dir} from {config.resume.name}" if config.resume else f"new run {run_dir}"
            print(f"{verb}: {describe(config)}", flush=True)
        if trainer.is_global_zero and config.rewind and config.resume is not None:
            rewind(run_dir, config.resume, start.point if isinstance(start, Resume) else None)
        fit_started = time.perf_counter()
        # From the first training step to the last, Ctrl-C saves last.ckpt (PreemptionCheckpoint);
        # before and after them (setup, sanity check, teardown) Lightning would end with exit code 1.
        with ctrl_c_raises("stopped by Ctrl-C outside a training step; the checkpoints written so far are kept"), \
                worker_failures_explained(config.workers):
            trainer.fit(assembly.module, datamodule=assembly.datamodule, ckpt_path=config.resume, weights_only=True)
    except SIGTERMException:
        if assembly is not None:
            preemption = next(c for c in assembly.callbacks.all if isinstance(c, PreemptionCheckpoint))
            if preemption.received == "SIGINT":
                raise Interrupted("stopped by Ctrl-C (exit code 130)") from None
        elif created and discard_if_unfinished(run_dir):
            print(f"removed the run folder {run_dir}: it stopped before writing any checkpoint", flush=True)
        raise
    except BaseException:
        if created and discard_if_unfinished(run_dir):
            print(f"removed the run folder {run_dir}: it stopped before writing any checkpoint", flush=True)
        raise
    return _test_and_record(config, assembly, run_dir, started, fit_started, argv)


def _test_and_record(
    config: RunConfig, assembly: Assembly, run_dir: Path, started: float, fit_started: float, argv: list[str] | None
) -> RunOutcome:
    trainer, callbacks = assembly.trainer, assembly.callbacks
    # Read before testing: trainer.test restores the callbacks' state from the tested checkpoint.
    outcome = RunOutcome(
        config,
        run_dir,
        trainer.is_global_zero,
        best=callbacks.best.best_model_path or None,
        best_score=float(callbacks.best.best_model_score) if callbacks.best.best_model_score is not None else None,
        last=callbacks.latest.best_model_path or None,
        data=describe_source(config.data_dir, config.dataset),
    )
    epochs_trained, last_step, test_started = trainer.current_epoch, trainer.global_step, time.perf_counter()
    kept = f"the run is saved ({outcome.best or outcome.last}); test it with: python test.py --ckpt {shlex.quote(str(outcome.best))}"
    try:
        with ctrl_c_raises(f"stopped by Ctrl-C during the final test; {kept}"), worker_failures_explained(config.workers):
            results = trainer.test(assembly.module, datamodule=assembly.datamodule, ckpt_path=outcome.best, weights_only=True, verbose=False)
    except SIGTERMException:
        if trainer.is_global_zero:
            print(f"stopped by a termination signal during the final test: the training is complete and saved; "
                  f"the test runs again with: python train.py --resume {shlex.quote(str(run_dir))}", file=sys.stderr)
        raise
    except UserError as exc:
        # The training is done and its checkpoints are on disk: report, never throw them away.
        outcome.test_error = str(exc)
        results = []
    outcome.test_metrics = dict(results[0]) if results else {}
    if not trainer.is_global_zero:
        return outcome
    if outcome.best:
        # Lightning counts epochs from 0 (epoch000.ckpt holds the first); people count from 1.
        outcome.best_epoch = load_checkpoint(outcome.best, peek=True).epoch + 1
        final = {
            "hp/best_val_acc": outcome.best_score,
            "hp/best_epoch": outcome.best_epoch,
            "hp/test_acc": outcome.test_metrics.get("acc/test"),
            "hp/test_loss": outcome.test_metrics.get("loss/test"),
            "hp/test_images": outcome.test_metrics.get("images/test"),
        }
        log_final_hparams(trainer.loggers, config.to_dict(), final, step=trainer.global_step)
    if config.results_json:
        finished = time.perf_counter()
        report = run_results(
            config=config.to_dict(),
            hardware={"accelerator": config.accelerator, "precision": config.precision, "devices": trainer.world_size},
            outcome={"best": outcome.best, "best_score": outcome.best_score, "best_epoch": outcome.best_epoch},
            test_metrics=outcome.test_metrics,
            epochs_trained=epochs_trained,
            seconds={
                "setup": fit_started - started,
                "fit": test_started - fit_started,
                "test": finished - test_started,
                "total": finished - started,
            },
            time_to_accuracy=callbacks.clock.report() if callbacks.clock else None,
            data=outcome.data,
            argv=list(argv or []),
        )
        write_results_json(config.results_json, report)
    if outcome.best and outcome.test_metrics and not config.fast_dev_run:
        # Last, once the dashboards and the results hold the test: a resume of this run, finished,
        # says so instead of testing it again (run.runs.history).
        record_final_test(run_dir, last_step, epochs_trained, outcome.best, outcome.best_epoch, outcome.test_metrics)
    return outcome


def tested_on(metrics: dict[str, float], data: str) -> str:
    """``85.10 % on 1,000 test images of DATA``: an accuracy never goes without its sample size."""
    if "acc/test" not in metrics:
        return "n/a"
    images = f"{int(metrics['images/test']):,} test images of " if "images/test" in metrics else ""
    return f"{100 * metrics['acc/test']:.2f} % on {images}{data}"


def summary_lines(outcome: RunOutcome) -> list[tuple[str, str]]:
    """(label, value) rows that train.py prints at the end of a run."""
    config, metrics = outcome.config, outcome.test_metrics
    lines = [("test accuracy", tested_on(metrics, outcome.data))]
    if outcome.test_error:
        lines = [("final test", f"failed: {outcome.test_error}; the checkpoints below are kept, test one with test.py")]
    if not outcome.best:
        return lines + [("checkpoints", "none written (--fast-dev-run)")]
    score = f", acc/val {100 * outcome.best_score:.2f} %" if outcome.best_score is not None else ""
    lines += [
        ("best epoch", f"{outcome.best_epoch} of {config.epochs} (counting from 1){score}"),
        ("best checkpoint", f"{outcome.best}{score}"),
        ("last checkpoint", str(outcome.last)),
        ("config", str(outcome.run_dir / CONFIG_NAME)),
        ("dashboards", dashboards_hint(outcome.run_dir, config.logger)),
        ("test again", f"python test.py --ckpt {shlex.quote(outcome.best)}"),
    ]
    if config.results_json:
        lines.append(("results", str(config.results_json)))
    return lines

