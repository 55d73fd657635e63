"""Bookkeeping of every bad input the tests try, written out as docs/robustness.md.

:func:`assert_one_line_error` records each command it checks, and tests that verify files
survived a failure record what they checked with :func:`record_files`. When the environment
variable ``ROBUSTNESS_REPORT`` names a file, the ``pytest_sessionfinish`` hook in conftest.py
writes the tables there with :func:`write_report`. Recording happens before the assertions, so
a regression shows up in the report as well as in the failed test.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_ENV = "ROBUSTNESS_REPORT"
ROOT = Path(__file__).resolve().parents[1]
# Flags every case adds only to run quickly and in a private folder; they say nothing about the case.
_QUIET_FLAGS = {"--accelerator": "cpu", "--workers": "0"}
_HIDDEN_WITH_VALUE = ("--output-dir",)


@dataclass
class Case:
    test: str
    command: str
    code: int
    message: str
    clear: bool
    traceback: bool


@dataclass
class FileCheck:
    test: str
    what: str
    files: int
    corrupted: int


@dataclass
class RunCheck:
    test: str
    what: str
    runs: int
    lost: int


CASES: list[Case] = []
FILE_CHECKS: list[FileCheck] = []
RUN_CHECKS: list[RunCheck] = []


def current_test() -> str:
    """The running test's name with its parameters, e.g. ``test_bad_checkpoints[train-empty]``."""
    node = os.environ.get("PYTEST_CURRENT_TEST", "unknown")
    return node.split("::")[-1].rsplit(" ", 1)[0]


def _mask(text: str) -> str:
    # Temporary and checkout paths differ between machines and runs; the report must not.
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/pytest-of-[^/]+/pytest-\d+/", "$TMP/", text)
    return text.replace(str(ROOT) + "/", "")


def _command(script: str, args: Sequence[str]) -> str:
    shown: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        following = args[i + 1] if i + 1 < len(args) else None
        if (arg in _QUIET_FLAGS and _QUIET_FLAGS[arg] == following) or arg in _HIDDEN_WITH_VALUE:
            skip = True
            continue
        shown.append(arg)
    return _mask(" ".join([f"{script}.py", *shown]))


def record_case(script: str, args: Sequence[str], code: int, err: str) -> None:
    """Record one command that was given bad input, and how it answered."""
    lines = err.strip().splitlines()
    # The program name in a message is argv[0], "pytest" or "cli" when run in-process.
    message = re.sub(r"^\S+: error:", f"{script}.py: error:", lines[0]) if lines else ""
    CASES.append(
        Case(
            test=current_test(),
            command=_command(script, args),
            code=code,
            message=_mask(message),
            clear=code == 2 and len(lines) == 1 and "error:" in lines[0],
            traceback="Traceback" in err,
        )
    )


def assert_one_line_error(result: Any, *fragments: str) -> None:
    """``result`` (a conftest ``CliResult``) is one ``error:`` line holding every fragment, exit code 2.

    Records the case first, so that the report also shows a case that fails.
    """
    record_case(result.script, result.args, result.code, result.err)
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "error:" in lines[0] and "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def record_files(what: str, files: int, corrupted: int) -> None:
    """Record that a test checked ``files`` files after a failure and found ``corrupted`` of them damaged."""
    FILE_CHECKS.append(FileCheck(current_test(), _mask(what), files, corrupted))


def record_runs(what: str, runs: int, lost: int) -> None:
    """Record that a test checked ``runs`` training runs after an interruption, a resume or a refusal,
    and found ``lost`` of them damaged: overwritten, continued by another run, or no longer resumable."""
    RUN_CHECKS.append(RunCheck(current_test(), _mask(what), runs, lost))


def _group(test: str) -> str:
    return test.split("[", 1)[0]


def recorded_tests() -> set[str]:
    """Names of the test functions that recorded something."""
    return {_group(entry.test) for entry in [*CASES, *FILE_CHECKS, *RUN_CHECKS]}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_report(path: Path, command: str, descriptions: Mapping[str, str]) -> None:
    """Write the markdown report; ``descriptions`` maps test function names to one-line summaries."""
    columns = ("tried", "clear", "tracebacks", "files", "corrupted", "runs", "lost")
    groups: dict[str, dict[str, int]] = {}
    for case in CASES:
        row = groups.setdefault(_group(case.test), dict.fromkeys(columns, 0))
        row["tried"] += 1
        row["clear"] += case.clear
        row["tracebacks"] += case.traceback
    for check in FILE_CHECKS:
        row = groups.setdefault(_group(check.test), dict.fromkeys(columns, 0))
        row["files"] += check.files
        row["corrupted"] += check.corrupted
    for run in RUN_CHECKS:
        row = groups.setdefault(_group(run.test), dict.fromkeys(columns, 0))
        row["runs"] += run.runs
        row["lost"] += run.lost
    totals = {key: sum(row[key] for row in groups.values()) for key in columns}

    out = [
        "# Robustness: bad inputs and interruptions",
        "",
        "Generated by the test suite; do not edit by hand. To regenerate:",
        "",
        f"    {command}",
        "",
        f"**{totals['tried']} bad inputs tried, {totals['clear']} rejected with a clear one-line message "
        f"(exit code 2), {totals['tracebacks']} tracebacks shown; {totals['files']} files checked after "
        f"failures, kills and signals, {totals['corrupted']} corrupted; {totals['runs']} runs checked after "
        f"interruptions, resumes and refusals, {totals['lost']} lost.**",
        "",
        "A clear message is exactly one line on stderr, starting `error:` after the program name, exit code 2, "
        "no traceback. Files checked are checkpoints, reports and configs that must survive a failed save, "
        "a SIGKILL or SIGTERM during training, or a rejected input: each must still load (or be unchanged). "
        "A run is lost when it was overwritten, continued by another run's resume, or can no longer be resumed "
        "to the result it would have had.",
        "",
        "## Summary",
        "",
        "| check | test | tried | clear message | tracebacks | files checked | files corrupted | runs checked | runs lost |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in groups.items():
        out.append(
            f"| {_cell(descriptions.get(name, name))} | `{name}` | {row['tried']} | {row['clear']} | "
            f"{row['tracebacks']} | {row['files']} | {row['corrupted']} | {row['runs']} | {row['lost']} |"
        )
    out.append(
        f"| **total** | | **{totals['tried']}** | **{totals['clear']}** | **{totals['tracebacks']}** | "
        f"**{totals['files']}** | **{totals['corrupted']}** | **{totals['runs']}** | **{totals['lost']}** |"
    )
    out += [
        "",
        "## Every bad input",
        "",
        "Commands are shown without `--accelerator cpu --workers 0 --output-dir DIR`, which the tests add to run "
        "quickly in a private folder; `$TMP` is the test's temporary folder.",
        "",
        "| # | test | command | exit | message |",
        "| ---: | --- | --- | ---: | --- |",
    ]
    for number, case in enumerate(CASES, start=1):
        out.append(
            f"| {number} | `{_cell(_group(case.test))}` | `{_cell(case.command)}` | {case.code} "
            f"| {_cell(case.message)} |"
        )
    if FILE_CHECKS:
        out += [
            "",
            "## Files checked after failures",
            "",
            "| test | what was checked | files | corrupted |",
            "| --- | --- | ---: | ---: |",
        ]
        for check in FILE_CHECKS:
            out.append(f"| `{_cell(check.test)}` | {_cell(check.what)} | {check.files} | {check.corrupted} |")
    if RUN_CHECKS:
        out += [
            "",
            "## Runs checked after interruptions, resumes and refusals",
            "",
            "| test | what was checked | runs | lost |",
            "| --- | --- | ---: | ---: |",
        ]
        for run in RUN_CHECKS:
            out.append(f"| `{_cell(run.test)}` | {_cell(run.what)} | {run.runs} | {run.lost} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
