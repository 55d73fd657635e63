"""A run's loggers (``--logger tensorboard,csv,mlflow``): Lightning's own, all writing inside the run folder.

Each name of ``RunConfig.logger`` becomes one Lightning logger, and a run owns its files:

============  ===========================================================================  =========
logger        where it writes, inside the run folder RUN                                   pictures
============  ===========================================================================  =========
tensorboard   ``RUN/events.out.tfevents.*`` (``tensorboard --logdir RUN``)                 yes
csv           ``RUN/csv/version_N/metrics.csv`` and ``hparams.yaml``, one ``version_N``    no
              per start of the run (Lightning's ``CSVLogger`` empties a ``metrics.csv``
              it finds, so a resume, or ``test.py --log-to-run``, writes the next one)
mlflow        MLflow's local file store ``RUN/mlruns`` (``mlflow ui --backend-store-uri    yes
              file:RUN/mlruns``): experiment named after the model, run named after RUN;
              its run id is kept in ``RUN/mlflow_run.json``, so a resume continues the
              same MLflow run
============  ===========================================================================  =========

Every logger gets the same numbers (the curves, and at the end the run's options with its
``hp/`` results, :func:`log_final_hparams`); pictures go to those that show them
(``callbacks.pictures``). MLflow is an optional extra (``pip install "cifar10-lightning[mlflow]"``):
:func:`check_loggers` refuses ``mlflow`` in one line where it is not installed, and loads nothing
(no torch, no Lightning), so it can run first of all.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from base.errors import UserError
from base.files import atomic_write_text

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

# Names of RunConfig.logger (base.schema.LOGGERS) -> the module each needs beyond the project's dependencies.
OPTIONAL_MODULES = {"mlflow": "mlflow"}
DEFAULT_LOGGERS = ("tensorboard",)  # what a run whose config.yaml has no logger: key (older runs) logged to
CSV_NAME = "csv"
MLRUNS_NAME = "mlruns"
MLFLOW_RUN_NAME = "mlflow_run.json"


def check_loggers(names: Iterable[str], source: str = "--logger", instead: str = "leave {name} out of --logger") -> None:
    """Refuse, in one line, a logger whose library is not installed (``mlflow``).

    ``source`` is what the message names as asking for it, ``instead`` the other way out (``{name}``:
    the logger). Looks the module up only (``importlib.util.find_spec``): nothing is imported, so
    this may run before torch loads. Raises ``UserError``.
    """
    for name in names:
        module = OPTIONAL_MODULES.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(
                f"{source} {name}: MLflow is not installed; install it with: pip install \"cifar10-lightning[mlflow]\" "
                f"(or pip install mlflow-skinny), or {instead.format(name=name)}"
            )


def recorded_loggers(run_dir: Path) -> tuple[str, ...]:
    """The loggers that the run in ``run_dir`` logs to, as its latest config records them
    (``config.resumed.yaml``, else ``config.yaml``); :data:`DEFAULT_LOGGERS` for a run from before
    the ``logger:`` key."""
    from run.config import read_config
    from run.life import CONFIG_NAME, RESUMED_CONFIG_NAME

    resumed = run_dir / RESUMED_CONFIG_NAME
    saved = read_config(resumed if resumed.is_file() else run_dir / CONFIG_NAME).get("logger")
    if not saved:
        return DEFAULT_LOGGERS
    return tuple(saved.split(",")) if isinstance(saved, str) else tuple(saved)


def mlflow_tracking_uri(run_dir: Path) -> str:
    """The tracking URI of the run's own MLflow file store, ``file:RUN/mlruns`` (absolute)."""
    return "file:" + str((run_dir / MLRUNS_NAME).absolute())


def saved_mlflow_run_id(run_dir: Path) -> str | None:
    """The MLflow run id that the run in ``run_dir`` logged to (None when it has not logged to MLflow)."""
    try:
        record = json.loads((run_dir / MLFLOW_RUN_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    run_id = record.get("run_id") if isinstance(record, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def build_loggers(names: Sequence[str], run_dir: Path, model: str, purge_step: int | None = None) -> list[Logger]:
    """One Lightning logger per name of ``names`` (``tensorboard``, ``csv``, ``mlflow``), writing into ``run_dir``.

    A run folder that logged to MLflow before (a resume) continues its MLflow run
    (:data:`MLFLOW_RUN_NAME`). ``purge_step``: a resume's first step; TensorBoard then hides the
    points the run's earlier processes logged from it on (SummaryWriter's ``purge_step``), which a
    crash left behind and the resume logs again. A CSV logger writes a file per start, and MLflow
    cannot take points back: theirs stay. Raises ``UserError`` for a logger whose library is missing.
    """
    check_loggers(names)
    loggers: list[Logger] = []
    for name in names:
        if name == "tensorboard":
            from run.tensorboard import run_logger

            loggers.append(run_logger(run_dir, purge_step=purge_step))
        elif name == "csv":
            loggers.append(csv_logger(run_dir))
        elif name == "mlflow":
            loggers.append(mlflow_logger(run_dir, model))
        else:
            raise UserError(f"--logger {name}: unknown logger; choose from tensorboard, csv, mlflow")
    return loggers


def csv_logger(run_dir: Path) -> Logger:
    """Lightning's CSVLogger, into the next free ``RUN/csv/version_N``."""
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=run_dir, name=CSV_NAME)


def mlflow_logger(run_dir: Path, model: str) -> Logger:
    """Lightning's MLFlowLogger on the run's own file store, continuing the run's MLflow run if it has one."""
    # MLflow 3 refuses a file store unless asked for it (it prefers a database, which needs the
    # full mlflow and SQLAlchemy); a store inside the run folder is what lets a run own its files.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # MLflow 3 reports usage to its developers over the network unless told not to: a training tool
    # sends nothing anywhere unasked (set MLFLOW_DISABLE_TELEMETRY=false to allow it).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # "Experiment with name ... not found. Creating it.": the first run of a model, not news.
    logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)
    return _run_mlflow_logger_class()(
        experiment_name=model,
        run_name=run_dir.name,
        tracking_uri=mlflow_tracking_uri(run_dir),
        run_id=saved_mlflow_run_id(run_dir),
    )


def _run_mlflow_logger_class() -> type:
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    class RunMLFlowLogger(MLFlowLogger):
        """Lightning's MLFlowLogger, whose parameters may be logged again, with other values or shapes.

        MLflow refuses to change a parameter of a run ("Changing param values is not allowed"),
        and a run logs parameters twice: the module's hyperparameters when fitting starts (nested
        groups flattened to ``dataset/name``...), the run's options at its end (``dataset``, a
        name), again at each resume, some changed (``--epochs``, ``--resume``). Its file store
        keeps ``a/b`` as a file in a folder ``a``, so ``a`` and ``a/b`` cannot both be parameters.
        Here parameters held with the same value are skipped, new ones logged, a changed one is
        recorded as the tag ``resumed/<name>`` (tags may change) and one that clashes with a
        group as the tag ``<name>``.
        """

        @rank_zero_only
        def log_hyperparams(self, params: Any) -> None:
            flat = {key: str(value)[:250] for key, value in _flatten_dict(_convert_params(params)).items()}
            held = dict(self.experiment.get_run(self.run_id).data.params)
            new: dict[str, str] = {}
            for key, value in flat.items():
                if key in held:
                    if held[key] != value:
                        self.experiment.set_tag(self.run_id, f"resumed/{key}", value)
                elif any(_clash(key, other) for other in [*held, *new]):
                    self.experiment.set_tag(self.run_id, key, value)
                else:
                    new[key] = value
            if new:
                super().log_hyperparams(new)

    return RunMLFlowLogger


def _clash(key: str, other: str) -> bool:
    """Whether parameters ``key`` and ``other`` cannot both be in a file store (one is a group of the other)."""
    return other.startswith(key + "/") or key.startswith(other + "/")


def remember_mlflow_run(loggers: Iterable[Logger], run_dir: Path) -> None:
    """Keep the MLflow run id of ``loggers`` (if one is an MLFlowLogger) in ``RUN/mlflow_run.json``,
    for a resume to continue that run. Creates the MLflow run when it does not exist yet; rank 0 only."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in loggers:
        if isinstance(logger, MLFlowLogger) and logger.run_id is not None:
            record = {"run_id": logger.run_id, "experiment_id": logger.experiment_id,
                      "tracking_uri": mlflow_tracking_uri(run_dir)}
            atomic_write_text(run_dir / MLFLOW_RUN_NAME, json.dumps(record, indent=2) + "\n")


def log_final_hparams(
    loggers: Iterable[Logger], config: Mapping[str, Any], metrics: Mapping[str, float | None], step: int
) -> None:
    """Record the run's options with its final ``hp/`` results in every logger, and flush them.

    TensorBoard takes both in one call (its HParams tab); the others take the options as parameters
    and the results as metrics at ``step``. Metrics that a run does not have (no test after
    ``--fast-dev-run``) are left out rather than written as a made-up number.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    results = {name: float(value) for name, value in metrics.items() if value is not None}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(dict(config), results, step=step)
        else:
            logger.log_hyperparams(dict(config))
            if results:
                logger.log_metrics(results, step=step)
        logger.finalize("success")


def dashboards_hint(run_dir: Path, names: Sequence[str]) -> str:
    """How to look at what the run's loggers wrote: one command or path per logger, ``; ``-separated."""
    import shlex

    hints = {
        "tensorboard": f"tensorboard --logdir {shlex.quote(str(run_dir))}",
        "csv": f"{run_dir / CSV_NAME}/version_*/metrics.csv",
        # MLflow 3's server opens a file store only when allowed to (as the run itself is: mlflow_logger).
        "mlflow": f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {shlex.quote(mlflow_tracking_uri(run_dir))}",
    }
    return "; ".join(hints[name] for name in names if name in hints) or "none"
