"""Errors a user can fix: printed as one line naming the problem and the fix, no traceback."""

from __future__ import annotations


class ClawlyError(Exception):
    """Base of clawly's user-facing errors."""


class MissingInputError(ClawlyError, FileNotFoundError):
    """A stage's input does not exist: the message names the stage that makes it."""


def require(path, made_by: str) -> None:
    """Raise MissingInputError unless `path` exists."""
    from pathlib import Path

    if not Path(path).exists():
        raise MissingInputError(f"{path} does not exist: run the '{made_by}' stage first "
                                f"(python -m stages.{made_by.replace('-', '_')}, or dvc repro)")


def user_errors() -> tuple[type[BaseException], ...]:
    """Every error class whose message is meant for the user (printed as one line, no traceback)."""
    from clawly.settings import SettingsError

    errors: list[type[BaseException]] = [ClawlyError, SettingsError]
    for module, name in (("clawly.datasets", "DatasetError"), ("clawly.model", "ModelLoadError"),
                         ("clawly.architecture", "UnsupportedArchitectureError"),
                         ("clawly.model", "UnsupportedArchitectureError"), ("clawly.activations", "ProbeError"),
                         ("clawly.classify", "ClassifierError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
