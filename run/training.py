"""``train(config, start)``: one training run from a resolved configuration, start to results.

Opens the run (``run.life``: its folder new or, on resume, continued), builds it, fits, tests the
best checkpoint, and reports and records the results. train.py only parses flags into a
``RunConfig`` and prints what this returns.
"""
from __future__ import annotations

import shlex
import sys

from lightning.pytorch.utilities.exceptions import SIGTERMException

from base.errors import UserError
from run.build import Assembly, build, build_data_and_module
from run.config import RunConfig
from run.lr_find import keep_finding, settle_lr
from run.report import RunOutcome, Stopwatch, describe, fitted, report
from run.life import Start, open_run


FIT_STOPPED = "stopped by Ctrl-C outside a training step; the checkpoints written so far are kept"


def train(config: RunConfig, start: Start | None = None, *, argv: list[str] | None = None) -> RunOutcome:
    """Fit ``config``'s run, test its best checkpoint, record everything; returns the outcome.

    ``start``: how the run starts, as ``run.life.resolve_run`` planned it (read from
    ``config.resume`` or ``config.weights`` when not given); ``argv``: the flags, for the results.

    Raises ``UserError`` for problems found on the way (before any heavy work where they can be
    known), ``SIGTERMException`` after saving ``last.ckpt`` on SIGTERM, ``Interrupted`` after
    saving it on Ctrl-C.
    """
    with open_run(config, start) as run:
        clock = Stopwatch()
        # --lr find: the range test first; the run's folder is opened before its Trainer starts the
        # other DDP processes, so that they inherit it.
        config, finding = settle_lr(run.config, before_launch=run.open)
        # Everything that can be checked before training is, before the run's folder exists.
        datamodule, module = build_data_and_module(config, run.start)
        run.check_ready(config, datamodule, module)
        assembly = build(config, run.open(), parts=(datamodule, module), start=run.start)
        run.begin(config, assembly.trainer, describe(config))
        keep_finding(finding, run.open(), assembly.trainer)
        clock.start("fit")
        # The context managers are suspended while the steps run: a training step passes through
        # this module, Lightning, the callbacks, the data, the LightningModule and the network.
        with run.fitting(assembly.trainer), assembly.guarded(FIT_STOPPED):
            assembly.trainer.fit(assembly.module, datamodule=assembly.datamodule, ckpt_path=config.resume,
                                 weights_only=True)
        clock.start("test")
        outcome = _test_best(fitted(config, run.open(), assembly), assembly)
        if outcome.is_global_zero:
            report(outcome, assembly, clock, argv)
            run.record_test(last_step=outcome.last_step, epochs=outcome.epochs_trained, best=outcome.best,
                            best_epoch=outcome.best_epoch, metrics=outcome.test_metrics)
    return outcome


def _test_best(outcome: RunOutcome, assembly: Assembly) -> RunOutcome:
    """``outcome`` with the test metrics of its best checkpoint; a failed test is reported in it,
    never a reason to throw the trained checkpoints away."""
    kept = f"the run is saved ({outcome.best or outcome.last}); test it with: python test.py --ckpt {shlex.quote(str(outcome.best))}"
    try:
        results = assembly.test(outcome.best, stopped=f"stopped by Ctrl-C during the final test; {kept}")
    except SIGTERMException:
        if outcome.is_global_zero:
            print(f"stopped by a termination signal during the final test: the training is complete and saved; "
                  f"the test runs again with: python train.py --resume {shlex.quote(str(outcome.run_dir))}", file=sys.stderr)
        raise
    except UserError as exc:
        outcome.test_error = str(exc)
        results = []
    outcome.test_metrics = dict(results[0]) if results else {}
    return outcome
