"""How spread out the run configuration is: counts to compare two versions of this code.

    python benchmarks/code_counts.py                # this checkout
    python benchmarks/code_counts.py --root OTHER   # another checkout (a git worktree of an older commit)

Prints, as JSON:

- ``option_files_restating`` / ``option_files_naming``: for each option of train.py, the number
  of source files (the packages, not tests/ or benchmarks/) that restate it (declare it as a
  field, parameter or keyword, spell it as a key or a flag) / that name it at all; with the
  median, the maximum and the sum over the options;
- ``resume``: a tiny run of 1 epoch is trained, then continued with ``--resume last --epochs 2``
  in this process, under ``sys.setprofile``: the project's source files whose functions that
  resume calls (``files``), and how often the resumed checkpoint is read (``torch_loads``: calls
  of ``torch.load`` on it, ``opens``: every ``open`` of it, headers included);
- ``step``: a tiny run of 1 epoch is started as ``python train.py`` would start it (``runpy``), under
  ``sys.setprofile``: the project's source files on the call stack when the optimiser's ``step`` is
  entered (``stack``) and those whose functions are called from one ``step`` to the next, the
  batch, forward, loss, backward and callbacks of one training step (``between``), and their union
  (``files``: one training step followed from ``python train.py`` to ``optimizer.step``);
- ``imports``: per module of ``run/`` and its packages, the project modules it imports (``run/training.py``'s count);
- ``lines``: the lines of ``run/`` and ``cli/`` (all lines of their ``.py`` files), and of all the
  product code (the packages and the four commands).

The data is a generated CIFAR-10 python archive of 60 images (never downloaded); everything is
written under a temporary folder that is removed at the end. Runs on the CPU in about a minute.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import json
import os
import pickle
import re
import statistics
import sys
import tempfile
from pathlib import Path

PACKAGES = ("base", "models", "datamodules", "lit_modules", "callbacks", "run", "cli")
# train.py's options as they were named before and after the schema (the flag names did not change).
OPTIONS = (
    "model", "identity_shortcut", "epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
    "scheduler", "step_size", "gamma", "label_smoothing", "ema_decay", "tta", "data_dir", "eval_batch_size",
    "data_path", "workers", "cache_dir", "val_size", "train_limit", "accelerator", "devices", "precision",
    "channels_last", "compile", "num_nodes", "strategy", "output_dir", "run_name", "seed", "resume", "rewind",
    "weights", "checkpoint_every", "results_json", "time_to_accuracy", "log_every_n_steps", "requeue_signal",
    "find_lr", "fast_dev_run", "limit_train_batches", "limit_val_batches", "limit_test_batches",
)


def sources(root: Path) -> list[Path]:
    return sorted(path for package in PACKAGES for path in (root / package).rglob("*.py"))


def option_files(root: Path, restated: bool) -> dict[str, int]:
    """Per option, the source files that name it (``restated=False``: as any identifier) or that
    restate it (``True``: declare it as a field, parameter or keyword ``name:`` / ``name=``, spell it
    as a key ``"name"``, or as its flag ``--name``), where a use such as ``config.name`` is not one."""
    texts = [path.read_text(encoding="utf-8") for path in sources(root)]

    def pattern(name: str) -> str:
        if not restated:
            return rf"\b{name}\b"
        flag = "--" + name.replace("_", "-")
        return rf"(?<![.\w]){name}\s*(:|=(?!=))|[\"']{name}[\"']|{re.escape(flag)}\b"

    return {name: sum(bool(re.search(pattern(name), text)) for text in texts) for name in OPTIONS}


COMMANDS = ("train.py", "test.py", "predict.py", "export.py")


def lines(root: Path) -> dict[str, int]:
    def count(paths) -> int:  # type: ignore[no-untyped-def]
        return sum(len(p.read_text(encoding="utf-8").splitlines()) for p in paths)

    counts = {package: count((root / package).rglob("*.py")) for package in ("run", "cli")}
    counts["product"] = count([*sources(root), *(root / name for name in COMMANDS)])
    return counts


def project_imports(root: Path) -> dict[str, int]:
    """Per module of run/ (and of its packages, such as run/life/): how many distinct project modules
    its import statements name."""
    import ast

    counts = {}
    for path in sorted((root / "run").rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                # `from run import build` names the module run.build, `from run.build import x` too.
                if node.module in PACKAGES:
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
                else:
                    names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        counts[str(path.relative_to(root))] = len(names)
    return counts


def write_tiny_cifar10(folder: Path, train: int = 50, test: int = 10) -> None:
    """torchvision's CIFAR-10 python layout, random pixels: what the DataModule reads without a download."""
    import numpy as np

    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)],
                b"filenames": [f"{i}.png".encode() for i in range(n)]}

    sizes = [train // 5] * 5
    for i, n in enumerate(sizes, start=1):
        (batches / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n)))
    (batches / "test_batch").write_bytes(pickle.dumps(batch(test)))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (batches / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))


def traced_resume(root: Path, work: Path) -> dict:
    sys.path.insert(0, str(root))
    os.chdir(root)
    import torch

    from cli.train import main

    data, runs = work / "data", work / "runs"
    write_tiny_cifar10(data)
    common = ["--model", "vgg16", "--accelerator", "cpu", "--precision", "32-true", "--workers", "0",
              "--batch-size", "10", "--val-size", "10", "--data-dir", str(data), "--output-dir", str(runs),
              "--cache-dir", str(work / "cache")]
    # The runs' own output goes to stderr: stdout is the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        assert main([*common, "--epochs", "1"]) == 0
    checkpoint = next(runs.rglob("last.ckpt")).resolve()
    files: set[str] = set()
    counts = {"torch_loads": 0, "opens": 0}
    real_load, real_open = torch.load, builtins.open

    def is_checkpoint(target: object) -> bool:
        # A path, or a file object opened on one (Lightning hands torch.load an fsspec file).
        if not isinstance(target, (str, os.PathLike)):
            target = getattr(target, "path", None) or getattr(target, "name", None) or target
        try:
            return Path(os.fspath(target)).resolve() == checkpoint  # type: ignore[arg-type]
        except TypeError:
            return False

    def counting_load(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        counts["torch_loads"] += is_checkpoint(f)
        return real_load(f, *args, **kwargs)

    def counting_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        counts["opens"] += is_checkpoint(file)
        return real_open(file, *args, **kwargs)

    prefix = str(root) + os.sep

    def profile(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call":
            name = frame.f_code.co_filename
            if name.startswith(prefix) and name[len(prefix):].split(os.sep)[0] in PACKAGES:
                files.add(name[len(prefix):])

    torch.load, builtins.open = counting_load, counting_open
    sys.setprofile(profile)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            code = main([*common, "--epochs", "2", "--resume", "last"])
    finally:
        sys.setprofile(None)
        torch.load, builtins.open = real_load, real_open
    assert code == 0
    return {"files": len(files), "file_list": sorted(files), **counts}


def traced_step(root: Path, work: Path) -> dict:
    """The project files one training step passes through, from ``python train.py`` to ``optimizer.step``."""
    import runpy

    data, runs = work / "step-data", work / "step-runs"
    write_tiny_cifar10(data)
    prefix = str(root) + os.sep
    project = (*PACKAGES, *COMMANDS)

    def ours(filename: str) -> str | None:
        if filename.startswith(prefix):
            relative = filename[len(prefix):]
            if relative.split(os.sep)[0] in project:
                return relative
        return None

    steps = {"count": 0}
    stack: set[str] = set()
    between: set[str] = set()
    # The window: from the 2nd step's start to the 3rd's (a steady step; the first builds caches).
    first, last = 2, 3

    def profile(frame, event, arg):  # type: ignore[no-untyped-def]
        if event != "call":
            return
        code = frame.f_code
        if code.co_name == "step" and f"{os.sep}torch{os.sep}optim{os.sep}" in code.co_filename \
                and "lr_scheduler" not in code.co_filename:
            steps["count"] += 1
            if steps["count"] == first:
                caller = frame.f_back
                while caller is not None:
                    name = ours(caller.f_code.co_filename)
                    if name:
                        stack.add(name)
                    caller = caller.f_back
        if first <= steps["count"] < last:
            name = ours(code.co_filename)
            if name:
                between.add(name)

    argv = ["train.py", "--model", "vgg16", "--accelerator", "cpu", "--precision", "32-true", "--workers", "0",
            "--batch-size", "10", "--val-size", "10", "--data-dir", str(data), "--output-dir", str(runs),
            "--cache-dir", str(work / "cache"), "--epochs", "1"]
    saved = sys.argv
    sys.argv = argv
    sys.setprofile(profile)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            runpy.run_path(str(root / "train.py"), run_name="__main__")
    except SystemExit as stop:
        assert not stop.code, f"the traced run failed: exit {stop.code}"
    finally:
        sys.setprofile(None)
        sys.argv = saved
    assert steps["count"] >= last, f"only {steps['count']} optimiser steps"
    files = stack | between
    return {"files": len(files), "file_list": sorted(files), "stack": sorted(stack), "between": sorted(between)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to count")
    args = parser.parse_args()
    root = args.root.resolve()
    named, restated = option_files(root, restated=False), option_files(root, restated=True)
    with tempfile.TemporaryDirectory() as work:
        resume = traced_resume(root, Path(work))
        step = traced_step(root, Path(work))

    def summary(counts: dict[str, int]) -> dict:
        return {"median": statistics.median(counts.values()), "max": max(counts.values()), "total": sum(counts.values()),
                "per_option": counts}

    print(json.dumps({
        "root": str(root),
        "option_files_restating": summary(restated),
        "option_files_naming": summary(named),
        "resume": resume,
        "step": step,
        "imports": project_imports(root),
        "lines": lines(root),
    }, indent=2))


if __name__ == "__main__":
    main()
