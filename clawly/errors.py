"""Errors a user can fix: printed as one line naming the problem and the fix, no traceback.

Every user-facing error class derives from `ClawlyError` (the doors catch that one class); most are
also `ValueError`s, as the bad input they report. A ClawlyError raised while handling another exception
keeps it as its cause (`raise ... from e`): the doors print the one line, and `--debug` or
`CLAWLY_DEBUG=1` the whole chain. The few that drop it say why (a cause that may hold a secret).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from clawly.redact import masked_url

# What a parser raises on a file that was cut short or damaged: bad bytes, bad JSON/YAML/Parquet
# (JSONDecodeError, UnicodeDecodeError and pyarrow's ArrowInvalid are ValueErrors), missing keys or
# columns. Anything else (out of memory, a library version mismatch's TypeError, a permission error)
# is not the file's fault and keeps its own type and message.
FORMAT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    IndexError,
    EOFError,
    struct.error,
    SafetensorError,
)


class ClawlyError(Exception):
    """Base of clawly's user-facing errors."""


def first_line(error: BaseException) -> str:
    """An exception's message as one line, its URL passwords masked: its first line (library messages
    run on with advice; a database driver's own error, SQLAlchemy's `orig`, when there is one), or
    the exception's type when it has no message."""
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    return masked_url(" ".join(lines[0].split())) if lines else type(error).__name__


class MissingInputError(ClawlyError, FileNotFoundError):
    """A stage's input does not exist: the message names the stage that makes it."""


def require(path: str | Path, made_by: str) -> None:
    """Raise MissingInputError unless `path` exists."""
    if not Path(path).exists():
        raise MissingInputError(
            f"{path} does not exist: run the '{made_by}' stage first "
            f"(python -m stages.{made_by.replace('-', '_')}, or dvc repro)"
        )


class CorruptInputError(ClawlyError, ValueError):
    """A stage's input exists but cannot be read: cut short by a kill, or damaged."""


@contextlib.contextmanager
def reading(path: str | Path, made_by: str) -> Iterator[None]:
    """Read a stage's output inside this block: a missing file is a MissingInputError, one whose
    parser fails (truncated Parquet or safetensors, broken JSON, missing keys: `FORMAT_ERRORS`) a
    CorruptInputError naming the file and the stage that makes it. Other errors pass unchanged: only
    reading belongs in the block, not what is done with what was read."""
    require(path, made_by)
    try:
        yield
    except ClawlyError:
        raise
    except FORMAT_ERRORS as e:
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        raise CorruptInputError(
            f"{path} cannot be read ({type(e).__name__}: {detail}): it was cut short or "
            f"damaged; rerun '{made_by}' (python -m stages.{made_by.replace('-', '_')}, or "
            "dvc repro --force on it)"
        ) from e
