#!/usr/bin/env python
"""train.py as one task of an emulated SLURM job step, with a probe (for tests/test_slurm.py).

Run exactly like train.py, once per task, with the variables srun sets. With ``SLURM_PROBE_DIR``
set, each task writes ``start-rank<R>.json`` when training starts: the step it starts from and a
digest of its torch RNG state (restored from the checkpoint on a resume). With
``SLURM_PROBE_PAUSE_AT=N`` as well, each task stops after training step N, writes
``paused-rank<R>``, and waits there until the file ``go`` appears: the test then signals every
task while all of them are at the same step, as SLURM signals a job's tasks together.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROBE_DIR_ENV, PAUSE_ENV = "SLURM_PROBE_DIR", "SLURM_PROBE_PAUSE_AT"


def rng_digest(state: torch.Tensor) -> str:
    return hashlib.sha1(state.numpy().tobytes()).hexdigest()


class Probe(L.Callback):
    def __init__(self, out_dir: Path, pause_at: int | None) -> None:
        self.out_dir, self.pause_at = out_dir, pause_at

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {"global_step": trainer.global_step, "torch_rng": rng_digest(torch.get_rng_state())}
        (self.out_dir / f"start-rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self.pause_at:
            return
        (self.out_dir / f"paused-rank{trainer.global_rank}").touch()
        deadline = time.monotonic() + 120
        while not (self.out_dir / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class ProbedTrainer(L.Trainer):
    def __init__(self, *args: Any, callbacks: list[L.Callback] | None = None, **kwargs: Any) -> None:
        probe = []
        if PROBE_DIR_ENV in os.environ:
            pause = os.environ.get(PAUSE_ENV)
            probe = [Probe(Path(os.environ[PROBE_DIR_ENV]), int(pause) if pause else None)]
        super().__init__(*args, callbacks=[*(callbacks or []), *probe], **kwargs)


if __name__ == "__main__":
    L.Trainer = ProbedTrainer  # train.py looks up L.Trainer when it builds its trainer
    import train

    sys.exit(train.main())
