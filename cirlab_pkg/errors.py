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


# What `cirlab` reports as one line: a CirlabError, or a path that is not there (a recipe's file or
# folder, a flag's). Anything else is a bug of ours and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (CirlabError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def user_error_in(err: BaseException | None) -> BaseException | None:
    """The user's mistake behind `err`: `err` itself or an exception it was raised from (jsonargparse
    raises its own ValueError from what a recipe's class raises while it is built), else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None
