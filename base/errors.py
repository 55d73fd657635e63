"""The one exception type that the command-line tools turn into a one-line message."""


class UserError(Exception):
    """Bad input from the user: a message that names the problem and says what to do.

    The entry points print it as a single ``error: ...`` line and exit non-zero, without a
    traceback, so it must only be raised for problems the user can fix, never for bugs.
    """


class Interrupted(Exception):
    """The user stopped the program with Ctrl-C after its work was saved; the entry points exit 130."""
