"""What test.py, predict.py and export.py are asked to do, checked before torch loads.

Each command calls its check here first, then does its work: a missing checkpoint, an image path
with a typo or an output that cannot be written is refused at once, not after seconds of
imports. (train.py's flags are checked the same way by ``run.life.resolve_run``.)
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from base.errors import UserError
from base.schema import EXPORT_FORMATS
from run.config import absolute_path, merge, read_config, settle
from run.life import CONFIG_NAME, require_run_dir, run_dir_of
from run.hardware import check_hardware_request
from run.loggers import check_loggers, recorded_loggers
from run.paths import (
    ATOMIC_NAME_EXTRA,
    check_checkpoint_file,
    check_name_lengths,
    check_output_file,
    check_runs_data,
    check_writable,
    find_images,
)

# What test.py --log-to-run adds to a run's dashboards (two pictures, a few dozen numbers), with room to spare.
RUN_LOG_BYTES = 16 * 2**20
# The run options that test.py takes as flags; the rest of its run configuration is the defaults.
TEST_OPTIONS = ("data_dir", "eval_batch_size", "data_path", "workers", "cache_dir", "accelerator", "devices",
                "precision", "channels_last", "limit_test_batches")


def check_test(args: Mapping[str, Any]) -> dict[str, Any]:
    """test.py's run options, merged and checked: ``--ckpt``, ``--log-to-run``, ``--json``, hardware.

    A checkpoint of a train.py run is tested on that run's data unless ``--data-dir`` says otherwise.
    """
    checkpoint = check_checkpoint_file(args["ckpt"], safetensors=True)
    if args.get("log_to_run"):
        logged = require_run_dir(checkpoint)
        check_room_for_dashboards(logged)
        # Through the loggers the run logs to: one of them not installed here is refused now.
        check_loggers(recorded_loggers(logged), f"--log-to-run: the run {logged} logs to", "leave out --log-to-run")
    if args.get("json") is not None:
        check_output_file(Path(args["json"]), "--json")
    run = run_dir_of(checkpoint)
    saved = read_config(run / CONFIG_NAME).get("data_dir") if run else None
    if saved and "data_dir" not in args:
        check_runs_data(absolute_path(saved), run / CONFIG_NAME)
    # One device unless asked: a distributed sampler would pad the test set with repeated images.
    values = merge({"devices": 1}, {"data_dir": saved} if saved else {},
                   {name: args[name] for name in TEST_OPTIONS if name in args})
    return settle(values)


def check_room_for_dashboards(run_dir: Path) -> None:
    """Refuse ``--log-to-run`` into a run whose disk has less free space than what it adds."""
    free = shutil.disk_usage(run_dir).free
    if free < RUN_LOG_BYTES:
        raise UserError(
            f"--log-to-run: {free / 2**20:.1f} MiB free on the disk of {run_dir}, and the test's pictures and "
            f"numbers need up to {RUN_LOG_BYTES // 2**20} MiB; free disk space, or leave out --log-to-run"
        )


def check_predict(args: Any) -> list[Path]:
    """predict.py's image files (folders expanded), after checking its other flags."""
    if args.explain_class is not None and args.explain is None:
        raise UserError("--explain-class needs --explain OUT_DIR, the folder to write the pictures to")
    if args.explain is not None:
        check_name_lengths(args.explain, "--explain")
        if args.explain.exists() and not args.explain.is_dir():
            raise UserError(f"--explain {args.explain} is a file; name a folder to write the pictures to")
        check_writable(args.explain, "--explain")
    check_hardware_request(args.accelerator, 1, "32-true")
    # Image paths before the checkpoint: a typo in them is the likelier mistake.
    paths = find_images(args.inputs)
    check_checkpoint_file(args.ckpt, safetensors=True)
    return paths


def check_export(checkpoint: Path, fmt: str, output: Path | None, force: bool) -> Path:
    """export.py's file to write, refused when writing it would lose something or cannot work."""
    check_checkpoint_file(checkpoint, safetensors=True)
    default = checkpoint.with_name(checkpoint.stem + EXPORT_FORMATS[fmt])  # best.ckpt -> best.onnx, beside it
    output = output or default
    check_name_lengths(output, "--output", last_extra=ATOMIC_NAME_EXTRA)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; name the file to write, e.g. {output / default.name}")
    if output.exists() and output.resolve() == checkpoint.resolve():
        raise UserError(f"--output {output} is the checkpoint being exported; choose another file")
    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it, or choose another --output")
    check_writable(output.parent, "--output")
    return output

