"""Errors a user can fix: printed as one line naming the problem and the fix, no traceback.

Every user-facing error class derives from `ClawlyError` (the doors catch that one class); most are
also `ValueError`s, as the bad input they report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


class CorruptInputError(ClawlyError, ValueError):
    """A stage's input exists but cannot be read: cut short by a kill, or damaged."""


@contextlib.contextmanager
def reading(path: str | Path, made_by: str) -> Iterator[None]:
    """Read a stage's output inside this block: a missing file is a MissingInputError, one whose
    parser fails (truncated Parquet or safetensors, broken JSON, missing keys) a CorruptInputError
    naming the file and the stage that makes it."""
    require(path, made_by)
    try:
        yield
    except ClawlyError:
        raise
    except Exception as e:  # noqa: BLE001 - parsers fail in many types (ArrowInvalid, SafetensorError, KeyError...)
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        raise CorruptInputError(f"{path} cannot be read ({type(e).__name__}: {detail}): it was cut short or "
                                f"damaged; rerun '{made_by}' (python -m stages.{made_by.replace('-', '_')}, or "
                                "dvc repro --force on it)") from None
