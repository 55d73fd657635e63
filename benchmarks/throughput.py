#!/usr/bin/env python
"""Training throughput of our pipeline against the course's plain loop (its script, seed_loop.py).

For each model it times N training steps after W warm-up steps, on one device, in three ways:

* ``seed_loop``: the yardstick, the course's script unmodified (``--seed-loop``, default
  ``.data/seed_loop.py``: PIL augmentation per image, a DataLoader, fp32);
* ``lightning``: our pipeline through Lightning, as train.py builds it (data path, precision,
  channels_last, optional compile, our progress bar, logger and loss guard; no checkpoints,
  which are written at epoch ends only);
* ``bare``: the same model, data and ``training_step`` in a plain loop without Lightning, so
  that ``lightning`` against ``bare`` is Lightning's own overhead.

Each runs in its own process (clean peak memory and caches), from the repository root, and the
variants are interleaved over ``--repeats`` rounds (seed_loop, lightning, bare, seed_loop, ...)
so that a machine that slows down or speeds up affects all of them alike; each variant's
figure is the median over the rounds, with its minimum and maximum, and each ratio is the median
of the per-round ratios. A run reports images/second over the timed steps (the clock starts after step W, with a CUDA sync on
GPUs, as seed_loop's does), the peak resident memory of that process and, on CUDA, its peak
allocated GPU memory. Prints a table and a JSON document; ``--out`` also writes the JSON.

    python -m benchmarks.throughput --out benchmarks/results/cpu.json
    python -m benchmarks.throughput --models resnet50 --steps 5 --warmup 2

(from the repository root; ``python benchmarks/throughput.py`` works too once the project is
pip-installed). Each child runs as ``python -m benchmarks.throughput`` from the repository root,
so it imports this checkout whether or not the project is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import runpy
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

try:
    from base.schema import non_negative_int, positive_int
    from cli.flags import Parser, one_line_errors
    from run.build import build_data_and_module, quiet_lightning
    from run.config import build_config, merge
    from run.hardware import resolve_hardware
    from base.errors import UserError
    from run.hardware import use_channels_last
    from datamodules import CIFAR10DataModule
    from datamodules.augment import DATA_PATHS, resolve_data_path
    from lit_modules import ImageClassifier
    from callbacks.progress import ThrottledProgressBar
    from callbacks.checkpoints import FiniteLossGuard
except ModuleNotFoundError as exc:
    # `python benchmarks/throughput.py` puts benchmarks/, not the checkout, on the path.
    if exc.name not in ("cli", "run", "base", "datamodules", "lit_modules", "callbacks", "models"):
        raise
    print(f"throughput.py: error: cannot import the project ({exc}); run it from the repository root as "
          "`python -m benchmarks.throughput`, or after `pip install -e .`", file=sys.stderr)
    sys.exit(2)

MODELS = ("vgg16", "resnet50")
VARIANTS = ("seed_loop", "lightning", "bare")
SEED_LOOP = ROOT / ".data" / "seed_loop.py"  # as scripts/gpu_proof.py: copies kept out of git
DEFAULT_DATA = ROOT / ".data" / "cifar10-jpeg.tar.gz"
# The bare loop runs training_step without a Trainer, where self.log only warns and returns.
_NO_TRAINER_LOG = r".*self\.log\(\)` but the `self\.trainer` reference is not registered.*"


def build_parser() -> Parser:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="networks to time")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="pipelines to time")
    parser.add_argument("--steps", type=positive_int, default=50, help="timed training steps")
    parser.add_argument("--repeats", type=positive_int, default=3, help="rounds of all variants, interleaved")
    parser.add_argument("--warmup", type=positive_int, default=10, help="untimed steps first (compiling, cuDNN autotuning)")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="per step, as the course")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 source, as train.py's --data-dir")
    parser.add_argument("--seed-loop", default=str(SEED_LOOP), help="the course's training loop script (the yardstick)")
    parser.add_argument("--accelerator", choices=("auto", "cpu", "gpu", "cuda"), default="auto", help="one device of it")
    parser.add_argument(
        "--precision", choices=("auto", "32-true", "bf16-mixed"), default="auto", help="ours only: seed_loop is fp32"
    )
    parser.add_argument("--data-path", choices=DATA_PATHS, default="auto", help="ours: as train.py's --data-path")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="ours with --data-path loader")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="ours (default: on with CUDA)"
    )
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="ours: torch.compile")
    parser.add_argument("--out", metavar="PATH", help="also write the JSON here, e.g. benchmarks/results/h100.json")
    # Internal: run one timed pipeline in this process and write its JSON to --worker-out.
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser


# --- the parent: one child process per (model, variant) ------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    with one_line_errors(argv):
        args = build_parser().parse_args(argv)
        if args.worker:
            result = WORKERS[args.worker](args)
            Path(args.worker_out).write_text(json.dumps(result))
            return 0
        # Fail before spawning anything when the request cannot run here.
        hardware = resolve_hardware(args.accelerator, "1", args.precision)
        if not Path(args.data).exists():
            raise UserError(f"data not found: {args.data}; pass --data pointing at CIFAR-10 (see train.py --data-dir)")
        if "seed_loop" in args.variants and not Path(args.seed_loop).is_file():
            raise UserError(f"the yardstick {args.seed_loop} is missing; pass --seed-loop, or leave seed_loop out of --variants")

        report: dict[str, Any] = {
            "command": shlex.join(["python", "-m", "benchmarks.throughput", *(sys.argv[1:] if argv is None else argv)]),
            "device": device_name(hardware.accelerator),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "cpu_capabilities": cpu_capabilities(),
            "settings": {
                "batch_size": args.batch_size,
                "steps": args.steps,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "precision": hardware.precision,
                "data_path": resolve_data_path(args.data_path, _device(hardware.accelerator)),
                "channels_last": use_channels_last(args.channels_last, hardware),
                "compile": args.compile,
                "workers": args.workers,
            },
            "models": {},
        }
        for model in args.models:
            rounds = [{variant: run_child(args, model, variant) for variant in args.variants} for _ in range(args.repeats)]
            results: dict[str, Any] = {variant: summarise([r[variant] for r in rounds]) for variant in args.variants}
            per_round = [ratios(r) for r in rounds]
            results["ratios"] = {name: round(statistics.median(r[name] for r in per_round), 3) for name in per_round[0]}
            results["ratios_per_round"] = per_round
            report["models"][model] = results
        text = json.dumps(report, indent=2)
        print_table(report)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
            print(f"written to {args.out}", file=sys.stderr)
        return 0


def run_child(args: argparse.Namespace, model: str, variant: str) -> dict[str, Any]:
    """Run one variant in a fresh process; its result plus that process's peak resident memory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.throughput", *forwarded_flags(args),
                   "--worker", variant, "--worker-model", model, "--worker-out", str(out)]
        print(f"--- {model} / {variant}", file=sys.stderr, flush=True)
        # The child's own output (Lightning, seed_loop) goes to our stderr; stdout is the report's.
        process = subprocess.Popen(command, cwd=ROOT, stdout=sys.stderr, stderr=sys.stderr)
        _, status, usage = os.wait4(process.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise UserError(f"{model} / {variant} failed with exit code {code}; its output is above")
        result = json.loads(out.read_text())
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports kilobytes
    return result


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
             "--data", str(Path(args.data).resolve()), "--accelerator", args.accelerator,
             "--precision", args.precision, "--data-path", args.data_path, "--workers", str(args.workers),
             "--compile" if args.compile else "--no-compile", "--seed-loop", str(Path(args.seed_loop).resolve())]
    if args.channels_last is not None:
        flags.append("--channels-last" if args.channels_last else "--no-channels-last")
    return flags


def cpu_capabilities() -> dict[str, Any]:
    """What PyTorch reports of this CPU: its vector ISA and whether it has native bfloat16."""
    ask = lambda name: bool(getattr(torch.cpu, name, lambda: False)())  # noqa: E731 - private, may vanish
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": ask("_is_avx512_bf16_supported"),
        "amx": ask("_is_amx_tile_supported"),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant over the rounds: median images/s (and its spread), each round's, the peak memories."""
    speeds = [run["images_per_s"] for run in runs]
    return {
        **runs[0],
        "images_per_s": round(statistics.median(speeds), 1),
        "images_per_s_min": min(speeds),
        "images_per_s_max": max(speeds),
        "images_per_s_runs": speeds,
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    speed = {name: result["images_per_s"] for name, result in results.items()}
    out = {}
    for ours in ("lightning", "bare"):
        if ours in speed and "seed_loop" in speed:
            out[f"{ours}_vs_seed_loop"] = round(speed[ours] / speed["seed_loop"], 3)
    if "lightning" in speed and "bare" in speed:
        out["lightning_vs_bare"] = round(speed["lightning"] / speed["bare"], 3)
        # Extra time per step that Lightning adds to the same work.
        out["lightning_overhead_percent"] = round(100 * (speed["bare"] / speed["lightning"] - 1), 1)
    return out


def print_table(report: dict[str, Any]) -> None:
    settings = report["settings"]
    print(f"{report['device']}, torch {report['torch']}, lightning {report['lightning']}, "
          f"batch {settings['batch_size']}, {settings['steps']} timed steps after {settings['warmup']}, "
          f"ours: {settings['precision']}, data path {settings['data_path']}, "
          f"channels_last {settings['channels_last']}, compile {settings['compile']}")
    print(f"{'model':<10} {'variant':<10} {'images/s':>10} {'min-max':>15} {'peak RSS MB':>12} {'peak GPU MB':>12}")
    for model, results in report["models"].items():
        for variant in VARIANTS:
            if variant in results:
                r = results[variant]
                gpu = "-" if r.get("peak_gpu_mb") is None else f"{r['peak_gpu_mb']:.0f}"
                spread = f"{r.get('images_per_s_min', r['images_per_s']):.1f}-{r.get('images_per_s_max', r['images_per_s']):.1f}"
                print(f"{model:<10} {variant:<10} {r['images_per_s']:>10.1f} {spread:>15} {r['peak_rss_mb']:>12.0f} {gpu:>12}")
        for name, value in results["ratios"].items():
            print(f"{model:<10} {name}: {value}")


def device_name(accelerator: str) -> str:
    if accelerator == "gpu":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} logical CPUs)"


def _device(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator == "gpu" else "cpu")


# --- the children: one timed pipeline each ------------------------------------------------------


class Clock:
    """seed_loop's clock: starts when step ``warmup`` is done, stops when ``warmup + steps`` is.

    Counts the images of the steps in between. On CUDA it synchronises at both ends, so the time
    covers the device's work, not just the host's queueing of it.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps = warmup, steps
        self._sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.images = 0
        self.started = self.seconds = 0.0

    def step_done(self, step: int, images: int) -> None:
        if step == self.warmup:
            self._sync()
            self.started = time.perf_counter()
        elif step > self.warmup:
            self.images += images
        if step == self.warmup + self.steps:
            self._sync()
            self.seconds = time.perf_counter() - self.started

    def result(self) -> dict[str, Any]:
        if not self.seconds:
            raise RuntimeError("the timed steps did not all run")
        return {"images_per_s": round(self.images / self.seconds, 1), "images": self.images,
                "seconds": round(self.seconds, 3)}


class StepTimer(Callback):
    """Feeds the clock from Lightning: after each optimiser step, the global step is that step's number.

    Listed last among the callbacks, so a timed step includes the other callbacks' work.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.clock.step_done(trainer.global_step, len(batch[1]))


def _pipeline(args: argparse.Namespace) -> tuple[str, str, torch.device, CIFAR10DataModule, ImageClassifier]:
    """What train.py builds for one device (run.build): (accelerator, precision, device, datamodule, module)."""
    options = {"model": args.worker_model, "data_dir": args.data, "batch_size": args.batch_size, "workers": args.workers,
               "data_path": args.data_path, "accelerator": args.accelerator, "devices": 1, "precision": args.precision,
               "channels_last": args.channels_last, "compile": args.compile,
               # Training only: no validation images need holding out (and tiny data has few).
               "val_size": 0}
    config = build_config(merge(options))
    quiet_lightning()
    datamodule, module = build_data_and_module(config)
    device = _device(config.accelerator)
    datamodule.device = device  # the bare loop has no Trainer to say where batches go
    return config.accelerator, config.precision, device, datamodule, module


def _peak_gpu_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def time_lightning(args: argparse.Namespace) -> dict[str, Any]:
    accelerator, precision, device, datamodule, module = _pipeline(args)
    clock = Clock(args.warmup, args.steps, device)
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            max_steps=args.warmup + args.steps,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            logger=TensorBoardLogger(logs, name="throughput"),
            callbacks=[ThrottledProgressBar(loss_guard=(guard := FiniteLossGuard())), guard, StepTimer(clock)],
            log_every_n_steps=50,
            benchmark=device.type == "cuda",
        )
        trainer.fit(module, datamodule=datamodule)
    return {**clock.result(), "peak_gpu_mb": _peak_gpu_mb(device),
            "data_path": resolve_data_path(args.data_path, device)}


def time_bare(args: argparse.Namespace) -> dict[str, Any]:
    _, precision, device, datamodule, module = _pipeline(args)
    datamodule.setup("fit")
    module.to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    # What Lightning's bf16-mixed precision plugin does: autocast around the forward only.
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )
    torch.backends.cudnn.benchmark = device.type == "cuda"
    clock = Clock(args.warmup, args.steps, device)
    batches = _endless(datamodule.train_dataloader())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_TRAINER_LOG)
        for step in range(1, args.warmup + args.steps + 1):
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast:
                loss = module.training_step((images, labels), step - 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clock.step_done(step, len(labels))
    return {**clock.result(), "peak_gpu_mb": _peak_gpu_mb(device),
            "data_path": resolve_data_path(args.data_path, device)}


def _endless(loader: Any) -> Iterator[Any]:
    """Batches of epoch after epoch, telling a loader with a ``sampler.set_epoch`` which one, as Lightning does."""
    epoch = 0
    while True:
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        yield from loader
        epoch += 1


def time_seed_loop(args: argparse.Namespace) -> dict[str, Any]:
    """Run seed_loop.py unmodified in this process (cwd: the repository root), reading its JSON line.

    In-process rather than as a grandchild so that its peak CUDA memory can be read afterwards.
    """
    device = "cuda" if resolve_hardware(args.accelerator, "1", "32-true").accelerator == "gpu" else "cpu"
    seed_args = ["--model-factory", f"models:{args.worker_model}", "--data", args.data, "--device", device,
                 "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    printed = io.StringIO()
    seed_loop = Path(args.seed_loop).resolve()
    sys.argv = [str(seed_loop), *seed_args]
    with contextlib.redirect_stdout(printed):
        runpy.run_path(str(seed_loop), run_name="__main__")
    output = json.loads(printed.getvalue().strip().splitlines()[-1])
    return {"images_per_s": output["train_images_per_s"], "peak_gpu_mb": _peak_gpu_mb(torch.device(device)),
            "command": shlex.join(["python", os.path.relpath(seed_loop, ROOT), *seed_args]), "output": output}


WORKERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "seed_loop": time_seed_loop,
    "lightning": time_lightning,
    "bare": time_bare,
}


if __name__ == "__main__":
    sys.exit(main())
