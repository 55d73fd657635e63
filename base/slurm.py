"""SLURM: which task of which job this process is, from the variables ``srun`` sets; the job's requeue.

Under ``srun`` every task runs the whole command, so the tasks must agree on who does what once
(rank 0 creates the run folder, requeues the job). SLURM is detected exactly as Lightning's
``SLURMEnvironment.detect`` detects it, so that this code and the Trainer never disagree: ``SLURM_NTASKS``
is set and the job is not named ``bash`` or ``interactive`` (an interactive allocation, in which
processes are started some other way). Nothing here loads torch or Lightning.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from base.errors import UserError

# Lightning's own rule (lightning.fabric.plugins.environments.slurm._is_slurm_interactive_mode).
INTERACTIVE_JOB_NAMES = ("bash", "interactive")
# What this project requeues on under SLURM when no --requeue-signal is given: Lightning's default,
# which Lightning users expect (#SBATCH --signal=USR1@SECONDS).
DEFAULT_REQUEUE_SIGNAL = "SIGUSR1"


@dataclass(frozen=True)
class SlurmTask:
    """One task of a SLURM job step.

    ``attempt`` tells apart the starts of one job (``SLURM_RESTART_COUNT``, 0 before any requeue)
    and its steps (``SLURM_STEP_ID``): the key of what the tasks of one start share, and of nothing
    from an earlier start.
    """

    job_id: str
    restart_count: int
    step_id: str
    global_rank: int
    ntasks: int

    @property
    def attempt(self) -> str:
        return f"{self.job_id}.{self.restart_count}.{self.step_id}"


def slurm_task(environ: Mapping[str, str] | None = None) -> SlurmTask | None:
    """This process's task, when SLURM is detected as Lightning detects it; None otherwise."""
    env = os.environ if environ is None else environ
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return None
    return SlurmTask(
        job_id=env.get("SLURM_JOB_ID", ""),
        restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
        step_id=env.get("SLURM_STEP_ID", "batch"),
        global_rank=_int(env, "SLURM_PROCID", 0),
        ntasks=_int(env, "SLURM_NTASKS", 1),
    )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    return int(value) if value.strip().isdigit() else default


def check_layout(devices: int, num_nodes: int, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, in one line, devices and nodes that do not match the SLURM job's tasks.

    Under SLURM, Lightning starts no processes: each task is one, so ``--devices`` must be the
    tasks per node and ``--num-nodes`` the nodes. Lightning checks the same (``SLURMEnvironment``
    ``validate_settings`` and ``_validate_srun_variables``), but only once the Trainer is built,
    with a traceback and its own parameter names. Nothing to check outside SLURM or in an
    interactive allocation. Raises ``UserError``.
    """
    env = os.environ if environ is None else environ
    task = slurm_task(env)
    if task is None:
        return
    per_node, nodes = env.get("SLURM_NTASKS_PER_NODE"), env.get("SLURM_NNODES")
    if task.ntasks > 1 and per_node is None:
        raise UserError(
            f"this SLURM job runs {task.ntasks} tasks without --ntasks-per-node, which Lightning cannot lay out; "
            "request --nodes=N --ntasks-per-node=GPUS_PER_NODE instead of --ntasks"
        )
    if per_node is not None and per_node.isdigit() and int(per_node) != devices:
        raise UserError(
            f"--devices {devices}, but this SLURM job runs {per_node} task(s) per node, one per device; "
            f"give --devices {per_node}, or request --ntasks-per-node={devices}"
        )
    if nodes is not None and nodes.isdigit() and int(nodes) != num_nodes:
        raise UserError(
            f"--num-nodes {num_nodes}, but this SLURM job has {nodes} node(s); give --num-nodes {nodes}, "
            f"or request --nodes={num_nodes}"
        )


def requeue(job_id: str) -> str:
    """Ask SLURM to requeue ``job_id`` (``scontrol requeue JOBID``); one line saying what happened.

    Never raises: the run is saved already, and a failed requeue only means the job must be
    submitted again by hand, which the line says.
    """
    by_hand = "submit the job again to continue (the same command resumes the run)"
    if not job_id:
        return f"not requeued: SLURM_JOB_ID is not set; {by_hand}"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"not requeued: scontrol is not on PATH; run scontrol requeue {job_id} yourself, or {by_hand}"
    try:
        done = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not requeued: scontrol requeue {job_id} failed ({exc}); {by_hand}"
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split())[:200] or f"exit code {done.returncode}"
        return f"not requeued: scontrol requeue {job_id} failed ({said}); {by_hand}"
    return f"requeued SLURM job {job_id} (scontrol requeue {job_id})"


def process_rank() -> int:
    """This process's global rank in a multi-process run, 0 when alone (for what only one process says).

    Lightning's own once it has set it (``rank_zero_only.rank``, when Lightning is loaded: it is
    not imported here, or every command would wait for it), else the launchers' variables
    (torchrun's ``RANK``, SLURM's ``SLURM_PROCID``, Lightning's ``LOCAL_RANK`` and ``NODE_RANK``
    of the processes it starts).
    """
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    rank = getattr(getattr(rank_zero, "rank_zero_only", None), "rank", None)
    if isinstance(rank, int):
        return rank
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1 if any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK")) else 0
