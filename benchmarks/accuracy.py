#!/usr/bin/env python
"""Accuracy of named recipes over several seeds: runs train.py for each, summarises, writes a table.

For every config and seed it runs, one after the other (``--parallel N``: N at once, for small runs
that share one GPU), each in its own process:

    python train.py --config CONFIG --seed SEED --data-dir DATA --output-dir RUNS --results-json OUT/NAME.json [FLAGS]

and reads the test accuracy of the best checkpoint (train.py's final test; the checkpoint is
chosen on the validation split) from that JSON, with the epochs, the hardware and the timings.
It adds its own record (the exact command, its wall time, start to exit) and keeps train.py's
output in ``OUT/NAME.log``. After every run it rewrites ``OUT/summary.json`` (mean, sample
standard deviation, minimum and maximum per config and flags) and ``OUT/results.md`` (the table
of docs/results.md). Flags after ``--`` go to every train.py run, e.g. ``-- --time-to-accuracy 0.93``.

Runs already in OUT (same config, seed and flags) are skipped, so the same command continues a
batch that was stopped; ``--budget-s`` starts no run that would likely end after that many
seconds (the longest run so far is the estimate), for machines lent by the minute.

    python -m benchmarks.accuracy --configs configs/vgg16_fast.yaml configs/resnet50_fast.yaml \\
        --seeds 0 1 2 --data-dir ~/data/cifar10-jpeg.tar.gz --out benchmarks/results/accuracy-gpu
    python -m benchmarks.accuracy --out benchmarks/results/accuracy-gpu     # only summarise again

(from the repository root; ``python benchmarks/accuracy.py`` works too once the project is
pip-installed).
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

try:
    from base.schema import non_negative_int, positive_int
    from cli.flags import Parser, one_line_errors
    from base.errors import UserError
    from base.files import atomic_write_text
except ModuleNotFoundError as exc:
    # `python benchmarks/accuracy.py` puts benchmarks/, not the checkout, on the path.
    if exc.name not in ("cli", "base"):
        raise
    print(f"accuracy.py: error: cannot import the project ({exc}); run it from the repository root as "
          "`python -m benchmarks.accuracy`, or after `pip install -e .`", file=sys.stderr)
    sys.exit(2)

SUMMARY, TABLE = "summary.json", "results.md"


def build_parser() -> Parser:
    parser = Parser(description=__doc__.splitlines()[0], epilog="Flags after -- are passed to every train.py run.")
    parser.add_argument("--configs", nargs="+", default=[], metavar="YAML", help="train.py configs, e.g. configs/vgg16_fast.yaml")
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0, 1, 2], help="one run per seed and config")
    parser.add_argument("--data-dir", help="train.py's --data-dir (required to run; not to summarise)")
    parser.add_argument("--out", required=True, help="folder of the per-run JSON and logs, summary.json and results.md")
    parser.add_argument(
        "--runs-dir",
        default=str(Path(tempfile.gettempdir()) / "cifar10-lightning-accuracy"),
        help="train.py's --output-dir: run folders and checkpoints (several hundred MB a run)",
    )
    parser.add_argument("--tag", default="", help="name suffix that tells apart runs of one config with other flags")
    parser.add_argument("--budget-s", type=float, default=None, help="start no run likely to end after this many seconds")
    parser.add_argument("--force", action="store_true", help="run again what OUT already holds")
    parser.add_argument("--parallel", type=positive_int, default=1, metavar="N",
                        help="train.py runs at once (several small runs share one GPU; each run's seconds are then its own wall time)")
    return parser


def run_name(config: str, seed: int, tag: str) -> str:
    # Letters, digits, '-', '_' and '.' only: the files travel back from lent machines by name.
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(config).stem)
    suffix = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    return f"{stem}-{suffix}-seed{seed}" if suffix else f"{stem}-seed{seed}"


def train_command(config: str, seed: int, data_dir: str, runs_dir: str, results: Path, extra: Sequence[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", config, "--seed", str(seed), "--data-dir", data_dir,
            "--output-dir", runs_dir, "--results-json", str(results), *extra]


def start_run(command: list[str], log: Path) -> subprocess.Popen:
    """Start ``command`` with its output in ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)


def _wait_any(running: list) -> tuple:
    """Remove and return the first of ``running`` to end, with its wall seconds from start to exit."""
    while True:
        for entry in running:
            if entry[1].poll() is not None:
                running.remove(entry)
                return (*entry, time.perf_counter() - entry[2])
        time.sleep(0.5)


def _finish(ended: tuple, args: Any, extra: list[str], out: Path, failed: list[str]) -> float:
    """Record one ended run: its results JSON with the runner's record, or its failure; its wall seconds."""
    name, process, _, results, log, command, config, seed, wall = ended
    code = process.returncode
    if code != 0 or not results.is_file():
        failed.append(name)
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        print(f"    {name} FAILED (exit code {code}, {wall:.0f} s); end of {log}:\n{tail}", flush=True)
        results.unlink(missing_ok=True)
        return wall
    data = json.loads(results.read_text())
    data["runner"] = {
        "config": config,
        "seed": seed,
        "tag": args.tag,
        "extra": extra,
        "data_dir": args.data_dir,
        # As typed from the repository root.
        "command": shlex.join(["python", "train.py", *command[2:]]),
        "wall_s": wall,
        "parallel": args.parallel,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(results, json.dumps(data, indent=2) + "\n")
    print(f"    {name}: test accuracy {_percent(data['test_accuracy'])} % after {data['epochs_trained']} epochs, "
          f"{wall:.0f} s", flush=True)
    write_summary(out)
    return wall


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run in ``out``: train.py's results with the runner's record."""
    runs = []
    for path in sorted(out.glob("*.json")):
        if path.name == SUMMARY:
            continue
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "runner" in data and data.get("test_accuracy") is not None:
            runs.append(data)
    return runs


def hardware_label(run: dict[str, Any]) -> str:
    hardware = run["hardware"]
    label = f"{hardware['device_name']}, {hardware['precision']}"
    if hardware.get("devices", 1) > 1:
        label = f"{hardware['devices']} x {label}"
    return label + (", compiled" if run["options"].get("compile") else "")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, tag, flags): the accuracy over its seeds, times, hardware, command."""
    groups: dict[tuple[str, str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for run in runs:
        record = run["runner"]
        groups.setdefault((record["config"], record["tag"], tuple(record["extra"])), []).append(run)
    rows = []
    for (config, tag, extra), members in groups.items():
        members.sort(key=lambda run: run["seed"])
        accuracies = [run["test_accuracy"] for run in members]
        row: dict[str, Any] = {
            "model": members[0]["model"],
            "config": config,
            "tag": tag,
            "extra": list(extra),
            "epochs": sorted({run["epochs_trained"] for run in members}),
            "seeds": [run["seed"] for run in members],
            "runs": len(members),
            "test_accuracy": {
                "mean": statistics.fmean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                "min": min(accuracies),
                "max": max(accuracies),
                "each": accuracies,
            },
            "wall_s_mean": statistics.fmean(run["runner"]["wall_s"] for run in members),
            "fit_s_mean": statistics.fmean(run["seconds"]["fit"] for run in members),
            "hardware": sorted({hardware_label(run) for run in members}),
            "data": sorted({run["data"] for run in members}),
            "command": shlex.join(["python", "train.py", "--config", config, "--seed", "S", "--data-dir",
                                   members[0]["runner"]["data_dir"], *extra]),
        }
        clocks = [run["time_to_accuracy"] for run in members if run.get("time_to_accuracy")]
        if clocks:
            reached = [clock for clock in clocks if clock["reached"]]
            warmups = [clock["warmup_s"] for clock in clocks if clock["warmup_s"] is not None]
            # Absent from results written before train.py recorded it.
            startups = [clock["startup_s"] for clock in clocks if clock.get("startup_s") is not None]
            row["time_to_accuracy"] = {
                "target": clocks[0]["target"],
                "reached": f"{len(reached)}/{len(clocks)}",
                "train_s_mean": statistics.fmean(c["train_s"] for c in reached) if reached else None,
                "epoch_mean": statistics.fmean(c["epoch"] for c in reached) if reached else None,
                "startup_s_mean": statistics.fmean(startups) if startups else None,
                "first_epoch_s_mean": statistics.fmean(c["first_epoch_s"] for c in clocks),
                "warmup_s_mean": statistics.fmean(warmups) if warmups else None,
            }
        rows.append(row)
    rows.sort(key=lambda row: (row["model"], row["config"], row["tag"], row["extra"]))
    return rows


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def _config(row: dict[str, Any]) -> str:
    return row["config"] + (f" ({row['tag']})" if row["tag"] else "")


def render_markdown(rows: list[dict[str, Any]]) -> str:
    """The tables of docs/results.md: accuracy per recipe, then time-to-accuracy where measured."""
    lines = [
        "| model | config | epochs | seeds | test accuracy (mean ± std) | min – max | wall time per run | hardware | command |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        acc = row["test_accuracy"]
        spread = f" ± {_percent(acc['std'])}" if acc["std"] is not None else " (one seed)"
        lines.append(
            f"| {row['model']} | {_config(row)} | {', '.join(map(str, row['epochs']))} | "
            f"{', '.join(map(str, row['seeds']))} | {_percent(acc['mean'])}{spread} % | "
            f"{_percent(acc['min'])} – {_percent(acc['max'])} % | {row['wall_s_mean']:.0f} s | "
            f"{'; '.join(row['hardware'])} | `{row['command']}` |"
        )
    timed = [row for row in rows if "time_to_accuracy" in row]
    if timed:
        lines += [
            "",
            "| model | config | target (test set) | reached | training time to target | at epoch | start-up | first epoch | warm-up estimate | hardware |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in timed:
            clock = row["time_to_accuracy"]
            to_target = f"{clock['train_s_mean']:.1f} s" if clock["train_s_mean"] is not None else "not reached"
            epoch = f"{clock['epoch_mean']:.1f}" if clock["epoch_mean"] is not None else "–"
            warmup = f"{clock['warmup_s_mean']:.1f} s" if clock["warmup_s_mean"] is not None else "–"
            startup = f"{clock['startup_s_mean']:.1f} s" if clock["startup_s_mean"] is not None else "–"
            lines.append(
                f"| {row['model']} | {_config(row)} | {_percent(clock['target'])} % | {clock['reached']} | {to_target} | "
                f"{epoch} | {startup} | {clock['first_epoch_s_mean']:.1f} s | {warmup} | "
                f"{'; '.join(row['hardware'])} |"
            )
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> list[dict[str, Any]]:
    rows = summarize(load_runs(out))
    atomic_write_text(out / SUMMARY, json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / TABLE, render_markdown(rows))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    with one_line_errors(argv):
        argv = list(sys.argv[1:] if argv is None else argv)
        extra = argv[argv.index("--") + 1:] if "--" in argv else []
        args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
        out = Path(args.out)
        if args.configs and not args.data_dir:
            raise UserError("--data-dir is required to run configs (leave out --configs to summarise OUT only)")
        for config in args.configs:
            if not Path(config).is_file():
                raise UserError(f"config file not found: {config}; see configs/ for the shipped recipes")
        out.mkdir(parents=True, exist_ok=True)

        plan = [(config, seed) for config in args.configs for seed in args.seeds]
        started, longest, failed = time.perf_counter(), 0.0, []
        running: list[tuple[str, subprocess.Popen, float, Path, Path, list[str], str, int]] = []
        for index, (config, seed) in enumerate(plan, 1):
            name = run_name(config, seed, args.tag)
            results, log = out / f"{name}.json", out / f"{name}.log"
            if results.is_file() and not args.force:
                done = json.loads(results.read_text()).get("runner", {})
                if done.get("extra") != extra:
                    raise UserError(
                        f"{results} holds a run with other train.py flags ({shlex.join(done.get('extra', []))}); "
                        "use --tag to keep both, or --force to replace it"
                    )
                print(f"[{index}/{len(plan)}] {name}: already in {out}, skipped")
                continue
            while len(running) >= args.parallel:
                longest = max(longest, _finish(_wait_any(running), args, extra, out, failed))
            elapsed = time.perf_counter() - started
            if args.budget_s is not None and elapsed + longest > args.budget_s:
                print(f"stopping: {len(plan) - index + 1} run(s) left would overrun --budget-s {args.budget_s:g}; "
                      "run the same command again to continue")
                break
            command = train_command(config, seed, args.data_dir, args.runs_dir, results, extra)
            print(f"[{index}/{len(plan)}] {name}: {shlex.join(['python', 'train.py', *command[2:]])}", flush=True)
            results.unlink(missing_ok=True)
            running.append((name, start_run(command, log), time.perf_counter(), results, log, command, config, seed))
        while running:
            longest = max(longest, _finish(_wait_any(running), args, extra, out, failed))

        rows = write_summary(out)
        print(render_markdown(rows), end="")
        print(f"summary: {out / SUMMARY}, table: {out / TABLE}")
        if failed:
            print(f"failed: {', '.join(failed)} (logs in {out})", file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
