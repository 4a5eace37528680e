"""Bad input, reported the same way by every command: `error: <thing>: <reason>` on stderr, exit status 2.

Every error a user can fix (a bad file, flag, image, checkpoint or request) is an `InputError` (or one of its
subclasses: data validation, DeepSpeed config, checkpoint, export, question and chat errors). Entry points wrap
their work in `report_input_errors`, so such an error never shows as a traceback. docs/bad_input.md is the
contract.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

INPUT_ERROR_EXIT = 2


class InputError(ValueError):
    """Something the user gave cannot be used; the message names it and says why (one line where possible)."""


# Raised by the standard library for a path the user named: their messages already name the file.
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def report_input_errors(main: Callable[[], int | None], extra: tuple[type[BaseException], ...] = ()) -> int:
    """Run `main()`; turn an InputError (or a user-path OSError, or one of `extra`) into one stderr line and
    exit status 2. Anything else is a bug and keeps its traceback."""
    try:
        return main() or 0
    except (InputError, *USER_OS_ERRORS, *extra) as err:
        print(f"error: {describe(err)}", file=sys.stderr, flush=True)
        return INPUT_ERROR_EXIT


def describe(err: BaseException) -> str:
    """The message of `err`; an OSError as 'path: reason' (its str() is '[Errno 2] No such file ...: path')."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror.lower()}"
    return str(err) or type(err).__name__
