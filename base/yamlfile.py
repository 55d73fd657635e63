"""YAML configs read so that what is written is what runs, or refused in one line with the line number.

PyYAML implements YAML 1.1, whose implicit types surprise people: ``run_name: 0123`` is the octal
integer 83, ``seed: 010`` is 8, ``12:30`` is the base-60 integer 750, ``nesterov: no`` is false,
``2024-05-01`` a date, and a key written twice silently keeps its last value. Here a plain scalar
is a number, a boolean or null only in the spellings that mean the same in YAML 1.1 and 1.2 and to a
person:

* null: empty, ``~``, ``null`` (``Null``, ``NULL``); booleans: ``true``, ``false`` (capitalised or
  upper case too);
* integers: decimal digits with an optional sign and no leading zero (``0``, ``100``, ``-3``);
* floats: digits with a decimal point, an optional signed exponent (``0.001``, ``1.0e-05``,
  ``.5``), and ``.inf``, ``.nan``.

Anything else plain (``0123``, ``010``, ``12:30``, ``yes``, ``0x10``, ``1e-3``, dates) stays the
text it is, and the flag it feeds parses or refuses it as typed on the command line. Each of
these sets is a subset of YAML 1.1's, so a string that ``yaml.safe_dump`` wrote unquoted (it
quotes what 1.1 would read as another type) reads back as the same string. Explicit tags
(``!!int 010``) read as decimal too. Two entries with the same key, a file that is not UTF-8
text or not YAML, and a document that is not a mapping are refused naming the line.

Torch-free and small: the commands read ``--config`` before the heavy imports.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from base.errors import UserError

# A config is a handful of lines; anything far bigger is another file given by mistake (a checkpoint).
MAX_BYTES = 1 << 20
EXAMPLE = "'batch_size: 100'"


class _Loader(yaml.SafeLoader):
    """SafeLoader with the implicit types of the module docstring instead of YAML 1.1's."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}


_RESOLVERS = (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:int", r"^[-+]?(?:0|[1-9][0-9]*)$", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?[0-9]+\.[0-9]*(?:[eE][-+][0-9]+)?|\.[0-9]+(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
)
for _tag, _pattern, _first in _RESOLVERS:
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _construct_int(loader: SafeConstructor, node: Node) -> int:
    # Only an explicit !!int reaches here with anything but plain decimal digits: read it as decimal.
    text = loader.construct_scalar(node)
    try:
        return int(str(text).replace("_", ""), 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"!!int {text!r} is not a decimal integer", node.start_mark
        ) from None


def _construct_float(loader: SafeConstructor, node: Node) -> float:
    text = str(loader.construct_scalar(node))
    special = {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}
    if text.lower() in special:
        return special[text.lower()]
    try:
        return float(text.replace("_", ""))  # no base 60: "1:30" is refused, not 90.0
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"!!float {text!r} is not a number", node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


@dataclass(frozen=True)
class Entry:
    """One ``key: value`` line of a config: ``line`` counts from 1; ``written`` is a scalar's text as
    it stands in the file (without quotes), None for lists and mappings."""

    key: Any
    value: Any
    line: int
    written: str | None


def _kind(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, ScalarNode):
        return f"the single value {node.value!r}" if len(node.value) <= 40 else "a single value"
    return "something else"


def _check_unique_keys(node: Node, where: str, seen_nodes: set[int]) -> None:
    """Refuse a mapping, at any depth, that names one key twice (YAML would keep the last silently)."""
    if id(node) in seen_nodes:  # an alias of a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode):
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise UserError(
                        f"{where}: line {line}: {key!r} is given twice (first on line {first_line[key]}); "
                        "keep one of them"
                    )
                first_line[key] = line
            _check_unique_keys(value_node, where, seen_nodes)
    elif isinstance(node, SequenceNode):
        for item in node.value:
            _check_unique_keys(item, where, seen_nodes)


def _line_of_offset(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def parse_mapping(text: str, where: str) -> list[Entry]:
    """The entries of the YAML mapping ``text`` in file order; ``where`` names it in errors.

    An empty document is an empty mapping. A UserError naming the line for invalid YAML, a
    document that is not a mapping, a key given twice, or a value with a tag that is not plain data.
    """
    loader = None
    try:
        try:
            loader = _Loader(text)  # reads the whole text first: a control character fails here
            node = loader.get_single_node()
            if node is None:
                return []
            if not isinstance(node, MappingNode):
                raise UserError(
                    f"{where}: line {node.start_mark.line + 1}: a config must be a mapping of option names to "
                    f"values, one per line such as {EXAMPLE}; this file holds {_kind(node)}"
                )
            _check_unique_keys(node, where, set())
            entries = []
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                value = loader.construct_object(value_node, deep=True)
                written = value_node.value if isinstance(value_node, ScalarNode) else None
                entries.append(Entry(key, value, key_node.start_mark.line + 1, written))
            return entries
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f"line {mark.line + 1}: " if mark is not None else ""
            problem = " ".join(part for part in (exc.context, exc.problem) if part) or type(exc).__name__
            raise UserError(f"{where}: {line}not valid YAML ({problem}); write one option per line, such as {EXAMPLE}") from None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            raise UserError(
                f"{where}: line {line}: not a YAML text file (it holds the control character #x{exc.character:02x}); "
                f"pass a YAML config, one option per line such as {EXAMPLE}"
            ) from None
        except yaml.YAMLError as exc:  # anything else PyYAML raises: still one line
            raise UserError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_mapping(path: str | Path) -> list[Entry]:
    """:func:`parse_mapping` of the file ``path``, which must be UTF-8 text of at most :data:`MAX_BYTES`.

    The caller checks that the file exists; a folder or an unreadable file is a UserError.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise UserError(
                f"{path} is {size / 2**20:.0f} MiB, far too big for a YAML config (is it another file?); "
                f"pass a YAML config, one option per line such as {EXAMPLE}"
            )
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; pass a YAML config file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: line {_line_of_offset(data, exc.start)}: not a YAML text file (byte 0x{data[exc.start]:02x} is "
            f"not UTF-8 text); pass a YAML config, one option per line such as {EXAMPLE}"
        ) from None
    return parse_mapping(text.removeprefix("\ufeff"), str(path))
