"""YAML configs as flag defaults: a config file is read as if its keys were typed before the flags.

Turning ``batch_size: 100`` into ``--batch-size 100`` means a config value goes through exactly the
same type checks and error messages as a flag, and any flag typed on the command line wins.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from base.errors import UserError
from base.schema import flatten_sections
from base.yamlfile import read_mapping
from cli.flags import closest, did_you_mean
from run.config import DERIVED, NOT_RECIPE, read_config


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def config_to_argv(
    config: dict[str, Any],
    parser: argparse.ArgumentParser,
    source: str,
    written: dict[Any, str | None] | None = None,
    lines: dict[Any, int] | None = None,
) -> list[str]:
    """Flags equivalent to ``config``; unknown keys are refused with the list of valid ones.

    ``written``: each key's value as the file spells it, passed to the flag as typed, so that a
    number means what it says (``run_name: 1.10`` is the name "1.10", not 1.1); ``lines``: each
    key's line, named in errors. One option given under two spellings (``batch-size`` and
    ``batch_size``) is refused rather than one of them silently winning.
    """
    actions = _actions_by_dest(parser)
    written, lines = written or {}, lines or {}
    config, lines = flatten_sections(config, lines, source)
    # A run's saved config.yaml (it holds the facts the resolution adds) starts a new run with its
    # options: its name, what it resumed from and its outputs belong to that run (run.config.NOT_RECIPE).
    skipped = set(DERIVED) | (set(NOT_RECIPE) if any(key in config for key in DERIVED) else set())
    argv: list[str] = []
    seen: dict[str, Any] = {}
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        where = f"{source}: line {lines[key]}" if key in lines else source
        if dest in seen:
            raise UserError(f"{where}: {key!r} is the option {seen[dest]!r} again; keep one of them")
        seen[dest] = key
        # null is "not set"; a run's saved config.yaml has such entries.
        if value is None or dest in skipped:
            continue
        action = actions.get(dest)
        if action is None or dest == "config":
            valid = sorted(d for d in actions if d != "config")
            hint = did_you_mean(dest, valid)
            raise UserError(f"{where}: unknown option {key!r}{hint}; valid options are: {', '.join(valid)}")
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UserError(f"{where}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UserError(f"{where}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        elif isinstance(value, (int, float)) and written.get(key) is not None:
            argv += [flag, str(written[key])]
        elif isinstance(value, list) and all(isinstance(item, (str, int)) for item in value):
            argv += [flag, ",".join(map(str, value))]  # logger: [tensorboard, csv], devices: [0, 1]
        else:
            argv += [flag, str(value)]
    return argv


# The shipped recipes (configs/*.yaml): beside the code in a checkout or an editable install, or
# where a wheel installs them (pyproject.toml's data-files).
SHIPPED_CONFIG_DIRS = (
    Path(__file__).resolve().parents[1] / "configs",
    Path(sys.prefix) / "share" / "cifar10-lightning" / "configs",
)


def shipped_configs() -> dict[str, Path]:
    """The shipped recipes by name (``resnet50_fast``: its ``.yaml`` file), the first folder's first."""
    found: dict[str, Path] = {}
    for folder in SHIPPED_CONFIG_DIRS:
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            found.setdefault(path.stem, path)
    return found


def find_config(given: str | Path) -> Path:
    """The file ``--config given`` means: the file itself, else the shipped recipe it names, from any folder.

    A shipped recipe is named by its name (``resnet50_fast``), its file name (``resnet50_fast.yaml``)
    or its path in the project (``configs/resnet50_fast.yaml``, typed in another folder): a file of
    that path in the current folder always wins, and the recipe used is said on stderr when the
    path typed was not the file read. A UserError names the recipes when there is neither.
    """
    path = Path(given)
    if path.is_file():
        return path
    shipped = shipped_configs()
    parts = path.parts
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if name in shipped and (len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs")):
        if len(parts) == 2:
            print(f"--config {given}: not in {Path.cwd()}; using the shipped recipe {shipped[name]}", file=sys.stderr)
        return shipped[name]
    if len(parts) == 1 and not path.suffix:
        hint = did_you_mean(name, shipped)
        raise UserError(
            f"--config {given}: no such file, nor a shipped recipe{hint}; the recipes are {', '.join(shipped) or 'none'}, "
            "or give a YAML file's path"
        )
    if (len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs")) and path.suffix == ".yaml":
        # A mistyped recipe file (configs/vgg16-fast.yaml): the recipe it is closest to, typed the same way.
        near = closest(name, shipped)
        if near:
            meant = str(path.with_name(f"{near}.yaml"))
            raise UserError(f"--config {given}: no such file (did you mean {meant}?); the recipes are {', '.join(shipped)}")
    return path  # not found: read_config refuses it with the message every config reader gives


def parse_config_file(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """The options of the YAML file ``path``, type-checked as flags; a bad value names the file."""
    if not Path(path).is_file():
        read_config(path)  # refuses it with the message every config reader gives
    entries = read_mapping(path)
    config, lines = flatten_sections({entry.key: entry.value for entry in entries},
                                      {entry.key: entry.line for entry in entries}, str(path))
    written = {entry.key: entry.written for entry in entries}
    argv = config_to_argv(config, parser, str(path), written, lines)
    actions = _actions_by_dest(parser)
    parser.error_source = str(path)  # type: ignore[attr-defined]
    # A value the flag refuses is reported at its line of the file (a sectioned key at its section's).
    parser.error_lines = {  # type: ignore[attr-defined]
        actions[dest].option_strings[0]: line
        for key, line in lines.items()
        if (dest := str(key).replace("-", "_")) in actions
    }
    try:
        return vars(parser.parse_args(argv))
    finally:
        parser.error_source = None  # type: ignore[attr-defined]
        parser.error_lines = {}  # type: ignore[attr-defined]
