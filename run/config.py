"""The resolved configuration of one training run: every option, merged once, typed, never mutated.

Built-in defaults, a resumed run's saved options, a ``--config`` file and the flags typed are
merged in that order (a later source wins) by ``run.resolve.resolve_run_config``, which returns a frozen
:class:`RunConfig` in which nothing is left to decide later: the network is known (from the
checkpoint when one is resumed or started from), ``epochs`` is a number, hardware ``auto``
values are what Lightning will use here, and every path is expanded (``~``, ``$VARS``) and
absolute. ``config.yaml`` in the run folder is :meth:`RunConfig.to_dict` of it.

Defaults live in one place each: the course recipe's and the data's in ``base.options`` (which
``ImageClassifier`` and ``CIFAR10DataModule`` use too), the run's here. This module loads neither
torch nor Lightning until :func:`build_config` asks PyTorch about the hardware: :func:`settle`
does every check that needs neither, so that a mistake in the flags is refused at once;
``run.resolve`` does the rest of the resolution.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from base.errors import UserError
from base.files import atomic_write_text
from base.yamlfile import read_mapping
from base.options import COURSE_EPOCHS, COURSE_RECIPE, DATA
from datamodules.layout import check_data_dir
from run.hardware import Hardware, Machine, check_hardware_request, resolve_hardware, use_channels_last
from run.paths import RUN_FOLDER_INSIDE, check_name_lengths

# Why an option may not change when a run is resumed; everything not listed here may.
_TRAINING = "it decides what the run trains on"
_OPTIMISER = "the optimiser's restored state was built with it"
_SCHEDULE = "it changes the length of the run's learning-rate schedule"


def _option(default: Any, fixed: str | None = None, path: bool = False, per_invocation: bool = False) -> Any:
    """A field of :class:`RunConfig`.

    ``fixed``: why the option cannot change on resume; ``path``: expanded and made absolute;
    ``per_invocation``: belongs to one command, not to the run, so a resume does not inherit it.
    """
    metadata = {"fixed": fixed, "path": path, "per_invocation": per_invocation}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class RunConfig:
    """Every option of a training run, resolved. Build it with ``run.resolve.resolve_run_config``."""

    # network and recipe
    model: str = _option(COURSE_RECIPE.model_name, fixed=_TRAINING)
    identity_shortcut: bool = _option(False, fixed=_TRAINING)
    epochs: int | None = _option(None)  # None: COURSE_EPOCHS of the model
    batch_size: int = _option(DATA.batch_size, fixed=_SCHEDULE)
    optimizer: str = _option(COURSE_RECIPE.optimizer, fixed=_OPTIMISER)
    lr: float | str = _option(COURSE_RECIPE.lr, fixed=_OPTIMISER)  # "find": the range test's suggestion
    momentum: float = _option(COURSE_RECIPE.momentum, fixed=_OPTIMISER)
    nesterov: bool = _option(COURSE_RECIPE.nesterov, fixed=_OPTIMISER)
    weight_decay: float = _option(COURSE_RECIPE.weight_decay, fixed=_OPTIMISER)
    scheduler: str = _option(COURSE_RECIPE.scheduler, fixed=_SCHEDULE)
    step_size: int = _option(COURSE_RECIPE.step_size, fixed=_SCHEDULE)
    gamma: float = _option(COURSE_RECIPE.gamma, fixed=_SCHEDULE)
    label_smoothing: float = _option(COURSE_RECIPE.label_smoothing, fixed=_TRAINING)
    ema_decay: float | None = _option(None, fixed=_TRAINING)
    tta: str = _option(COURSE_RECIPE.tta, fixed="the best checkpoint was chosen with it")
    # data
    dataset: str = _option(DATA.dataset, fixed=_TRAINING)
    data_dir: Path = _option(DATA.data_dir, path=True)
    eval_batch_size: int = _option(DATA.eval_batch_size)
    data_path: str = _option(DATA.data_path)
    workers: int = _option(DATA.num_workers)
    cache_dir: Path | None = _option(None, path=True)
    val_size: int = _option(DATA.val_size, fixed=_TRAINING)
    train_limit: int | None = _option(None, fixed=_TRAINING)
    # hardware (resolved: never auto)
    accelerator: str = _option("auto")
    devices: Any = _option("auto", fixed=_SCHEDULE)
    precision: str = _option("auto")
    precision_reason: str | None = _option(None)  # resolved: why this precision (no flag: see DERIVED)
    channels_last: bool | None = _option(None)
    compile: bool = _option(False)
    num_nodes: int = _option(1, fixed=_SCHEDULE)
    strategy: str = _option("auto")
    # the run
    config: Path | None = _option(None, path=True, per_invocation=True)  # the YAML these options came from
    output_dir: Path = _option("runs", path=True)
    run_name: str | None = _option(None)
    seed: int = _option(0, fixed=_TRAINING)
    resume: Path | None = _option(None, path=True, per_invocation=True)
    rewind: bool = _option(False, per_invocation=True)  # --resume from an earlier checkpoint than the run's latest
    weights: Path | None = _option(None, path=True, per_invocation=True)
    checkpoint_every: int = _option(20)
    results_json: Path | None = _option(None, path=True, per_invocation=True)
    time_to_accuracy: float | None = _option(None, per_invocation=True)
    log_every_n_steps: int = _option(50)
    logger: tuple[str, ...] = _option(("tensorboard",))
    requeue_signal: str | None = _option(None)
    find_lr: bool = _option(False, per_invocation=True)  # only the learning-rate range test
    # quick runs
    fast_dev_run: int = _option(0, per_invocation=True)
    limit_train_batches: int | float | None = _option(None, fixed=_SCHEDULE)
    limit_val_batches: int | float | None = _option(None, fixed="the best checkpoint is chosen by validating on it")
    limit_test_batches: int | float | None = _option(None)

    @property
    def hardware(self) -> Hardware:
        """This run's accelerator, devices and precision."""
        return Hardware(self.accelerator, self.devices, self.precision, self.precision_reason or "asked for")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values: paths as strings, a device list as ``0,1``."""
        values = dataclasses.asdict(self)
        for name, value in values.items():
            if isinstance(value, Path):
                values[name] = str(value)
            elif isinstance(value, tuple):
                values[name] = ",".join(map(str, value))
        return values

    def model_options(self) -> dict[str, Any]:
        return {"identity_shortcut": True} if self.identity_shortcut else {}


FIELDS = {option.name: option for option in dataclasses.fields(RunConfig)}
# Facts the resolution adds, not options: a run's config.yaml holds them, a --config file may too
# (that run's saved config, to run it again), where they are ignored.
DERIVED = ("precision_reason",)
# What a run's saved config.yaml holds about that run and its commands rather than its recipe: given
# as --config it starts a new run with the recipe, not with these (the run's name, what it resumed
# or rewound from, the file its options came from, and where it wrote its results, which a new run
# must not write over).
NOT_RECIPE = ("run_name", "resume", "rewind", "config", "results_json")
LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches")
SGD_ONLY = ("momentum", "nesterov")
DEFAULTS: dict[str, Any] = {name: option.default for name, option in FIELDS.items()}
FIXED_ON_RESUME = {name: option.metadata["fixed"] for name, option in FIELDS.items() if option.metadata["fixed"]}
PER_INVOCATION = {name for name, option in FIELDS.items() if option.metadata["per_invocation"]}


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of option names to values (a ``--config`` file or a run's ``config.yaml``).

    Read by ``base.yamlfile``: numbers and booleans only in the spellings that mean one thing (no
    YAML 1.1 octal or base 60), a key given twice or a file that is not a YAML mapping refused
    with its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}; see configs/ for the shipped recipes")
    return {entry.key: entry.value for entry in read_mapping(path)}


def write_config(values: Mapping[str, Any], path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(dict(values), sort_keys=False))


def absolute_path(value: str | os.PathLike[str]) -> Path:
    """``value`` with ``~`` and environment variables expanded, made absolute (not resolving links)."""
    return Path(os.path.abspath(os.path.expandvars(os.path.expanduser(os.fspath(value)))))


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """The built-in defaults overlaid by each layer in turn; unknown keys are refused."""
    values = dict(DEFAULTS)
    for layer in layers:
        unknown = sorted(set(layer) - set(FIELDS))
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)}; valid options are: {', '.join(sorted(FIELDS))}")
        values.update(layer)
    return values


def settle(values: Mapping[str, Any], model: str | None = None, model_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merged ``values`` checked and completed as far as possible without torch: paths absolute,
    the network and run length known, the run name, the hardware request and the data's place checked.

    ``model`` and ``model_options``, when given, are the network of the checkpoint the run starts
    from; a different ``model`` in ``values`` that the user asked for is an error.
    """
    values = dict(values)
    for name, option in FIELDS.items():
        if option.metadata["path"] and values.get(name) is not None:
            values[name] = absolute_path(values[name])
    if model is not None:
        values["model"] = model
        values["identity_shortcut"] = bool((model_options or {}).get("identity_shortcut", False))
    if values["identity_shortcut"] and values["model"] != "resnet50":
        raise UserError("--identity-shortcut applies to resnet50 only")
    if values["model"] not in COURSE_EPOCHS:
        raise UserError(f"unknown model {values['model']!r}: choose one of {', '.join(COURSE_EPOCHS)}")
    values["epochs"] = values["epochs"] or COURSE_EPOCHS[values["model"]]
    for name in LIMITS:
        values[name] = _limit(values[name])
    if values["run_name"] is not None:
        _check_run_name(values["run_name"])
    check_hardware_request(values["accelerator"], values["devices"], values["precision"])
    # Folders that may still have to be created: names the file system takes (not an OSError later).
    check_name_lengths(values["data_dir"], "--data-dir")
    if values["cache_dir"] is not None:
        check_name_lengths(values["cache_dir"], "--cache-dir", inside=RUN_FOLDER_INSIDE)
    # Names and headers only; a missing or empty folder is where the data will be downloaded.
    check_data_dir(values["data_dir"], download=True)
    return values


def build_config(values: Mapping[str, Any], model: str | None = None, model_options: Mapping[str, Any] | None = None) -> RunConfig:
    """A :class:`RunConfig` from merged ``values``: :func:`settle`, then :func:`complete`.
    ``model``, ``model_options``: as for :func:`settle`."""
    return complete(settle(values, model, model_options))


def complete(settled: Mapping[str, Any], machine: Machine | None = None) -> RunConfig:
    """The :class:`RunConfig` of ``settled`` values (:func:`settle`), its hardware resolved on
    ``machine`` (default: this one, probed, which loads torch)."""
    values = dict(settled)
    hardware = resolve_hardware(values["accelerator"], values["devices"], values["precision"], machine)
    values.update(accelerator=hardware.accelerator, devices=hardware.devices, precision=hardware.precision,
                  precision_reason=hardware.precision_reason)
    values["channels_last"] = use_channels_last(values["channels_last"], hardware)
    return RunConfig(**values)


def _limit(value: Any) -> Any:
    """A ``--limit-*-batches`` value; 1.0 (the whole split, a fraction) is the same as not set."""
    return None if isinstance(value, float) and value == 1.0 else value


def _check_run_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith("."):
        raise UserError(f"--run-name {name!r}: a run name is one folder name (no '/', not starting with '.')")


def changed_fixed_options(saved: Mapping[str, Any], wanted: Mapping[str, Any], machine: Machine | None) -> list[str]:
    """One line per option that may not change mid-run but differs between a run and its resume.

    ``saved``: the run's options as its ``config.yaml`` holds them, merged over the defaults;
    ``wanted``: the options of the resume, settled (:func:`settle`) or resolved. Devices are
    compared as process counts on ``machine``, and not at all while it is unknown (None).
    """
    problems = []
    for name, why in FIXED_ON_RESUME.items():
        if name in SGD_ONLY and saved["optimizer"] != "sgd":
            continue  # unused by the run's optimiser: nothing to keep consistent
        before, after = saved[name], wanted[name]
        if name in LIMITS:
            before = _limit(before)
        if FIELDS[name].metadata["path"] and before is not None:
            before = absolute_path(before)
        if name == "devices":
            if machine is None:
                continue
            before = _device_count(before, wanted["accelerator"], machine)
            after = _device_count(after, wanted["accelerator"], machine)
        if before != after:
            problems.append(f"--{name.replace('_', '-')} {_show(after)} (the run has {_show(before)}): {why}")
    if wanted["epochs"] != saved["epochs"] and saved["scheduler"] in ("onecycle", "cosine"):
        problems.append(
            f"--epochs {wanted['epochs']} (the run has {saved['epochs']}): its {saved['scheduler']} schedule was built "
            "for that many epochs and cannot be stretched"
        )
    return problems


def _device_count(devices: Any, accelerator: str, machine: Machine) -> Any:
    try:
        return resolve_hardware(accelerator, devices, "32-true", machine).device_count
    except UserError:
        return devices  # not runnable here: shown as saved, and differs from any count


def _show(value: Any) -> str:
    if value is None:
        return "not set"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)

