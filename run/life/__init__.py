"""A training run's life, behind one door: what other modules import about runs comes from here.

- :func:`resolve_run` (``resolve.py``): the flags and config file made into one checked
  ``RunConfig`` and the plan of how the run starts (:data:`Start`, ``start.py``: new, from weights,
  resumed; a resumed checkpoint read once). Flag mistakes are refused before torch loads.
- :func:`open_run` (``session.py``): within the block, the :class:`Run` as this process trains it: its
  folder (new or the resumed run's own; ``folder.py``) opened, locked, announced to the job's
  other SLURM tasks and handed down to the DDP workers; a ``--rewind`` carried out and the final
  test recorded (``history.py``); the folder removed if the run stopped before its first checkpoint.
- :func:`open_range_test`: the folder of a learning-rate range test run alone (``--find-lr``).
- Run folders for the other commands (``test.py --log-to-run``): :func:`run_dir_of`, :func:`require_run_dir`.
- The names of the files and environment variables a run shares (:data:`CONFIG_NAME`...).

Importing this package loads neither torch nor Lightning. Modules outside ``run.life`` import
this package only, never its modules (``lint-imports`` checks it).
"""
from __future__ import annotations

from run.life.folder import (
    CONFIG_NAME,
    CONSOLE_ENV,
    RESUME_ENV,
    RESUMED_CONFIG_NAME,
    RUN_DIR_ENV,
    console_kind,
    require_run_dir,
    run_dir_of,
)
from run.life.history import RunFinished
from run.life.session import Run, RangeTestFolder, open_range_test, open_run
from run.life.resolve import resolve_run, resolve_run_config
from run.life.start import FromWeights, NewRun, Resume, Start, plan_start

__all__ = [
    "CONFIG_NAME",
    "CONSOLE_ENV",
    "RESUMED_CONFIG_NAME",
    "RESUME_ENV",
    "RUN_DIR_ENV",
    "FromWeights",
    "NewRun",
    "RangeTestFolder",
    "Resume",
    "Run",
    "RunFinished",
    "Start",
    "console_kind",
    "open_range_test",
    "open_run",
    "plan_start",
    "require_run_dir",
    "resolve_run",
    "resolve_run_config",
    "run_dir_of",
]
