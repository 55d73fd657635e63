"""SLURM, emulated on the CPU: srun's tasks, one run folder, the requeue, hpc_ckpt files, per-rank RNGs.

``srun`` starts every task of a job step itself, each a whole train.py, with the variables below;
here each task is a subprocess given those variables (gloo on 127.0.0.1), as on two GPUs of one
node or on one GPU of each of two nodes. ``scontrol`` is a stub first on PATH that records its
arguments.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import CPU, QUICK, QUICK_VGG, ROOT

from base.errors import UserError
from base.slurm import check_layout, requeue, slurm_task
from callbacks.resume import ResumableRNG, capture_rng_state
from run.life import folder

JOB_ID = "4242"
SLURM_VARIABLES = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS_PER_NODE",
                   "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_STEP_ID", "SLURM_RESTART_COUNT")
# (tasks per node, nodes) and the flags that say the same to train.py
LAYOUTS = {"one_node_two_tasks": ((2, 1), ["--devices", "2"]),
           "two_nodes_one_task_each": ((1, 2), ["--devices", "1", "--num-nodes", "2"])}


def slurm_env(rank: int = 0, per_node: int = 1, nodes: int = 1, restart: int = 0) -> dict[str, str]:
    """The variables srun gives task ``rank`` of a job step of ``per_node`` x ``nodes`` tasks."""
    env = {
        "SLURM_NTASKS": str(per_node * nodes), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
        "SLURM_NODEID": str(rank // per_node), "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NNODES": str(nodes),
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "cifar10", "SLURM_STEP_ID": "0",
    }
    if restart:
        env["SLURM_RESTART_COUNT"] = str(restart)
    return env


@pytest.fixture
def scontrol(tmp_path: Path) -> SimpleNamespace:
    """A stub ``scontrol`` (``.path`` its folder, for PATH) that appends its arguments to ``.log``."""
    stub_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    stub_dir.mkdir()
    stub = stub_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    stub.chmod(0o755)
    return SimpleNamespace(path=str(stub_dir), log=log, calls=lambda: log.read_text().splitlines() if log.exists() else [])


@pytest.fixture
def in_slurm(monkeypatch: pytest.MonkeyPatch, scontrol: SimpleNamespace):
    """``in_slurm(**slurm_env kwargs)``: this process is a task of a SLURM job, scontrol the stub."""
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", f"{scontrol.path}{os.pathsep}{os.environ['PATH']}")

    def enter(**kwargs: int) -> None:
        for name, value in slurm_env(**kwargs).items():
            monkeypatch.setenv(name, value)

    return enter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_tasks(command: list[str], layout: tuple[int, int], logs: Path, cwd: Path, path: str,
                restart: int = 0, extra: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start one process per task of ``layout`` as srun would, output in ``logs/task<R>.{out,err}``."""
    per_node, nodes = layout
    port = free_port()
    logs.mkdir(exist_ok=True)
    base = {name: value for name, value in os.environ.items() if name not in SLURM_VARIABLES}
    processes = []
    for rank in range(per_node * nodes):
        env = {**base, **slurm_env(rank, per_node, nodes, restart), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PATH": f"{path}{os.pathsep}{base['PATH']}", **(extra or {})}
        with (logs / f"task{rank}.out").open("w") as out, (logs / f"task{rank}.err").open("w") as err:
            processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err))
    return processes


def wait_all(processes: list[subprocess.Popen], logs: Path, timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def signal_when_paused(command: list[str], layout: tuple[int, int], logs: Path, cwd: Path, scontrol: SimpleNamespace,
                       probe: Path, pause_at: int, signalled: tuple[int, ...]) -> list[int]:
    """Run the tasks with tests/slurm_probe.py's pause after step ``pause_at``; once all wait there, send
    SIGUSR1 to the tasks ``signalled``, let them go on, and return the exit codes."""
    tasks = start_tasks(command, layout, logs, cwd, scontrol.path,
                        extra={"SLURM_PROBE_DIR": str(probe), "SLURM_PROBE_PAUSE_AT": str(pause_at)})
    try:
        deadline = time.monotonic() + 400
        while not all((probe / f"paused-rank{r}").exists() for r in range(len(tasks))):
            assert time.monotonic() < deadline and all(t.poll() is None for t in tasks), errors(logs)
            time.sleep(0.2)
        for rank in signalled:
            tasks[rank].send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        (probe / "go").touch()
    finally:
        codes = wait_all(tasks, logs, timeout=300)
    return codes


def errors(logs: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()[-1500:]}" for path in sorted(logs.glob("task*.err")))


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def plant_hpc_checkpoint(folder_: Path, source: Path | None = None) -> Path:
    """An ``hpc_ckpt_1.ckpt`` in ``folder_``: ``source`` with every weight zeroed, or junk without one."""
    planted = folder_ / "hpc_ckpt_1.ckpt"
    if source is None:
        planted.write_bytes(b"not a checkpoint: loading it must never be tried")
    else:
        checkpoint = load(source)
        checkpoint["state_dict"] = {k: torch.zeros_like(v) for k, v in checkpoint["state_dict"].items()}
        torch.save(checkpoint, planted)
    return planted


def hpc_files(*roots: Path) -> list[Path]:
    return [path for root in roots for path in root.rglob("hpc_ckpt_*")]


# --- several tasks ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_srun_tasks_train_one_run_folder(tiny_data, tmp_path, scontrol, layout):
    """Every task runs train.py: one run folder (a new version_N), written by task 0; all exit 0."""
    (per_node, nodes), flags = LAYOUTS[layout]
    work, output, logs = tmp_path / "work", tmp_path / "runs", tmp_path / "logs"
    work.mkdir()
    planted = plant_hpc_checkpoint(work)  # junk: Lightning would fail on loading it
    command = [sys.executable, str(ROOT / "train.py"), *QUICK_VGG, "--data-dir", str(tiny_data), "--epochs", "1",
               "--output-dir", str(output), *flags]
    codes = wait_all(start_tasks(command, (per_node, nodes), logs, work, scontrol.path), logs)
    assert codes == [0, 0], errors(logs)
    assert [p.name for p in (output / "vgg16").iterdir()] == ["version_0"]
    run = output / "vgg16" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert [(logs / f"task{r}.out").read_text().count("test accuracy") for r in (0, 1)] == [1, 0]
    # Nothing of the job's start is left behind; no hpc_ckpt was written, nor the planted one read.
    assert sorted(p.name for p in output.iterdir()) == ["vgg16"]
    assert hpc_files(tmp_path) == [planted]
    # Each task drew from its own random stream, and the checkpoint holds both.
    ranks = load(run / "checkpoints" / "last.ckpt")["callbacks"]["ResumableRNG"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert ranks[0]["numpy"]["keys"] != ranks[1]["numpy"]["keys"]


@pytest.mark.slow
def test_requeue_signal_saves_requeues_once_and_the_same_command_finishes(tiny_data, tmp_path, scontrol):
    """SIGUSR1 to every task mid-epoch: last.ckpt, one `scontrol requeue JOBID`; the requeued job ends the run."""
    from slurm_probe import rng_digest

    work, output, probe = tmp_path / "work", tmp_path / "runs", tmp_path / "probe"
    work.mkdir(), probe.mkdir()
    epochs, steps_per_epoch = 3, 2  # 80 training images, 2 tasks of batch 20
    command = [sys.executable, str(ROOT / "tests" / "slurm_probe.py"), *QUICK, "--model", "vgg16", "--train-limit", "80",
               "--data-dir", str(tiny_data), "--epochs", str(epochs), "--output-dir", str(output), "--devices", "2",
               "--requeue-signal", "SIGUSR1", "--run-name", f"slurm-{JOB_ID}", "--resume", "last"]
    run = output / "vgg16" / f"slurm-{JOB_ID}"
    last = run / "checkpoints" / "last.ckpt"

    # First start: both tasks wait after step 2 (the end of epoch 1), are signalled there, and stop after step 3.
    logs = tmp_path / "logs1"
    codes = signal_when_paused(command, (2, 1), logs, work, scontrol, probe, pause_at=2, signalled=(0, 1))
    assert codes == [143, 143], errors(logs)
    task0 = (logs / "task0.err").read_text()
    assert f"stopped by SIGUSR1 in epoch 2, after step 3: saved {last}" in task0, task0[-2000:]
    assert f"requeued SLURM job {JOB_ID}" in task0
    assert scontrol.calls() == [f"requeue {JOB_ID}"]
    stopped = load(last)
    assert stopped["global_step"] == 3
    saved = stopped["callbacks"]["ResumableRNG"]["ranks"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])
    assert (run / "config.yaml").read_text().count("requeue_signal: SIGUSR1") == 1

    # The requeued job runs the same command again: each task continues from its own RNG state, to the end.
    for path in probe.iterdir():
        path.unlink()
    logs = tmp_path / "logs2"
    codes = wait_all(start_tasks(command, (2, 1), logs, work, scontrol.path, restart=1,
                                 extra={"SLURM_PROBE_DIR": str(probe)}), logs)
    assert codes == [0, 0], errors(logs)
    assert f"resuming {run}" in (logs / "task0.out").read_text()
    starts = [json.loads((probe / f"start-rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["global_step"] for s in starts] == [3, 3]
    assert [s["torch_rng"] for s in starts] == [rng_digest(saved[r]["torch"]) for r in (0, 1)]
    assert load(last)["global_step"] == epochs * steps_per_epoch
    assert scontrol.calls() == [f"requeue {JOB_ID}"]
    assert [p.name for p in (output / "vgg16").iterdir()] == [run.name]
    assert hpc_files(tmp_path) == [] and sorted(p.name for p in output.iterdir()) == ["vgg16"]


@pytest.mark.slow
def test_a_signal_to_one_task_stops_every_task_after_the_same_batch(tiny_data, tmp_path, scontrol):
    """Only task 1 gets SIGUSR1: the tasks agree to stop after one same batch, all save, task 0 requeues.

    Left to Lightning, task 1 alone would stop, and task 0 wait for it in the next collective."""
    work, output, probe, logs = tmp_path / "work", tmp_path / "runs", tmp_path / "probe", tmp_path / "logs"
    work.mkdir(), probe.mkdir()
    command = [sys.executable, str(ROOT / "tests" / "slurm_probe.py"), *QUICK, "--model", "vgg16", "--train-limit", "80",
               "--data-dir", str(tiny_data), "--epochs", "2", "--output-dir", str(output), "--devices", "1",
               "--num-nodes", "2", "--requeue-signal", "SIGUSR1"]
    codes = signal_when_paused(command, (1, 2), logs, work, scontrol, probe, pause_at=1, signalled=(1,))
    assert codes == [143, 143], errors(logs)
    last = output / "vgg16" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"stopped by SIGUSR1 after epoch 1, after step 2: saved {last}" in (logs / "task0.err").read_text()
    assert load(last)["global_step"] == 2 and scontrol.calls() == [f"requeue {JOB_ID}"]


# --- one task: hpc_ckpt files, the default requeue signal ------------------------------------------


class _SignalAt(L.Callback):
    """Sends this process ``signum`` after training step ``step``, as SLURM's --signal would."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.slow
def test_hpc_checkpoints_are_never_written_nor_loaded(cli, tiny_data, tmp_path, monkeypatch, in_slurm, scontrol):
    """One SLURM task without --requeue-signal: SIGUSR1 saves last.ckpt and requeues; a planted
    hpc_ckpt in the working folder changes neither test.py's result nor a new run."""
    from run import build as run_build

    in_slurm()
    work, output = tmp_path / "work", tmp_path / "runs"
    work.mkdir()
    monkeypatch.chdir(work)
    real_callbacks = run_build.build_callbacks
    signal_at: list[_SignalAt] = []

    def build_callbacks(*args, **kwargs):
        callbacks = real_callbacks(*args, **kwargs)
        callbacks.all.extend(signal_at)
        return callbacks

    monkeypatch.setattr(run_build, "build_callbacks", build_callbacks)
    job = [*QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "2",
           "--run-name", f"slurm-{JOB_ID}", "--resume", "last"]
    run = output / "vgg16" / f"slurm-{JOB_ID}"

    signal_at.append(_SignalAt(signal.SIGUSR1, step=1))
    stopped = cli("train", *job)
    assert stopped.code == 143, stopped.err
    assert scontrol.calls() == [f"requeue {JOB_ID}"] and hpc_files(tmp_path) == []
    assert "requeue_signal: SIGUSR1" in (run / "config.yaml").read_text()  # the default under SLURM, recorded

    # hpc_ckpt_1.ckpt: the run's weights once it has trained, all zero. Lightning, under SLURM,
    # would load it for test.py and for a new run, neither of which names a checkpoint.
    signal_at.clear()
    in_slurm(restart=1)
    results = tmp_path / "results.json"
    finished = cli("train", *job, "--results-json", str(results))
    assert finished.code == 0, finished.err
    best = run / "checkpoints" / "best.ckpt"
    planted = plant_hpc_checkpoint(work, best)
    tested = cli("test", "--ckpt", str(best), "--data-dir", str(tiny_data), *CPU, "--eval-batch-size", "50",
                 "--json", str(tmp_path / "test.json"))
    assert tested.code == 0, tested.err
    test_loss = json.loads((tmp_path / "test.json").read_text())["loss"]
    assert test_loss == pytest.approx(json.loads(results.read_text())["test_loss"], rel=1e-6)
    assert not math.isclose(test_loss, math.log(10), rel_tol=1e-4)  # what the zeroed weights give

    fresh = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "1")
    assert fresh.code == 0, fresh.err
    new = load(output / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")
    assert new["global_step"] == 2 and any(bool(v.any()) for v in new["state_dict"].values())
    assert hpc_files(tmp_path) == [planted] and scontrol.calls() == [f"requeue {JOB_ID}"]


def test_trainer_under_slurm_ignores_hpc_checkpoints_and_leaves_the_requeue_to_us(tmp_path, in_slurm):
    """Lightning's SLURM environment without auto-requeue; an hpc_ckpt in its folder is no resume path."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.trainer.states import TrainerFn

    from run.build import build_trainer
    from run.config import build_config, merge

    in_slurm()
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"junk")
    trainer = build_trainer(build_config(merge({"accelerator": "cpu", "devices": 1})), logger=False, callbacks=[],
                            root_dir=tmp_path)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
    for fn in (TrainerFn.FITTING, TrainerFn.TESTING):
        assert trainer._checkpoint_connector._parse_ckpt_path(fn, None, model_provided=True, model_connected=True) is None


# --- the pieces ------------------------------------------------------------------------------------


def test_tasks_other_than_0_join_the_folder_that_task_0_announced(tmp_path, in_slurm):
    """Task 0 names the folder for this start of the job; a file of an earlier start is never read."""
    output, run = tmp_path / "runs", tmp_path / "runs" / "vgg16" / "version_3"
    run.mkdir(parents=True)
    in_slurm(rank=0, per_node=2, restart=1)
    earlier = output / f"{folder.ANNOUNCEMENT_PREFIX}{JOB_ID}.0.0.json"
    earlier.write_text(json.dumps({"run_dir": str(tmp_path / "elsewhere"), "resume": None, "error": None}))

    in_slurm(rank=1, per_node=2, restart=1)
    with pytest.raises(UserError, match=r"task 0 did not say which run folder to train within 0 s"):
        folder.join_run_dir(output, None, timeout=0.3)  # the earlier start's file is there, and ignored

    in_slurm(rank=0, per_node=2, restart=1)
    announced = folder.announce_run_dir(output, run, None)
    assert announced is not None and not earlier.exists()
    in_slurm(rank=1, per_node=2, restart=1)
    assert folder.join_run_dir(output, None, timeout=5) == run
    with pytest.raises(UserError, match=r"task 0 starts a new run"):
        folder.join_run_dir(output, run / "checkpoints" / "last.ckpt", timeout=5)
    folder.withdraw_announcement(announced)
    assert list(output.glob(".slurm-*")) == []

    # An error once the folder was announced would reach nobody: the others have joined.
    in_slurm(rank=0, per_node=2, restart=1)
    assert folder.announce_run_dir(output, error="diverged") is None and not announced.exists()

    # Task 0 refused the run: its other tasks stop with its reason, at once.
    in_slurm(rank=0, per_node=2, restart=2)
    with folder.hold_run(run), pytest.raises(UserError, match="being trained by another process") as refused:
        folder.check_not_in_use(run)
    in_slurm(rank=1, per_node=2, restart=2)
    with pytest.raises(UserError, match=r"^task 0 of this SLURM job stopped: run .* is being trained") as relayed:
        folder.join_run_dir(output, None, timeout=5)
    assert str(relayed.value).endswith(str(refused.value))
    # A single task has nobody to tell.
    in_slurm(rank=0)
    assert folder.announce_run_dir(output, run, None) is None


def test_a_run_held_by_task_0_is_not_refused_to_the_jobs_other_tasks(tmp_path, in_slurm):
    run = tmp_path / "vgg16" / "version_0"
    run.mkdir(parents=True)
    with folder.hold_run(run):
        in_slurm(rank=0, per_node=2)
        with pytest.raises(UserError, match="being trained by another process"):
            folder.check_not_in_use(run)
        in_slurm(rank=1, per_node=2)
        folder.check_not_in_use(run)


def test_slurm_detection_and_layout_checks(in_slurm, monkeypatch):
    """Detected as Lightning detects it; devices and nodes that do not match the job refused in one line."""
    in_slurm(rank=1, per_node=2, nodes=2, restart=3)
    task = slurm_task()
    assert task is not None and (task.global_rank, task.ntasks, task.attempt) == (1, 4, f"{JOB_ID}.3.0")
    check_layout(2, 2)
    with pytest.raises(UserError, match=r"^--devices 1, but this SLURM job runs 2 task\(s\) per node.*--devices 2"):
        check_layout(1, 2)
    with pytest.raises(UserError, match=r"^--num-nodes 1, but this SLURM job has 2 node\(s\)"):
        check_layout(2, 1)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    with pytest.raises(UserError, match="without --ntasks-per-node"):
        check_layout(2, 2)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    assert slurm_task() is None
    check_layout(1, 1)


def test_requeue_says_in_one_line_when_it_cannot(tmp_path, monkeypatch, scontrol):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert requeue("17").startswith("not requeued: scontrol is not on PATH; run scontrol requeue 17 yourself")
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    (failing / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(failing))
    message = requeue("17")
    assert message.startswith("not requeued: scontrol requeue 17 failed (Invalid job id specified)") and "\n" not in message
    monkeypatch.setenv("PATH", scontrol.path)
    assert requeue("17") == "requeued SLURM job 17 (scontrol requeue 17)" and scontrol.calls() == ["requeue 17"]


def test_every_rank_restores_its_own_rng_state_and_old_checkpoints_still_load():
    """A checkpoint's per-rank states go back to their own rank; a single state (before) to rank 0."""
    def on_rank(rank: int, world_size: int) -> ResumableRNG:
        callback = ResumableRNG()
        callback.setup(SimpleNamespace(global_rank=rank, world_size=world_size), None, "fit")
        return callback

    torch.manual_seed(1)
    first = capture_rng_state()
    torch.manual_seed(2)
    second = capture_rng_state()
    for rank, expected in enumerate((first, second)):
        on_rank(rank, 2).load_state_dict({"ranks": [first, second]})
        assert torch.equal(torch.get_rng_state(), expected["torch"])

    rank1 = on_rank(1, 2)  # seeded its own stream at setup, which an old single state leaves alone
    own = torch.get_rng_state()
    rank1.load_state_dict(first)
    assert torch.equal(torch.get_rng_state(), own) and not torch.equal(own, first["torch"])
    on_rank(0, 2).load_state_dict(first)
    assert torch.equal(torch.get_rng_state(), first["torch"])
    # One process: nothing reseeded, and its single state saved as before.
    torch.manual_seed(3)
    alone = on_rank(0, 1)
    assert torch.equal(alone.state_dict()["torch"], capture_rng_state()["torch"])


def test_loader_path_pins_memory_only_for_a_gpu(tiny_data, monkeypatch):
    from datamodules import CIFAR10DataModule
    from datamodules.augment import Placement

    datamodule = CIFAR10DataModule(tiny_data, batch_size=20, eval_batch_size=50, val_size=20, data_path="loader")
    datamodule.setup()
    for device, pinned in (("cpu", False), ("cuda", True)):
        monkeypatch.setattr(datamodule, "_placement", lambda d=device: Placement(torch.device(d)))
        loaders = datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()
        assert [loader.pin_memory for loader in loaders] == [pinned] * 3
    datamodule.pin_memory = False
    assert datamodule.train_dataloader().pin_memory is False
