"""The one exception type for mistakes a user can fix (a bad path, a malformed row, a wrong key).

`cirlab <command>` prints it as one line, ``cirlab <command>: error: <message>`` (plus the hint, if
any), and exits 2; the traceback only with ``--debug`` or ``CIRLAB_DEBUG=1``. Library code raises
it (or a subclass) wherever the cause is the user's input, never for a bug of ours.
"""

from __future__ import annotations


class CirlabError(Exception):
    """A user error: `message` says what is wrong and names the thing, `hint` says how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"
