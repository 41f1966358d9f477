"""User-facing errors and warnings.

A `PoiseError` carries one line that names the file, line or field at fault; the CLI prints it
without a traceback and exits non-zero. `PoiseWarning` marks things that are allowed but worth
knowing (unequal task sizes, a zero-variance column).
"""

from __future__ import annotations

import warnings


class PoiseError(Exception):
    """Bad input or a refused operation; the message is one line meant for the user."""


class PoiseWarning(UserWarning):
    """Something legal but suspicious about the input."""


def warn(message: str) -> None:
    warnings.warn(message, PoiseWarning, stacklevel=2)
