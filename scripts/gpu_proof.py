#!/usr/bin/env python
"""The GPU proof in one command: CUDA tests, throughput, accuracy of the fast recipes, one archive.

Made for a GPU lent for minutes, with its own Python and PyTorch and nothing installable: it runs
from a plain checkout (no ``pip install``; every child gets the checkout on ``PYTHONPATH``) and
needs only the standard library itself. In order:

1. a preflight, in seconds: Python, torch, torchvision, lightning, torchmetrics and the other
   imports, CUDA (not with ``--dry-run``), that ``cli`` comes from this checkout, that the data
   archive and the course's loop exist and that the archive can be written; a problem is one
   line and exit code 2, before anything heavy;
2. the parts, most valuable first, each started only if its estimated time still fits
   (``--budget-s``, default 6 minutes for everything) and stopped with all its processes at the
   deadline: ``cuda-tests`` (``pytest -m gpu``), ``throughput`` (``benchmarks/throughput.py``,
   both course models against the course loop), then ``train.py`` runs through
   ``benchmarks/accuracy.py``: the fast recipes' seed 0 (vgg16_bn, vgg16, resnet50), then the
   recipe sweep (the screening candidates of ``benchmarks/screening/`` that the CPU could not
   settle: batch size, peak rate, classifier dropout, Cutout size; several runs at once on the one
   GPU), then seeds 1 and 2 of each recipe. The estimates come from what was measured: the
   throughput part's images/s on this GPU, then each finished run's own seconds (``--costs``
   starts from an earlier proof's ``costs.json``). A swept candidate that diverges (train.py's
   "training diverged", exit code 2) is a result, not a failure;
3. after every part, ``results.md`` (the table of parts with why any was skipped, the versions,
   the figures), ``costs.json``, the logs and JSON files are packed into ONE archive,
   ``$OUT/proof.tar.gz`` by default, so a run cut off still returns what finished. Checkpoints
   and run folders stay in ``--work-dir`` (the system's temporary folder), never in the archive.

    python3 scripts/gpu_proof.py          # reads .data/cifar10-jpeg.tar.gz and .data/seed_loop.py
    python3 scripts/gpu_proof.py --parts vgg16_bn-seeds recipe-sweep --costs .data/costs.json
    python scripts/gpu_proof.py --dry-run --archive /tmp/proof.tar.gz

``--dry-run`` runs the very same parts on the CPU with tiny sizes and generated data (one swept
rate made to diverge on purpose), which is how CI checks this script.

Exit codes: 0 when every part finished, diverged as recorded or was skipped; 1 when one failed
or was cut off at the deadline; 2 for bad input or a failed preflight; 143 (SIGTERM) or 130 (Ctrl-C)
when stopped, after packing what finished.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
PROG = "gpu_proof"
TARGET = "0.93"
PARTS = ("cuda-tests", "throughput", "vgg16_bn-seeds", "vgg16-seeds", "resnet50-seeds", "recipe-sweep")
MODELS = ("vgg16_bn", "vgg16", "resnet50")  # the fast recipes, most valuable first
# The checkpoint kinds of .gitignore: never packed, whatever folder they end up in.
HEAVY_SUFFIXES = {".ckpt", ".pt", ".pth", ".npz", ".safetensors", ".onnx"}
# Kept back from the budget for stopping a cut-off part (TERM, then KILL) and packing the archive.
RESERVE_S = 8.0
STOP_GRACE_S = 3.0
# cuda-tests may not take more than this share of the budget, so that throughput still runs.
TESTS_SHARE = 0.4


@dataclass(frozen=True)
class Sizes:
    """What the proof runs, on the GPU or (``--dry-run``) tiny on the CPU."""

    accelerator: str
    bench_models: tuple[str, ...]  # timed by benchmarks/throughput.py
    bench: tuple[str, ...]  # its flags
    repeats: int
    train_flags: tuple[str, ...]  # every train.py run, beside --epochs (below)
    seeds: dict[str, tuple[int, ...]]  # per model
    # Groups of screening candidates (benchmarks/screening/*.yaml), each group trained at once on
    # the one device, and the train.py flags of the group beyond train_flags.
    sweep: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    diverging: str | None  # the flag value of a group that must diverge (the dry run's check of that path)
    # Per run, for estimates before one is measured: (epochs, training images, evaluated images
    # per epoch: validation + the time-to-accuracy test pass, twice with flip TTA).
    epochs: int
    train_images: int
    eval_images: int
    # Guesses used only until measured (seconds); conservative.
    tests_s: float
    throughput_child_s: float
    run_start_s: float  # start-up, data decode, final test of one train.py run
    epoch_fixed_s: float  # checkpoints and figures at each epoch's end
    unmeasured_images_per_s: dict[str, float]  # when throughput did not run
    # The cuda-tests' cap: None for TESTS_SHARE of the budget; the dry run's CPU rehearsals have their own.
    tests_cap_s: float | None = None


GPU = Sizes(
    accelerator="gpu",
    bench_models=("vgg16", "resnet50"),
    bench=("--steps", "50", "--warmup", "15"),
    repeats=2,
    train_flags=("--time-to-accuracy", TARGET, "--accelerator", "gpu"),
    seeds={"vgg16_bn": (0, 1, 2), "vgg16": (0, 1, 2), "resnet50": (0, 1, 2)},
    # The choices the CPU left open at 40 epochs, most promising first; none that its screening or
    # a whole CPU run settled (docs/results.md).
    sweep=(
        (("vgg16_bn-b128-lr0.1-cutout8-dropout0", "vgg16_bn-b256-lr0.2-cutout8", "vgg16_bn-b128-lr0.1-cutout12"), ()),
        (("vgg16-b128-lr0.05-cutout8", "vgg16-b128-lr0.1", "resnet50-b128-lr0.1-cutout8"), ()),
        (("vgg16_bn-b512-lr0.2-cutout8", "vgg16_bn-b512-lr0.8-cutout8"), ()),
    ),
    diverging=None,
    epochs=40, train_images=45_000, eval_images=5_000 + 2 * 10_000,
    tests_s=120.0, throughput_child_s=15.0, run_start_s=40.0, epoch_fixed_s=2.5,
    unmeasured_images_per_s={"vgg16_bn": 5_000.0, "vgg16": 5_000.0, "resnet50": 2_000.0},
)
DRY = Sizes(
    accelerator="cpu",
    # One model is enough to rehearse the command; each process costs CI ~10 s of imports.
    bench_models=("vgg16",),
    bench=("--steps", "2", "--warmup", "1", "--batch-size", "20", "--workers", "0"),
    repeats=1,
    train_flags=("--train-limit", "40", "--val-size", "20", "--batch-size", "20",
                 "--eval-batch-size", "50", "--workers", "0", "--time-to-accuracy", TARGET, "--accelerator", "cpu"),
    # One run of each part: CI's time is short, and the planner's choices have unit tests.
    seeds={"vgg16_bn": (0,), "vgg16": (0,), "resnet50": (0,)},
    # Two candidates at once, then one made to diverge: --lr 1e30 makes the loss NaN within two
    # steps (tests/test_reliability.py).
    sweep=((("vgg16_bn-b512-lr0.2-cutout8", "vgg16_bn-b512-lr0.4-cutout0"), ()),
           (("vgg16_bn-b512-lr0.8-cutout8",), ("--lr", "1e30"))),
    diverging="1e30",
    epochs=1, train_images=40, eval_images=20 + 2 * 50,
    # The CPU rehearsals of tests/test_gpu.py took 320 s on 2 shared cores, 157 s of it the compiled
    # run's inductor compiles (benchmarks/results/gpu-tests-cpu-rehearsal.txt); the dry run's budget
    # grows by their cap, so that the parts after them still run.
    tests_s=320.0, tests_cap_s=480.0, throughput_child_s=15.0, run_start_s=15.0, epoch_fixed_s=1.0,
    unmeasured_images_per_s={"vgg16_bn": 20.0, "vgg16": 20.0, "resnet50": 10.0},
)
DEFAULT_BUDGET_S = 360.0
CONFIGS = {"vgg16_bn": "configs/vgg16_bn_fast.yaml", "vgg16": "configs/vgg16_fast.yaml",
           "resnet50": "configs/resnet50_fast.yaml"}
SCREENING = "benchmarks/screening"
# A model the throughput part does not time is estimated at the speed of one it does.
SPEED_OF = {"vgg16_bn": "vgg16"}
# A forward pass (validation, test) is about three times faster per image than a training step.
EVAL_SPEEDUP = 3.0
MEASURED_MARGIN = 1.1  # on a measured cost repeated
FORMULA_MARGIN = 1.25  # on a cost computed from throughput only


class ProofError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: stop the part running, pack what there is, exit."""


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One train.py run (through benchmarks/accuracy.py): what its cost is estimated from."""

    model: str
    config: str
    seed: int
    tag: str = ""  # benchmarks/accuracy.py's --tag, for flags beyond the config's
    sweep: bool = False  # a candidate of the recipe sweep (a divergence is then a result)
    expect_diverge: bool = False


@dataclass
class Item:
    """One row of the table: a command, its estimate when it was planned, what became of it."""

    name: str
    part: str  # one of PARTS
    command: list[str]
    runs: list[Run] = field(default_factory=list)  # train.py runs, several at once in a sweep group
    cap_s: float | None = None  # at most this long, even with budget left
    estimate_s: float = 0.0
    basis: str = ""
    outcome: str = "not run"
    seconds: float = 0.0
    log: str = ""  # relative to the results folder


@dataclass
class Costs:
    """What was measured so far, the planner's only source besides the conservative guesses."""

    seconds: dict[str, float] = field(default_factory=dict)  # per finished item name
    images_per_s: dict[str, float] = field(default_factory=dict)  # per model, ours in Lightning
    throughput_child_s: float | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)  # finished train runs: model, config, epochs, seconds

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "images_per_s": self.images_per_s,
                "throughput_child_s": self.throughput_child_s, "runs": self.runs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Costs:
        return cls(seconds=dict(data.get("seconds", {})), images_per_s=dict(data.get("images_per_s", {})),
                   throughput_child_s=data.get("throughput_child_s"), runs=list(data.get("runs", [])))


def build_items(parts: Sequence[str], sizes: Sizes, paths: dict[str, Path], seed_loop: Path | None,
                budget_s: float) -> list[Item]:
    """The items of ``parts`` in order of value: tests, throughput, one run per model, then spread, sweep."""
    py = sys.executable
    results, runs, data = paths["results"], paths["runs"], paths["data"]
    items: list[Item] = []
    if "cuda-tests" in parts:
        # On the GPU its CUDA tests; in a dry run on the CPU the same bodies, as their CPU rehearsals.
        selected = "rehearsal" if sizes.accelerator == "cpu" else "not rehearsal"
        items.append(Item("cuda-tests", "cuda-tests", [
            py, "-m", "pytest", "-m", "gpu", "-k", selected, "-v", "-p", "no:cacheprovider", f"--basetemp={runs / 'pytest'}",
            f"--junitxml={results / 'cuda-tests.xml'}", "--durations=0", "tests/test_gpu.py"],
            cap_s=sizes.tests_cap_s if sizes.tests_cap_s is not None else TESTS_SHARE * budget_s))
    if "throughput" in parts:
        variants = ["seed_loop", "lightning", "bare"] if seed_loop else ["lightning", "bare"]
        command = [py, "-m", "benchmarks.throughput", "--models", *sizes.bench_models, "--variants", *variants,
                   *sizes.bench, "--repeats", str(sizes.repeats), "--data", str(data),
                   "--accelerator", sizes.accelerator, "--out", str(results / "throughput.json")]
        if seed_loop:
            command += ["--seed-loop", str(seed_loop)]
        items.append(Item("throughput", "throughput", command))

    def accuracy(folder: str, configs: Sequence[str], seed: int, flags: Sequence[str] = (), tag: str = "") -> list[str]:
        command = [py, "-m", "benchmarks.accuracy", "--configs", *configs, "--seeds", str(seed), "--data-dir", str(data),
                   "--runs-dir", str(runs / folder), "--out", str(results / folder)]
        if len(configs) > 1:
            command += ["--parallel", str(len(configs))]
        # --epochs always: the screening candidates hold no epoch count of their own (the screening
        # gives it), and the estimates assume sizes.epochs.
        return command + (["--tag", tag] if tag else []) + ["--", "--epochs", str(sizes.epochs), *sizes.train_flags, *flags]

    def seed_run(model: str, seed: int) -> Item:
        run = Run(model, CONFIGS[model], seed)
        return Item(f"{model}-seed{seed}", f"{model}-seeds", accuracy("accuracy", [CONFIGS[model]], seed), [run])

    def sweep_group(number: int, names: Sequence[str], flags: Sequence[str]) -> Item:
        configs = [f"{SCREENING}/{name}.yaml" for name in names]
        tag = "".join(flags).lstrip("-").replace("--", "-") if flags else ""
        diverges = bool(flags) and sizes.diverging in flags
        group = [Run(name.split("-", 1)[0], config, 0, tag, sweep=True, expect_diverge=diverges)
                 for name, config in zip(names, configs)]
        return Item(f"sweep-{number}", "recipe-sweep", accuracy("recipe-sweep", configs, 0, flags, tag), group)

    first = [seed_run(model, sizes.seeds[model][0]) for model in MODELS if f"{model}-seeds" in parts]
    sweep = [sweep_group(n, names, flags) for n, (names, flags) in enumerate(sizes.sweep, 1)] if "recipe-sweep" in parts else []
    more = [seed_run(model, seed) for model in MODELS if f"{model}-seeds" in parts for seed in sizes.seeds[model][1:]]
    return items + first + sweep + more


def _run_estimate(run: Run, costs: Costs, sizes: Sizes) -> tuple[float, str]:
    """Seconds one train.py run of ``run`` will likely take alone, and what that rests on."""
    same = [r["seconds"] for r in costs.runs if r["config"] == run.config]
    if same:
        return MEASURED_MARGIN * max(same), f"{run.config} measured {max(same):.0f} s"
    speed_model = run.model if run.model in costs.images_per_s else SPEED_OF.get(run.model, run.model)
    images_per_s, measured = costs.images_per_s.get(speed_model), True
    if images_per_s is None:
        images_per_s, measured = sizes.unmeasured_images_per_s[run.model], False
    compute = sizes.epochs * (sizes.train_images + sizes.eval_images / EVAL_SPEEDUP) / images_per_s
    # Everything else a run spends (start-up, checkpoints, figures): from another config's measured run if any.
    others = [r for r in costs.runs if r["model"] in costs.images_per_s]
    if others and measured:
        other = max(others, key=lambda r: r["seconds"])
        other_compute = other["epochs"] * (sizes.train_images + sizes.eval_images / EVAL_SPEEDUP) / costs.images_per_s[other["model"]]
        # At least the guessed start-up: the benchmark's batch of 100 may be slower per image than a
        # run's, which would make the measured run look as if it had spent nothing else.
        overhead = max((other["seconds"] - other_compute) * sizes.epochs / max(other["epochs"], 1), sizes.run_start_s)
        source = f"the rest as {other['config']}'s measured run"
    else:
        overhead = sizes.run_start_s + sizes.epochs * sizes.epoch_fixed_s
        source = f"{sizes.run_start_s:.0f} s start + {sizes.epoch_fixed_s:g} s/epoch guessed"
    speed = f"{images_per_s:,.0f} img/s {'measured' if measured else 'assumed (no throughput measured)'}"
    epochs = f"{sizes.epochs} epoch" + ("s" if sizes.epochs != 1 else "")
    return FORMULA_MARGIN * (compute + overhead), f"{epochs} at {speed}, {source}"


def estimate(item: Item, costs: Costs, sizes: Sizes) -> tuple[float, str]:
    """Seconds ``item`` will likely take, and what that figure rests on (for the table)."""
    if item.name in costs.seconds:
        return MEASURED_MARGIN * costs.seconds[item.name], f"measured {costs.seconds[item.name]:.0f} s before"
    if item.part == "cuda-tests":
        return sizes.tests_s, "a guess: not measured yet"
    if item.part == "throughput":
        children = len(sizes.bench_models) * (3 if "seed_loop" in item.command else 2) * sizes.repeats
        if costs.throughput_child_s is not None:
            return (MEASURED_MARGIN * children * costs.throughput_child_s,
                    f"{children} processes at {costs.throughput_child_s:.0f} s measured")
        return children * sizes.throughput_child_s, f"a guess: {children} processes at {sizes.throughput_child_s:.0f} s"
    estimates = [_run_estimate(run, costs, sizes) for run in item.runs]
    if len(estimates) == 1:
        return estimates[0]
    # Runs at once share the device: as long as one after the other until a group was measured.
    return sum(seconds for seconds, _ in estimates), f"{len(estimates)} runs at once, no faster than in turn: " + (
        "; ".join(basis for _, basis in estimates))


def classify(item: Item, returncode: int | None, cut_off: bool, output: str, train_logs: dict[str, str]) -> str:
    """The outcome of a finished command: done, diverged (a sweep's result), failed, or cut off.

    ``train_logs``: each run's train.py log by config. A sweep candidate that diverged
    (train.py's exit code 2, "training diverged") is a result; any other failure fails the item.
    """
    if cut_off:
        return "cut off at the deadline (all its processes stopped)"
    diverged = []
    for run in item.runs:
        log = train_logs.get(run.config, "")
        name = run_files(run, Path())[0].stem
        if run.sweep and "training diverged" in log and re.search(rf"{re.escape(name)} FAILED \(exit code 2\b", output):
            line = next((line for line in log.splitlines() if "training diverged" in line), "")
            # "...: error: training diverged: the loss became NaN ... (epoch 0); stopped without ...": the what.
            what = line.split("training diverged", 1)[-1].lstrip(": ").split(";", 1)[0].strip()
            diverged.append(f"{Path(run.config).stem}" + (f" ({what})" if what else ""))
    failures = len(re.findall(r" FAILED \(exit code", output))
    if returncode != 0 and (not diverged or failures > len(diverged)):
        return f"failed (exit code {returncode})"
    expected = [Path(run.config).stem for run in item.runs if run.expect_diverge]
    if expected and not diverged:
        return f"failed: {', '.join(expected)} was expected to diverge (the dry run's check of that path)"
    return "diverged: " + "; ".join(diverged) if diverged else "done"


def learn(item: Item, results: Path, costs: Costs) -> None:
    """Add what a finished item measured to ``costs``."""
    if item.outcome != "done" and not item.outcome.startswith("diverged"):
        return
    costs.seconds[item.name] = item.seconds
    if item.part == "throughput":
        report = json.loads((results / "throughput.json").read_text())
        for model, variants in report.get("models", {}).items():
            speed = variants.get("lightning", {}).get("images_per_s")
            if speed:
                costs.images_per_s[model] = float(speed)
        children = sum(len([v for v in variants if v not in ("ratios", "ratios_per_round")])
                       for variants in report.get("models", {}).values()) * int(report.get("settings", {}).get("repeats", 1))
        costs.throughput_child_s = item.seconds / max(children, 1)
    for run in item.runs:
        results_json, _ = run_files(run, results)
        data = json.loads(results_json.read_text()) if results_json.is_file() else {}
        if data:
            # Each run's own wall time (under --parallel, shared with the others of its group).
            costs.runs.append({"item": item.name, "model": run.model, "config": run.config,
                               "epochs": data.get("epochs_trained") or 1,
                               "seconds": round(data.get("runner", {}).get("wall_s", item.seconds), 1)})


def run_files(run: Run, results: Path) -> tuple[Path, Path]:
    """The JSON and train.py log that benchmarks/accuracy.py writes for ``run`` (its run_name)."""
    folder = results / ("recipe-sweep" if run.sweep else "accuracy")
    clean = lambda text: "".join(c if c.isalnum() or c in "-_." else "_" for c in text)  # noqa: E731
    name = f"{clean(Path(run.config).stem)}-" + (f"{clean(run.tag)}-" if run.tag else "") + f"seed{run.seed}"
    return folder / f"{name}.json", folder / f"{name}.log"


def run_plan(items: Sequence[Item], costs: Costs, sizes: Sizes, deadline: float,
             execute: Callable[[Item, float], None], after_each: Callable[[Item], None],
             now: Callable[[], float] = time.monotonic) -> None:
    """Run each item whose estimate fits the time left, in order; the others are skipped, saying why.

    ``execute(item, stop_at)`` runs one and fills its outcome and seconds; ``after_each`` (the
    table and the archive) follows every item, run or skipped.
    """
    for item in items:
        left = deadline - now()
        item.estimate_s, item.basis = estimate(item, costs, sizes)
        if item.estimate_s > left:
            item.outcome = f"skipped: needs about {item.estimate_s:.0f} s, {max(left, 0):.0f} s left"
        else:
            stop_at = deadline if item.cap_s is None else min(deadline, now() + item.cap_s)
            execute(item, stop_at)
            if item.outcome.startswith("cut off") and stop_at < deadline:
                item.outcome = f"cut off at its cap of {item.cap_s:.0f} s (all its processes stopped)"
        after_each(item)


# --- child processes -----------------------------------------------------------------------------


def child_env(dry_run: bool, runs: Path) -> dict[str, str]:
    """The environment of every child: this checkout first on PYTHONPATH, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        # The decode cache of generated images would only litter the user's ~/.cache.
        env["XDG_CACHE_HOME"] = str(runs / "cache")
    return env


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc (Linux; elsewhere: [pgid] while signallable)."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def stop_group(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> list[int]:
    """SIGTERM the whole process group of ``process``, SIGKILL what remains; the pids still alive."""
    pgid = process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            if process.poll() is not None and not _group_members(pgid):
                break
            time.sleep(0.05)
    process.poll()
    return _group_members(pgid)


def run_command(command: Sequence[str], log: Path, stop_at: float, env: dict[str, str] | None = None,
                grace_s: float = STOP_GRACE_S) -> tuple[int | None, bool, float]:
    """Run ``command`` from the checkout in a process group of its own, output appended to ``log``.

    Returns (exit code, cut off, seconds). At ``stop_at`` (time.monotonic) the whole group is
    stopped, grandchildren included (a pytest's or accuracy.py's train.py); after a normal exit
    any process of the group still running is stopped too. ``Stopped`` (a signal to this script)
    stops the group the same way, then propagates.
    """
    start = time.monotonic()
    # A process group, not a session (setsid): a session's processes would survive this script
    # being killed outright; a group is still in ours, yet can be signalled as one.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    with log.open("ab") as sink:
        sink.write(f"\n$ {shlex.join(command)}\n".encode())
        sink.flush()
        process = subprocess.Popen(list(command), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT, **group)
        cut_off = False
        try:
            process.wait(timeout=max(stop_at - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            cut_off = True
        finally:
            left = stop_group(process, grace_s) if process.poll() is None or cut_off else stop_group(process, 0.5)
            if left:
                sink.write(f"\n[{PROG}: processes {left} of this part did not stop]\n".encode())
    return process.returncode, cut_off, time.monotonic() - start


def _on_signal(signum: int, frame: object) -> NoReturn:
    raise Stopped(signal.Signals(signum).name)


# --- preflight -----------------------------------------------------------------------------------

# Run as a child with the children's environment, so that it sees what they will see.
PREFLIGHT = r"""
import importlib, importlib.metadata, importlib.util, json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable, "versions": {}, "problems": []}
# Module name: distribution name, whose metadata has the version where the module has none.
for name, dist in (("torch", "torch"), ("torchvision", "torchvision"), ("lightning", "lightning"),
                   ("torchmetrics", "torchmetrics"), ("numpy", "numpy"), ("PIL", "pillow"), ("yaml", "pyyaml"),
                   ("matplotlib", "matplotlib"), ("tensorboard", "tensorboard"), ("filelock", "filelock"),
                   ("rich", "rich"), ("pytest", "pytest")):
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        info["problems"].append(f"cannot import {name} ({type(exc).__name__}: {exc})")
        continue
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
    info["versions"][name] = str(version)
try:
    import captum
except Exception as exc:
    info["captum"] = None
    info["captum_error"] = f"{type(exc).__name__}: {exc}"
else:
    info["captum"] = str(getattr(captum, "__version__", "?"))
spec = importlib.util.find_spec("cli")
info["cli"] = spec.origin if spec else None
if "torch" in info["versions"]:
    import torch
    cuda = torch.cuda.is_available()
    info["cuda"] = {"available": cuda, "torch_cuda": torch.version.cuda,
                    "devices": torch.cuda.device_count() if cuda else 0,
                    "name": torch.cuda.get_device_name(0) if cuda else None,
                    "bf16": bool(torch.cuda.is_bf16_supported()) if cuda else None}
print(json.dumps(info))
"""
# Whether `cli` imports with this checkout neither on the path nor the working folder: installed.
INSTALLED = "import importlib.util, json; s = importlib.util.find_spec('cli'); print(json.dumps(s and s.origin))"


def preflight(env: dict[str, str], dry_run: bool, require_bare: bool) -> dict[str, Any]:
    """Versions and CUDA as the children see them; ProofError (one line) on any problem."""
    done = subprocess.run([sys.executable, "-c", PREFLIGHT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProofError(f"preflight: {sys.executable} could not run the import check ({last})")
    info = json.loads(lines[-1])
    if info["problems"]:
        raise ProofError(f"preflight: {'; '.join(info['problems'])}: this Python ({info['executable']}) lacks a "
                         "package the project needs (carry it as a wheel, or use the environment of README's set-up)")
    cli = info["cli"]
    if cli is None or ROOT not in Path(cli).resolve().parents:
        raise ProofError(f"preflight: the project's 'cli' imports from {cli}, not from this checkout {ROOT}; "
                         "run this script from the checkout it belongs to")
    bare_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    outside = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    if outside:
        bare_env["PYTHONPATH"] = os.pathsep.join(outside)
    installed = subprocess.run([sys.executable, "-c", INSTALLED], cwd=tempfile.gettempdir(), env=bare_env,
                               capture_output=True, text=True, timeout=60, check=False)
    info["installed"] = json.loads(installed.stdout.strip().splitlines()[-1]) if installed.returncode == 0 else None
    if require_bare and info["installed"]:
        raise ProofError(f"preflight: --require-bare, but the project is installed here (cli from {info['installed']}); "
                         "run it in an environment without this project's pip install")
    if require_bare and info["captum"] is not None:
        raise ProofError(f"preflight: --require-bare, but captum {info['captum']} imports here; "
                         "run it where captum cannot be imported")
    if not dry_run and not info["cuda"]["available"]:
        raise ProofError(f"preflight: CUDA is not available to torch {info['versions']['torch']} "
                         f"(built for CUDA {info['cuda']['torch_cuda']}); run on a GPU machine, or pass --dry-run")
    return info


# --- the report ----------------------------------------------------------------------------------


def table(items: Sequence[Item], info: dict[str, Any], results: Path, budget_s: float, dry_run: bool) -> str:
    """results.md: versions, what each part did (or why not), then the throughput and accuracy tables."""
    versions = info.get("versions", {})
    cuda = info.get("cuda") or {}
    device = cuda.get("name") or "no CUDA device"
    lines = ["# GPU proof" + (" (dry run on the CPU)" if dry_run else ""), "",
             f"Python {info.get('python')}, " + ", ".join(f"{name} {version}" for name, version in versions.items())
             + f"; captum {info.get('captum') or 'absent'}; CUDA {cuda.get('torch_cuda')}, {device}; "
             f"project {'installed at ' + str(info['installed']) if info.get('installed') else 'not installed'}, "
             f"cli from {info.get('cli')}; budget {budget_s:.0f} s.", "",
             "| part | outcome | estimate (s) | estimated from | seconds |", "| --- | --- | ---: | --- | ---: |"]
    for item in items:
        estimate_s = f"{item.estimate_s:.0f}" if item.basis else ""
        lines.append(f"| {item.name} | {item.outcome} | {estimate_s} | {item.basis} | {item.seconds:.0f} |")
    throughput = results / "throughput.json"
    if throughput.is_file():
        report = json.loads(throughput.read_text())
        settings = report["settings"]
        lines += ["", f"## Throughput ({report['device']}, batch {settings['batch_size']}, {settings['precision']}, "
                      f"median of {settings.get('repeats', 1)})", "",
                  "| model | variant | images/s | min | max |", "| --- | --- | ---: | ---: | ---: |"]
        for model, results_of in report["models"].items():
            for variant, result in results_of.items():
                if isinstance(result, dict) and "images_per_s" in result:
                    lines.append(f"| {model} | {variant} | {result['images_per_s']:.0f} | "
                                 f"{result.get('images_per_s_min', 0):.0f} | {result.get('images_per_s_max', 0):.0f} |")
            lines += [f"| {model} | {name} | {value} | | |" for name, value in results_of.get("ratios", {}).items()]
    for folder in ("accuracy", "recipe-sweep"):
        summary = results / folder / "results.md"
        if summary.is_file():
            lines += ["", f"## {folder} (from {folder}/summary.json)", "", summary.read_text().strip()]
    return "\n".join(lines) + "\n"


def pack(results: Path, archive: Path) -> None:
    """Write ``results`` (no checkpoints) into ``archive`` as ``proof/...``, replacing it whole."""
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(results.rglob("*")):
            if path.is_file() and path.suffix not in HEAVY_SUFFIXES:
                tar.add(path, arcname=str(Path("proof") / path.relative_to(results)))
    os.replace(partial, archive)


# --- the command ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as the project's other commands
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / ".data" / "cifar10-jpeg.tar.gz",
                        help="CIFAR-10 (train.py's --data-dir); generated with --dry-run")
    parser.add_argument("--seed-loop", type=Path, default=ROOT / ".data" / "seed_loop.py",
                        help="the course's training loop, the throughput yardstick (optional with --dry-run)")
    parser.add_argument("--no-seed-loop", action="store_true", help="time ours only, without the course's loop")
    parser.add_argument("--archive", type=Path, help="the one archive of results (default: $OUT/proof.tar.gz)")
    parser.add_argument("--work-dir", type=Path, help="results and run folders with checkpoints (default: a new "
                        "folder in the system's temporary folder); never inside $OUT")
    parser.add_argument("--budget-s", type=float, help="seconds for everything, preflight included (default "
                        f"{DEFAULT_BUDGET_S:.0f}; with --dry-run that plus the CPU rehearsals' cap, {DRY.tests_cap_s:.0f})")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (in the order of value)")
    parser.add_argument("--costs", type=Path, help="an earlier proof's costs.json: start from what it measured")
    parser.add_argument("--dry-run", action="store_true", help="the same parts on the CPU, tiny sizes, generated data")
    parser.add_argument("--require-bare", action="store_true",
                        help="fail unless this project is not pip-installed and captum cannot be imported "
                             "(CI's rehearsal of a lent GPU machine)")
    return parser


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_inputs(args: argparse.Namespace) -> tuple[Path, Path | None, Costs]:
    """Flag and file problems, before anything is started: (archive, seed loop or None, costs)."""
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S + ((DRY.tests_cap_s or 0.0) if args.dry_run else 0.0)
    if not args.budget_s > 0:
        raise ProofError(f"--budget-s {args.budget_s:g}: give a positive number of seconds (default 360)")
    out = os.environ.get("OUT")
    archive = args.archive or (Path(out) / "proof.tar.gz" if out else None)
    if archive is None:
        raise ProofError("no place for the results: pass --archive PATH.tar.gz (or set OUT to a folder)")
    if not args.dry_run and not args.data.exists():
        raise ProofError(f"--data {args.data}: CIFAR-10 not found; copy the archive there or pass --data PATH")
    seed_loop = None if args.no_seed_loop else args.seed_loop.resolve()
    if seed_loop is not None and not seed_loop.is_file():
        if not args.dry_run or args.seed_loop != build_parser().get_default("seed_loop"):
            raise ProofError(f"--seed-loop {args.seed_loop}: the course's training loop not found; "
                             "copy it there, pass --seed-loop PATH, or --no-seed-loop")
        seed_loop = None  # a dry run without it times ours only
    if out and args.work_dir is not None and _inside(args.work_dir, Path(out)):
        raise ProofError(f"--work-dir {args.work_dir} is inside $OUT ({out}): only the archive should go there")
    if args.work_dir is not None and (args.work_dir / "results").is_dir() and any((args.work_dir / "results").iterdir()):
        raise ProofError(f"--work-dir {args.work_dir} already holds a proof's results; pass a new or empty folder")
    costs = Costs()
    if args.costs is not None:
        try:
            costs = Costs.from_json(json.loads(args.costs.read_text()))
        except (OSError, ValueError, AttributeError) as exc:
            raise ProofError(f"--costs {args.costs}: not an earlier proof's costs.json ({exc})") from None
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=archive.parent, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ProofError(f"cannot write the archive into {archive.parent} ({exc.strerror}); pass --archive "
                         "to a writable place") from None
    return archive.resolve(), seed_loop, costs


def main(argv: Sequence[str] | None = None) -> int:
    start = time.monotonic()
    args = build_parser().parse_args(argv)
    archive, seed_loop, costs = check_inputs(args)
    deadline = start + args.budget_s - RESERVE_S
    sizes = DRY if args.dry_run else GPU
    # Absolute: the children run from the checkout, whatever folder this was started in.
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-proof-"))).resolve()
    results, runs = work / "results", work / "runs"
    results.mkdir(parents=True, exist_ok=True)
    (results / "logs").mkdir(exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    env = child_env(args.dry_run, runs)
    try:
        info = preflight(env, args.dry_run, args.require_bare)
    except ProofError:
        if args.work_dir is None:  # ours, still empty: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    (results / "preflight.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"[{time.monotonic() - start:5.0f} s] preflight: Python {info['python']}, torch {info['versions']['torch']}, "
          f"lightning {info['versions']['lightning']}, captum {info['captum'] or 'absent'}, "
          f"{(info.get('cuda') or {}).get('name') or 'no CUDA device'}; results in {results}, runs in {runs}", flush=True)
    if args.dry_run:
        data = runs / "tiny-data"
        subprocess.run([sys.executable, "-c", "import sys; from fakedata import make_image_folder; "
                        "make_image_folder(sys.argv[1], 12, 5)", str(data)], cwd=ROOT, check=True,
                       env={**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), env["PYTHONPATH"]])})
    else:
        data = args.data.resolve()
    items = build_items(args.parts, sizes, {"results": results, "runs": runs, "data": data}, seed_loop, args.budget_s)

    def execute(item: Item, stop_at: float) -> None:
        log = results / "logs" / f"{item.name}.log"
        item.log = str(log.relative_to(results))
        print(f"[{time.monotonic() - start:5.0f} s] {item.name}: started, about {item.estimate_s:.0f} s "
              f"({item.basis})", flush=True)
        item.outcome, started = "running", time.monotonic()
        try:
            code, cut_off, item.seconds = run_command(item.command, log, stop_at, env)
        finally:
            item.seconds = time.monotonic() - started
        output = log.read_text(errors="replace")
        train_logs = {}
        for run in item.runs:
            run_log = run_files(run, results)[1]
            train_logs[run.config] = run_log.read_text(errors="replace") if run_log.is_file() else ""
        item.outcome = classify(item, code, cut_off, output, train_logs)
        learn(item, results, costs)

    def write_report() -> None:
        (results / "results.md").write_text(table(items, info, results, args.budget_s, args.dry_run))
        (results / "costs.json").write_text(json.dumps(costs.to_json(), indent=2) + "\n")
        pack(results, archive)

    def after_each(item: Item) -> None:
        print(f"[{time.monotonic() - start:5.0f} s] {item.name}: {item.outcome} ({item.seconds:.0f} s)", flush=True)
        write_report()

    # Put back afterwards: main() also runs inside other programs (the tests), whose handlers stay theirs.
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    stopped = None
    try:
        run_plan(items, costs, sizes, deadline, execute, after_each)
    except Stopped as exc:
        stopped = str(exc)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # packing what there is must not be cut short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for item in items:
            if item.outcome == "running":
                item.outcome = f"stopped by {stopped} after {item.seconds:.0f} s (all its processes stopped)"
            elif item.outcome == "not run":
                item.outcome = f"not run: the proof was stopped by {stopped}"
        print(f"[{time.monotonic() - start:5.0f} s] stopped by {stopped}", flush=True)
        write_report()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print((results / "results.md").read_text(), end="")
    print(f"archive: {archive} ({archive.stat().st_size / 1024:.0f} KiB); checkpoints stay in {runs}")
    if stopped:
        return 130 if stopped == "SIGINT" else 143
    ok = all(item.outcome == "done" or item.outcome.startswith(("skipped", "diverged")) for item in items)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ProofError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Stopped):  # before the plan started: nothing to pack yet
        print(f"{PROG}: interrupted", file=sys.stderr)
        sys.exit(130)
