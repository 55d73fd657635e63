"""YAML configs as flag defaults: a config file is read as if its keys were typed before the flags.

Turning ``batch_size: 100`` into ``--batch-size 100`` means a config value goes through exactly the
same type checks and error messages as a flag, and any flag typed on the command line wins.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError
from common.files import atomic_write_text


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}; see configs/ for the shipped recipes")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a mapping of option names to values, e.g. 'batch_size: 100'")
    return data


def config_to_argv(config: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Flags equivalent to ``config``; unknown keys are refused with the list of valid ones."""
    actions = _actions_by_dest(parser)
    argv: list[str] = []
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest == "config":
            valid = ", ".join(sorted(d for d in actions if d != "config"))
            raise UserError(f"{source}: unknown option {key!r}; valid options are: {valid}")
        if value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UserError(f"{source}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(value)]
    return argv


def write_config(values: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
