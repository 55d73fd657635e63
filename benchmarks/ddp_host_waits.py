"""Host waits of a DDP training step: the reads of tensor values on the host, counted per rank.

On a GPU every such read (``item``, ``tolist``, ``bool``, ``int``, ...) waits for all queued
kernels; on the CPU the same calls happen, so two CPU processes over gloo count what two GPUs over
NCCL would wait for. train.py runs under Lightning's own launcher (``--devices 2 --strategy ddp``)
on generated data, twice: as it trains, and with Lightning's per-step SIGTERM broadcast left on
(``PreemptionCheckpoint.silence_lightning_broadcast = False``), what Lightning 2.6 does by itself.
Counted on the training loop's thread from one training step's start to the next (Lightning's
``advance`` before the batch, the step, every callback's batch-end hooks), leaving out validation
and epoch ends, as tests/test_host_syncs.py counts a single process.

    python -m benchmarks.ddp_host_waits --out benchmarks/results/ddp-host-waits.json

Each rank's reads by kind and place, the collectives, and the steps counted go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER_ENV = "DDP_HOST_WAITS_DIR"  # set: this process is train.py under the count (every rank)
KEEP_ENV = "DDP_HOST_WAITS_KEEP_LIGHTNING_BROADCAST"
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier")
LOG_EVERY = 5
STEPS_PER_EPOCH = 10  # 200 training images, 10 per rank per step
EPOCHS = 2


def worker() -> None:
    """train.py with the counters, one rank (Lightning's launcher starts rank 1 with this same command)."""
    import torch
    import torch.distributed
    from lightning.pytorch.callbacks import Callback

    sys.path.insert(0, str(ROOT))
    from callbacks.checkpoints import PreemptionCheckpoint
    from cli.train import main
    from run import build

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    reads: Counter[str] = Counter()
    collectives: Counter[str] = Counter()
    state = {"counting": False, "steps": 0}

    class Window(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["counting"] = True
            state["steps"] += 1

        def on_validation_start(self, trainer, pl_module):
            state["counting"] = False

        def on_train_epoch_end(self, trainer, pl_module):
            state["counting"] = False

    def counted(kind: str, name: str, real):
        def call(*args, **kwargs):
            if state["counting"] and threading.current_thread() is threading.main_thread():
                caller = traceback.extract_stack(limit=3)[0]
                place = "/".join(Path(caller.filename).parts[-2:])
                (reads if kind == "read" else collectives)[f"{name} at {place}:{caller.lineno}"] += 1
            return real(*args, **kwargs)

        return call

    for name in READS:
        setattr(torch.Tensor, name, counted("read", name, getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        setattr(torch.distributed, name, counted("collective", name, getattr(torch.distributed, name)))
    if os.environ.get(KEEP_ENV) == "1":
        PreemptionCheckpoint.silence_lightning_broadcast = False
    real_callbacks = build.build_callbacks

    def build_callbacks(*args, **kwargs):
        callbacks = real_callbacks(*args, **kwargs)
        callbacks.all.insert(0, Window())
        return callbacks

    build.build_callbacks = build_callbacks
    try:
        sys.exit(main())
    finally:
        record = {"rank": rank, "steps": state["steps"], "reads": dict(reads), "collectives": dict(collectives)}
        (Path(os.environ[WORKER_ENV]) / f"rank{rank}.json").write_text(json.dumps(record))


def measure(data: Path, scratch: Path, keep_lightning: bool) -> dict:
    records = scratch / ("kept" if keep_lightning else "ours")
    records.mkdir()
    env = {**os.environ, WORKER_ENV: str(records), KEEP_ENV: "1" if keep_lightning else "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "benchmarks.ddp_host_waits", "--model", "vgg16", "--data-dir", str(data),
               "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--workers", "0", "--batch-size", "10",
               "--val-size", "20", "--eval-batch-size", "50", "--epochs", str(EPOCHS), "--log-every-n-steps", str(LOG_EVERY),
               "--output-dir", str(scratch / "runs" / records.name)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"train.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    ranks = [json.loads(path.read_text()) for path in sorted(records.glob("rank*.json"))]
    for rank in ranks:
        rank["reads_per_step"] = sum(rank["reads"].values()) / rank["steps"]
    return {"lightning_broadcast": keep_lightning, "ranks": ranks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON of counts goes")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from fakedata import make_image_folder

    with tempfile.TemporaryDirectory(prefix="ddp-host-waits-") as scratch:
        scratch = Path(scratch)
        per_class = (STEPS_PER_EPOCH * 2 * 10 + 20) // 10  # training images after 20 held out, 10 classes
        data = make_image_folder(scratch / "data", per_class, 5)
        results = [measure(data, scratch, keep) for keep in (True, False)]
    report = {
        "command": "python -m benchmarks.ddp_host_waits --out " + str(args.out),
        "setup": f"train.py, vgg16, 2 CPU processes (gloo), batch 10 per process, {STEPS_PER_EPOCH} steps an epoch, "
                 f"{EPOCHS} epochs, --log-every-n-steps {LOG_EVERY}",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for result in results:
        label = "with Lightning's per-step broadcast" if result["lightning_broadcast"] else "as train.py trains"
        for rank in result["ranks"]:
            print(f"{label}, rank {rank['rank']}: {rank['steps']} steps, {sum(rank['reads'].values())} host reads "
                  f"({rank['reads_per_step']:.2f} a step): {rank['reads']}")
    return 0


if __name__ == "__main__":
    # Lightning's launcher starts rank 1 with this command line and environment: a worker too.
    if WORKER_ENV in os.environ:
        worker()
    else:
        sys.exit(main())
