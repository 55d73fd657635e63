"""Command-line pieces shared by every entry point: the parser, the flags built from the option
schema, config files read as flags, and one-line errors with their exit codes.

Flags have no defaults of their own: a flag not typed is absent from the parsed namespace, and
``--help`` shows the default that ``run.config.RunConfig`` holds, the one place it is defined.
Only this layer sees an argparse namespace; it hands plain dicts of typed values to ``run``.

Each command's ``main(argv=None) -> int`` (``cli/train.py`` and the others) runs its body in
:func:`one_line_errors`; ``train.py`` and the installed ``cifar10-train`` call ``sys.exit(main())``.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from base.errors import Interrupted, UserError
from base.slurm import process_rank
from base.schema import DEFAULTS, GROUP_OF, TITLES, argparse_kwargs, flag_of, flatten_sections, option_of, shown
from base.yamlfile import read_mapping
from run.config import DERIVED, NOT_RECIPE, read_config


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows a flag's default from ``base.schema`` unless it is None or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # A flag of one entry point only (predict.py's --top-k) keeps its own default.
        default = DEFAULTS.get(action.dest) if action.default is argparse.SUPPRESS else action.default
        if default in (None, False) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {shown(default)})"


def program(script: str) -> str:
    """The name a command's messages start with: ``script`` (``test.py``), or the installed command's
    name (``cifar10-test``, ``[project.scripts]``) when it was started as that."""
    started_as = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return started_as if started_as.startswith("cifar10-") else script


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and defaults shown in --help.

    ``error_source`` names where the arguments being parsed came from (a config file), so that
    a bad value in a YAML file is reported against that file.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self.error_source: str | None = None
        # Set with error_source: the line of the file each flag's value came from.
        self.error_lines: dict[str, int] = {}
        self._parsing: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        # Kept for error(): argparse reports a missing required flag before an unknown one, which
        # is usually the same flag mistyped (export.py --frmat onnx).
        self._parsing = [str(arg) for arg in (sys.argv[1:] if args is None else args)]
        return super().parse_known_args(args, namespace)

    def _unknown_flags(self) -> list[str]:
        """The flag-like words of the arguments being parsed that name no flag, nor abbreviate one."""
        unknown = []
        for arg in self._parsing:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if not arg.startswith("-") or name in self._option_string_actions or self._negative_number_matcher.match(arg):
                continue
            if not any(option.startswith(name) for option in self._option_string_actions if name.startswith("--")):
                unknown.append(arg)
        return unknown

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required") and self._unknown_flags():
            message = "unrecognized arguments: " + " ".join(self._unknown_flags())
        where = f"{self.error_source}: " if self.error_source else ""
        flag = _ARGUMENT.match(message)
        if flag and self.error_source:
            line = next((self.error_lines[name] for name in flag.group(1).split("/") if name in self.error_lines), None)
            where += f"line {line}: " if line else ""
        self.exit(2, f"{self.prog}: error: {where}{message}{self._suggestion(message)} (see --help)\n")

    def _suggestion(self, message: str) -> str:
        """" (did you mean --epochs?)" for a mistyped flag or choice, else ""."""
        unknown = _UNRECOGNISED.match(message)
        if unknown:
            options = [name for name in self._option_string_actions if name.startswith("--")]
            hints = [
                (given, hint)
                for given in unknown.group(1).split()
                if given.startswith("-") and (hint := closest(given.split("=", 1)[0], options))
            ]
            if len(hints) == 1:
                return f" (did you mean {hints[0][1]}?)"
            if hints:
                return " (did you mean " + ", ".join(f"{hint} for {given.split('=', 1)[0]}" for given, hint in hints) + "?)"
            return ""
        choice = _INVALID_CHOICE.search(message)
        if choice:
            choices = re.findall(r"'([^']*)'", choice.group(2))
            hint = closest(choice.group(1), choices, dashes=False)
            return f" (did you mean {hint}?)" if hint else ""
        return ""


# The messages of argparse (Python 3.10 to 3.13) that a suggestion is added to.
_ARGUMENT = re.compile(r"argument (\S+?): ")
_UNRECOGNISED = re.compile(r"unrecognized arguments: (.*)$")
_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def closest(word: str, options: Iterable[str], dashes: bool = True) -> str | None:
    """The one of ``options`` that ``word`` most likely mistypes (``--epcohs``: ``--epochs``), or None.

    Compared without leading dashes, case and the difference between ``_`` and ``-`` (with
    ``dashes``), so ``-epochs`` and ``--batch_size`` find their flags too.
    """
    def norm(text: str) -> str:
        return text.lstrip("-").replace("_", "-").lower() if dashes else text.lower()

    by_norm = {norm(option): option for option in options}
    target = norm(word)
    if target in by_norm and by_norm[target] != word:
        return by_norm[target]
    close = difflib.get_close_matches(target, [n for n in by_norm if by_norm[n] != word], n=1, cutoff=0.7)
    return by_norm[close[0]] if close else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """" (did you mean batch_size?)" when ``word`` is close to one of ``options`` (config keys), else ""."""
    hint = closest(word, options)
    return f" (did you mean {hint}?)" if hint else ""


def catalog_choices(catalog: str) -> Sequence[str]:
    """The names a schema option's ``catalog`` offers: the networks of ``models.catalog`` (read
    without torch, and live: a registered network is a choice too) or the data sets."""
    if catalog == "models":
        from models.catalog import MODEL_NAMES

        return MODEL_NAMES
    from datamodules.datasets import CATALOG

    return tuple(CATALOG)


def add_options(
    parser: argparse.ArgumentParser,
    names: Iterable[str],
    help: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | bool = False,
) -> None:
    """Add the flags of the schema options ``names`` (``base.schema``), under the title of each
    one's group; ``help`` replaces an option's help text for this command (test.py's ``--tta``).

    By default the flags have no defaults: a flag not typed is absent from the namespace
    (``--help`` shows the schema's default), so that later sources of options (a config file, a
    resumed run) know what was typed. ``defaults=True`` gives each flag the schema's default, a
    mapping gives some another (None for predict.py's ``--tta``: the checkpoint's).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in names:
        section = GROUP_OF[name]
        if section not in groups:
            groups[section] = parser.add_argument_group(TITLES[section])
        kwargs = argparse_kwargs(name)
        if option_of(name).catalog:
            kwargs["choices"] = catalog_choices(option_of(name).catalog)
        if help and name in help:
            kwargs["help"] = help[name]
        if defaults is False:
            default = argparse.SUPPRESS
        else:
            default = defaults[name] if isinstance(defaults, Mapping) and name in defaults else DEFAULTS[name]
        groups[section].add_argument(flag_of(name), default=default, **kwargs)


# The options of the data and the hardware that test.py takes besides its own (the data set is the
# checkpoint's: its classes and statistics).
EVAL_DATA = ("data_dir", "eval_batch_size", "data_path", "workers", "cache_dir")
HARDWARE = ("accelerator", "devices", "precision", "channels_last")


def wide_console() -> Console:
    """A rich console for tables; into a file or a pipe it does not wrap at 80 columns (rich's
    default there), which would cut file names over two lines.

    Markup and emoji codes are off: what it prints holds file names, paths and class names, and
    ``[draft] cat.png`` must not lose ``[draft]`` as a style tag, nor ``:cat:`` turn into a picture.
    """
    width = None if sys.stdout.isatty() else 1000
    return Console(width=width, markup=False, emoji=False)


# --- config files, read as if their keys were typed before the flags ----------------------------
# Turning ``batch_size: 100`` into ``--batch-size 100`` means a config value goes through exactly the
# same type checks and error messages as a flag, and any flag typed on the command line wins.


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


# --- one-line errors and exit codes: each command's main runs its body in one_line_errors ---------

# What a shell reports for a process ended by SIGTERM (128 + 15); batch schedulers read it as
# "terminated, may be requeued". Also used for --requeue-signal, so wrappers test one code.
PREEMPTED_EXIT_CODE = 143
# What a shell reports for a process ended by SIGPIPE (128 + 13): its reader went away
# (``predict.py --json | head -n 1``), as ``cat`` and ``grep`` end there.
BROKEN_PIPE_EXIT_CODE = 141


@contextlib.contextmanager
def one_line_errors(argv: Sequence[str] | None) -> Iterator[None]:
    """Run a command's body; a UserError becomes one line on stderr and exit code 2.

    ``argv``: the arguments the command's ``main`` was given. None (the command line) starts each
    message with the name the command was started as (``train.py``, ``cifar10-train``); a list
    (a test or a benchmark calling ``main``) with ``cli``.

    Lightning turns SIGTERM into ``SIGTERMException``, a SystemExit with code 0; it is mapped to
    :data:`PREEMPTED_EXIT_CODE` instead, so that a scheduler never takes a stopped run for a
    finished one. Ctrl-C (and a stop that ``base.errors.Interrupted`` describes) exits 130, a closed
    output pipe :data:`BROKEN_PIPE_EXIT_CODE`. While the body runs, this generator is suspended: it
    is not on the call stack of a training step.
    """
    prog = Path(sys.argv[0]).name if argv is None else "cli"
    try:
        yield
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as exc:
        # Lightning's SIGTERMException, matched by name: importing Lightning here would make
        # every command (--help too) wait for it to load.
        if type(exc).__name__ != "SIGTERMException":
            raise
        _say_once(f"{prog}: stopped by a termination signal (exit code {PREEMPTED_EXIT_CODE})")
        sys.exit(PREEMPTED_EXIT_CODE)
    except Interrupted as exc:
        _say_once(f"{prog}: {exc}")
        sys.exit(130)
    except KeyboardInterrupt:
        _say_once(f"{prog}: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        # The reader of the output closed it (| head): nothing more can be shown, and that is no
        # error. Output still buffered goes nowhere, so that the flush at exit cannot raise again.
        _silence_stdout()
        sys.exit(BROKEN_PIPE_EXIT_CODE)


def _say_once(line: str) -> None:
    """``line`` on stderr from the first process of a run only: a stop reaches every process of a
    multi-process run (a terminal's Ctrl-C, SLURM's signals), and each would say the same."""
    if process_rank() == 0:
        try:
            print(line, file=sys.stderr)
        except (OSError, ValueError):  # the terminal went away with a hang-up
            pass


def _silence_stdout() -> None:
    """Point standard output at the null device (Python's documented way out of a broken pipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stream)
        pass
