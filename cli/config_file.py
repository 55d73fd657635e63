"""YAML configs as flag defaults: a config file is read as if its keys were typed before the flags.

Turning ``batch_size: 100`` into ``--batch-size 100`` means a config value goes through exactly the
same type checks and error messages as a flag, and any flag typed on the command line wins.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from base.errors import UserError
from run.config import DERIVED, read_config


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def config_to_argv(config: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Flags equivalent to ``config``; unknown keys are refused with the list of valid ones."""
    actions = _actions_by_dest(parser)
    # A run's saved config.yaml (it holds the facts the resolution adds) starts a new run with its
    # options: the run's own name and the checkpoint it resumed from identify it, not its recipe.
    skipped = set(DERIVED) | ({"run_name", "resume"} if any(key in config for key in DERIVED) else set())
    argv: list[str] = []
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        # null is "not set"; a run's saved config.yaml has such entries.
        if value is None or dest in skipped:
            continue
        action = actions.get(dest)
        if action is None or dest == "config":
            valid = ", ".join(sorted(d for d in actions if d != "config"))
            raise UserError(f"{source}: unknown option {key!r}; valid options are: {valid}")
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UserError(f"{source}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UserError(f"{source}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def parse_config_file(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """The options of the YAML file ``path``, type-checked as flags; a bad value names the file."""
    argv = config_to_argv(read_config(path), parser, str(path))
    parser.error_source = str(path)  # type: ignore[attr-defined]
    try:
        return vars(parser.parse_args(argv))
    finally:
        parser.error_source = None  # type: ignore[attr-defined]
