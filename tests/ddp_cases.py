#!/usr/bin/env python
"""train.py under Lightning's DDP launcher with one multi-rank case set up (for tests/test_ddp_ranks.py).

Run exactly like train.py; Lightning's launcher starts the other processes with this same command
line, so every process gets the case. ``$DDP_CASE`` names it (or several, comma-separated):

* ``plain``: nothing more (each process still records what is below).
* ``slow_last``: rank 0 writes ``last.ckpt`` ``$DDP_CASE_DELAY`` seconds late, and gets SIGTERM
  (one process only) after training step ``$DDP_CASE_STEP``.
* ``resume_race``: rank 0, once it has resolved ``--resume``, makes another run newer than the one
  it resolved (a copy of it, as another job writing into the same output folder would).
* ``tty_rank0``: rank 0's standard output says it is a terminal, the other ranks' do not.
* ``skewed_clock``: rank 1's clock (as the checkpoint callbacks read it) jumps an hour at every
  reading: it always finds its last save long ago, rank 0 finds it recent within a short run.
* ``short_lr_find``: the range test takes 30 steps, and the run after it (``--lr find``) trains at
  most at 0.01 (a rate suggested from tiny data can diverge, which would discard the run).

Each process writes ``$DDP_CASE_DIR/rank<R>.json``: the collectives it ran, in order (names of the
``torch.distributed`` calls), the checkpoint its run resumed, its run folder, the console
callbacks it built, and the checkpoints it saved (file name and epoch, counted from 1).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed  # noqa: E402

CASES, OUT = set(os.environ.get("DDP_CASE", "plain").split(",")), Path(os.environ["DDP_CASE_DIR"])
RANK = int(os.environ.get("LOCAL_RANK", "0"))  # one node: Lightning gives each worker its LOCAL_RANK
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
               "gather", "reduce", "scatter", "reduce_scatter", "all_to_all")
record: dict = {"rank": RANK, "collectives": [], "resume": None, "run_dir": None, "console": [], "saves": []}


def _counted(name, real):
    def call(*args, **kwargs):
        record["collectives"].append(name)
        return real(*args, **kwargs)

    return call


for _name in COLLECTIVES:
    if hasattr(torch.distributed, _name):
        setattr(torch.distributed, _name, _counted(_name, getattr(torch.distributed, _name)))


@atexit.register
def _write() -> None:
    (OUT / f"rank{RANK}.json").write_text(json.dumps(record))


def _install() -> None:
    from lightning.pytorch.callbacks import Callback

    from callbacks import checkpoints
    from callbacks.checkpoints import AtomicCheckpointIO
    from run import build, lr_find, training

    real_named_save = checkpoints.NamedCheckpoint._save_checkpoint

    def named_save(self, trainer, filepath):
        record["saves"].append([Path(filepath).name, trainer.current_epoch + 1])
        real_named_save(self, trainer, filepath)

    checkpoints.NamedCheckpoint._save_checkpoint = named_save
    if "skewed_clock" in CASES and RANK == 1:
        jumps = iter(range(1, 10**6))
        checkpoints.time = SimpleNamespace(monotonic=lambda: time.monotonic() + 3600 * next(jumps))
    if "short_lr_find" in CASES:
        lr_find.STEPS = 30
        real_find = lr_find.find_lr

        def find_lr(config, *args):
            finding = real_find(config, *args)
            return dataclasses.replace(finding, suggestion=min(finding.suggestion, 0.01))

        lr_find.find_lr = find_lr

    real_train = training.train

    def train(config, start=None, *, argv=None):
        record["resume"] = str(config.resume) if config.resume else None
        if "resume_race" in CASES and RANK == 0 and config.resume is not None:
            run = config.resume.parent.parent
            newer = run.parent / "version_99"
            shutil.copytree(run, newer, ignore=shutil.ignore_patterns(".train.lock"))
            later = time.time() + 60
            for path in newer.rglob("*"):
                os.utime(path, (later, later))
        return real_train(config, start, argv=argv)

    training.train = train
    real_callbacks = build.build_callbacks

    def build_callbacks(config, run_dir, dataset):
        callbacks = real_callbacks(config, run_dir, dataset)
        record["run_dir"] = str(run_dir)
        record["console"] = sorted(type(c).__name__ for c in callbacks.all if "Progress" in type(c).__name__
                                   or "EpochLines" in type(c).__name__)
        if "slow_last" in CASES:
            callbacks.all.append(_SigtermAfter(int(os.environ["DDP_CASE_STEP"])))
        return callbacks

    build.build_callbacks = build_callbacks

    class _SigtermAfter(Callback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == self.step and trainer.is_global_zero:
                os.kill(os.getpid(), signal.SIGTERM)

    if "slow_last" in CASES and RANK == 0:
        delay = float(os.environ["DDP_CASE_DELAY"])
        real_save = AtomicCheckpointIO.save_checkpoint

        def slow_save(self, checkpoint, path, storage_options=None):
            if Path(path).name == "last.ckpt":
                time.sleep(delay)
            real_save(self, checkpoint, path, storage_options)

        AtomicCheckpointIO.save_checkpoint = slow_save
    if "tty_rank0" in CASES and RANK == 0:
        sys.stdout.isatty = lambda: True


if __name__ == "__main__":
    _install()
    from cli.train import main

    sys.exit(main())
