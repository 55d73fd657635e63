"""The resolved configuration of one training run: every option, merged once, typed, never mutated.

Built-in defaults, a resumed run's saved options, a ``--config`` file and the flags typed are
merged in that order (a later source wins) by ``run.life.resolve_run_config``, which returns a frozen
:class:`RunConfig` in which nothing is left to decide later: the network is known (from the
checkpoint when one is resumed or started from), ``epochs`` is a number, hardware ``auto``
values are what Lightning will use here, and every path is expanded (``~``, ``$VARS``) and
absolute. ``config.yaml`` in the run folder is :meth:`RunConfig.to_dict` of it.

Every option, its default and its resume rule are declared once, in ``base.schema``; the
fields of :class:`RunConfig` are those of the schema's groups. This module loads neither
torch nor Lightning until :func:`build_config` asks PyTorch about the hardware: :func:`settle`
does every check that needs neither, so that a mistake in the flags is refused at once;
``run.life.resolve`` does the rest of the resolution.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from base.errors import UserError
from base.files import atomic_write_text
from base.yamlfile import read_mapping
from base.schema import (
    DEFAULTS,
    FIELDS,
    GROUPS,
    flatten_sections,
    group_names,
    group_values,
    logger_list,
    option_of,
    plain,
    shown,
)
from datamodules.layout import check_data_dir
from models.catalog import check_options, describe_options, entry, option_defaults
from run.loggers import check_loggers
from run.hardware import Hardware, Machine, check_compiler, check_hardware_request, resolve_hardware, use_channels_last
from run.paths import RUN_FOLDER_INSIDE, check_name_lengths

G = TypeVar("G")
# One field per option of the schema, in its groups' order, with its default and metadata.
_RUN_CONFIG_FIELDS = dataclasses.make_dataclass(
    "RunConfigFields",
    [(name, f.type, dataclasses.field(default=f.default, metadata=f.metadata)) for name, f in FIELDS.items()],
    frozen=True,
)



class RunConfig(_RUN_CONFIG_FIELDS):  # type: ignore[misc, valid-type]
    """Every option of a training run, resolved: one flat field per option of ``base.schema``'s
    groups, frozen. Build it with ``run.life.resolve_run_config``."""

    @property
    def hardware(self) -> Hardware:
        """This run's accelerator, devices and precision."""
        return Hardware(self.accelerator, self.devices, self.precision, self.precision_reason or "asked for")

    @property
    def described_model(self) -> str:
        """The network and the options it was given: ``resnet50 (identity shortcuts)``."""
        return self.model + describe_options(self.model, self.to_dict())

    def group(self, group: type[G]) -> G:
        """The options of one ``base.schema`` group (``NetworkOptions``, ``DataOptions``, ...)."""
        return group_values(group, self)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values, flat: paths as strings, a device list as ``0,1``, a logger list as a list."""
        values = {name: plain(getattr(self, name)) for name in FIELDS}
        if isinstance(self.devices, tuple):
            values["devices"] = ",".join(map(str, self.devices))
        return values

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """:meth:`to_dict` grouped under the schema's section names, as ``--print-config`` shows it."""
        flat = self.to_dict()
        return {section: {name: flat[name] for name in group_names(group)} for section, group in GROUPS.items()}


# Facts the resolution adds, not options: a run's config.yaml holds them, a --config file may too
# (that run's saved config, to run it again), where they are ignored.
DERIVED = tuple(name for name in FIELDS if not option_of(name).flag)
# What a run's saved config.yaml holds about that run and its commands rather than its recipe: given
# as --config it starts a new run with the recipe, not with these (the run's name, what it resumed
# or rewound from, the file its options came from, and where it wrote its results, which a new run
# must not write over).
NOT_RECIPE = ("run_name", "resume", "rewind", "config", "results_json")
LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches")
SGD_ONLY = ("momentum", "nesterov")
FIXED_ON_RESUME = {name: option_of(name).fixed for name in FIELDS if option_of(name).fixed}
PER_INVOCATION = {name for name in FIELDS if option_of(name).per_invocation}


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of option names to values (a ``--config`` file or a run's ``config.yaml``).

    Read by ``base.yamlfile``: numbers and booleans only in the spellings that mean one thing (no
    YAML 1.1 octal or base 60), a key given twice or a file that is not a YAML mapping refused
    with its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"config file not found: {path}; a shipped recipe is named without a path "
            "(--config resnet50_fast, --config vgg16)"
        )
    entries = read_mapping(path)
    return flatten_sections({entry.key: entry.value for entry in entries}, {entry.key: entry.line for entry in entries},
                            str(path))[0]


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
    from, with its options that show in its weights (the others of them at their defaults), whatever
    ``values`` say; its options that hold no weight (``dropout``) are ``values``'.
    """
    values = dict(values)
    for name in FIELDS:
        if option_of(name).path and values.get(name) is not None:
            values[name] = absolute_path(values[name])
    if model is not None:
        shaping = option_defaults(in_state_dict=True)
        values.update(shaping, **{k: v for k, v in (model_options or {}).items() if k in shaping}, model=model)
    network = entry(values["model"])  # an unknown name (a config file's) is refused with the choices
    check_options(network.name, values)  # --identity-shortcut with --model vgg16
    values["epochs"] = values["epochs"] or network.course_epochs
    # A YAML list, a saved "tensorboard,csv" or the flag's tuple: one form.
    values["logger"] = logger_list(values["logger"]) if isinstance(values["logger"], str) else tuple(values["logger"])
    check_loggers(values["logger"])  # --logger mlflow without MLflow installed: refused with the flags
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
    check_data_dir(values["data_dir"], download=True, dataset=values["dataset"])
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
    if values["compile"]:
        check_compiler(hardware.accelerator)  # found now, not as a traceback at the first step
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
        if option_of(name).path and before is not None:
            before = absolute_path(before)
        if name == "devices":
            if machine is None:
                continue
            before = _device_count(before, wanted["accelerator"], machine)
            after = _device_count(after, wanted["accelerator"], machine)
        if before != after:
            problems.append(f"--{name.replace('_', '-')} {shown(after)} (the run has {shown(before)}): {why}")
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
