"""The exceptions the command-line tools turn into a one-line message and an exit code."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: a message that names the problem and says what to do.

    The entry points print it as a single ``error: ...`` line and exit non-zero, without a
    traceback, so it must only be raised for problems the user can fix, never for bugs.
    """


class Interrupted(Exception):
    """The user stopped the program with Ctrl-C after its work was saved; the entry points exit 130."""


@contextmanager
def ctrl_c_raises(message: str) -> Iterator[None]:
    """Within the block, Ctrl-C raises :class:`Interrupted` with ``message`` instead of KeyboardInterrupt.

    Lightning turns a KeyboardInterrupt inside ``trainer.test`` into a silent exit code 1; any
    other exception it passes on, so the entry point can say what was kept and exit 130. Only
    the main thread can handle signals; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(message)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
