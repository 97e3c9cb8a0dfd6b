"""Errors a user can fix: printed as one line naming the problem and the fix, no traceback.

Every user-facing error class derives from `ClawlyError` (the doors catch that one class); most are
also `ValueError`s, as the bad input they report.
"""

from __future__ import annotations

from pathlib import Path


class ClawlyError(Exception):
    """Base of clawly's user-facing errors."""


class MissingInputError(ClawlyError, FileNotFoundError):
    """A stage's input does not exist: the message names the stage that makes it."""


def require(path: str | Path, made_by: str) -> None:
    """Raise MissingInputError unless `path` exists."""
    if not Path(path).exists():
        raise MissingInputError(f"{path} does not exist: run the '{made_by}' stage first "
                                f"(python -m stages.{made_by.replace('-', '_')}, or dvc repro)")
