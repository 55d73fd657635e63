#!/usr/bin/env python
"""The GPU proof in one command: CUDA tests, throughput, accuracy of the fast recipes, one table.

A lent GPU comes for minutes, so this runs its parts in order of value, each only if its
estimated time still fits the budget (``--budget-s``, default 9 minutes), each stopped at the
budget's end if it runs over, and prints one line per finished part:

1. ``cuda-tests``: ``pytest -m gpu`` (bf16, channels_last, compile, the device data path,
   train -> resume -> test on the GPU, the GPU checkpoint tested on the CPU);
2. ``throughput``: ``benchmarks/throughput.py`` for vgg16 and resnet50: the course loop, ours in
   Lightning and the same step in a bare loop, interleaved over repeats;
3. ``vgg16-seeds``: ``configs/vgg16_fast.yaml``, three seeds, with the time to 93 % test accuracy;
4. ``lr-sweep``: ``configs/vgg16_fast.yaml`` at other one-cycle peaks (seed 0);
5. ``resnet50-seeds``: ``configs/resnet50_fast.yaml``, three seeds;
6. ``table``: ``results.md``, every figure above with the files it came from.

Everything goes under ``--out``; ``--archive`` also packs that folder into one ``.tar.gz`` after
every part (a lent machine returns a few files, not a tree). ``--dry-run`` runs the very same
parts on the CPU with tiny sizes and generated data, which is how CI checks this script.

    python scripts/gpu_proof.py --data ~/data/cifar10-jpeg.tar.gz --seed-loop seed_loop.py --out proof
    python scripts/gpu_proof.py --dry-run --out /tmp/proof
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Peaks of the one-cycle schedule tried besides the config's own (configs/vgg16_fast.yaml: 0.05).
SWEEP_LRS = ("0.1", "0.2", "0.4")
TARGET = "0.93"


@dataclass
class Part:
    name: str
    commands: list[list[str]]
    estimate_s: float
    outcome: str = "not run"
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for every result")
    parser.add_argument("--archive", type=Path, help="also pack --out into this .tar.gz after every part")
    parser.add_argument("--data", type=Path, help="CIFAR-10 (train.py's --data-dir); generated with --dry-run")
    parser.add_argument("--seed-loop", type=Path, help="the course's training loop script, for the throughput yardstick")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for everything (default: 9 minutes)")
    parser.add_argument("--dry-run", action="store_true", help="the same parts on the CPU, tiny sizes, generated data")
    return parser


def plan(args: argparse.Namespace, data: Path) -> list[Part]:
    """The parts in order of value, with commands and conservative time estimates (seconds)."""
    py = sys.executable
    out = args.out
    if args.dry_run:
        device = ["--accelerator", "cpu"]
        bench = ["--steps", "2", "--warmup", "1", "--repeats", "1", "--data", str(data), *device]
        tiny = ["--", "--epochs", "1", "--train-limit", "40", "--val-size", "20", "--batch-size", "20",
                "--eval-batch-size", "50", "--workers", "0", "--time-to-accuracy", TARGET, *device]
        estimates = {"cuda-tests": 60, "throughput": 120, "seeds": 30, "sweep": 30}
    else:
        device = ["--accelerator", "gpu"]
        bench = ["--steps", "100", "--warmup", "20", "--repeats", "3", "--data", str(data), *device]
        tiny = ["--", "--time-to-accuracy", TARGET, *device]
        # From the targets: vgg16 at 100,000 img/s trains 40 epochs in ~20 s; resnet50 at 25,000 in ~75 s;
        # plus start-up and evaluation. Generous, so that what starts also ends.
        estimates = {"cuda-tests": 120, "throughput": 150, "seeds": 40, "sweep": 40}
    if args.seed_loop is not None:
        bench += ["--seed-loop", str(args.seed_loop)]
    variants = ["--variants", "seed_loop", "lightning", "bare"] if args.seed_loop else ["--variants", "lightning", "bare"]
    accuracy = [py, "benchmarks/accuracy.py", "--data-dir", str(data), "--runs-dir", str(out / "runs")]
    resnet_factor = 1 if args.dry_run else 4
    return [
        Part("cuda-tests", [[py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                             f"--junitxml={out / 'cuda-tests.xml'}", "tests/test_gpu.py"]], estimates["cuda-tests"]),
        Part("throughput", [[py, "benchmarks/throughput.py", *bench, *variants,
                             "--out", str(out / "throughput.json")]], estimates["throughput"]),
        Part("vgg16-seeds", [[*accuracy, "--configs", "configs/vgg16_fast.yaml", "--seeds", "0", "1", "2",
                              "--out", str(out / "accuracy"), *tiny]], 3 * estimates["seeds"]),
        Part("lr-sweep", [[*accuracy, "--configs", "configs/vgg16_fast.yaml", "--seeds", "0", "--tag", f"lr{lr}",
                           "--out", str(out / "lr-sweep"), *tiny, "--lr", lr] for lr in SWEEP_LRS],
             len(SWEEP_LRS) * estimates["sweep"]),
        Part("resnet50-seeds", [[*accuracy, "--configs", "configs/resnet50_fast.yaml", "--seeds", "0", "1", "2",
                                 "--out", str(out / "accuracy"), *tiny]], 3 * estimates["seeds"] * resnet_factor),
    ]


def run_part(part: Part, deadline: float, log: Path) -> None:
    """Run ``part``'s commands one after the other, stopping at ``deadline``; fills its outcome."""
    started = time.monotonic()
    with log.open("a") as sink:
        for command in part.commands:
            left = deadline - time.monotonic()
            sink.write(f"\n$ {shlex.join(command)}\n")
            sink.flush()
            try:
                done = subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                part.outcome = "cut off at the budget's end"
                break
            if done.returncode != 0:
                part.outcome = f"failed (exit code {done.returncode})"
                break
        else:
            part.outcome = "done"
    part.seconds = time.monotonic() - started


def tiny_data(folder: Path) -> Path:
    """A generated image-folder CIFAR-10 for --dry-run (the tests' own generator)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fakedata import make_image_folder

    return make_image_folder(folder, 12, 5)


def table(parts: Sequence[Part], out: Path) -> str:
    """results.md: what each part did, then the figures of the benchmark and accuracy summaries."""
    lines = ["# GPU proof", "", "| part | outcome | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {part.name} | {part.outcome} | {part.seconds:.0f} |" for part in parts]
    throughput = out / "throughput.json"
    if throughput.is_file():
        report = json.loads(throughput.read_text())
        lines += ["", f"## Throughput ({report['device']}, batch {report['settings']['batch_size']}, "
                      f"{report['settings']['precision']}, median of {report['settings'].get('repeats', 1)})", "",
                  "| model | variant | images/s | min | max |", "| --- | --- | ---: | ---: | ---: |"]
        for model, results in report["models"].items():
            for variant, result in results.items():
                if isinstance(result, dict) and "images_per_s" in result:
                    lines.append(f"| {model} | {variant} | {result['images_per_s']:.0f} | "
                                 f"{result.get('images_per_s_min', 0):.0f} | {result.get('images_per_s_max', 0):.0f} |")
            lines += [f"| {model} | {name} | {value} | | |" for name, value in results.get("ratios", {}).items()]
    for folder in ("accuracy", "lr-sweep"):
        summary = out / folder / "results.md"
        if summary.is_file():
            lines += ["", f"## {folder} (from {folder}/summary.json)", "", summary.read_text().strip()]
    return "\n".join(lines) + "\n"


def pack(out: Path, archive: Path | None) -> None:
    if archive is None:
        return
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            # Checkpoints stay behind: they are large and the figures are in the JSON files.
            if path.is_file() and path.suffix != ".ckpt" and "runs" not in path.relative_to(out).parts:
                tar.add(path, arcname=str(path.relative_to(out.parent)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    data = tiny_data(args.out / "tiny-data") if args.dry_run else args.data
    if data is None or not Path(data).exists():
        print(f"gpu_proof: error: --data {data}: CIFAR-10 not found; pass --data (or --dry-run)", file=sys.stderr)
        return 2
    log = args.out / "log.txt"
    parts = plan(args, Path(data).resolve())
    for part in parts:
        left = deadline - time.monotonic()
        if part.estimate_s > left:
            part.outcome = f"skipped: needs about {part.estimate_s:.0f} s, {max(left, 0):.0f} s left"
        else:
            run_part(part, deadline, log)
        print(f"[{time.monotonic() - start:5.0f} s] {part.name}: {part.outcome} ({part.seconds:.0f} s)", flush=True)
        (args.out / "results.md").write_text(table(parts, args.out))
        pack(args.out, args.archive)
    print((args.out / "results.md").read_text(), end="")
    return 0 if all(part.outcome == "done" or part.outcome.startswith("skipped") for part in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
