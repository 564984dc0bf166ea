"""Exception types that tell a user's mistake from a bug.

The command-line tools print a ``UserInputError`` as one line and exit with code 2; any other
exception is a bug and keeps its traceback. ``UserInputError`` subclasses ``ValueError`` so that
library callers who catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["UserInputError", "UnsafeFileError"]


class UserInputError(ValueError):
    """Bad input from the user: an argument, a config value, a file that is missing or wrong.
    The message names the argument or file and the reason, in one line."""


class UnsafeFileError(UserInputError):
    """A file that should hold only plain types and tensors holds something else (a pickled
    object, code); it is refused without running anything."""
