"""Logging: human progress on the console, one JSON event per line in a log file.

log = get_logger("optimize", "artifacts/logs")
log.event("trial", number=3, refusals=12, kl=0.08)   # console line + JSON line
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from clawly.redact import MASK, is_secret_key, masked_url


def _plain(value: Any) -> Any:
    """Only JSON-serializable, finite values go into the log."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return masked_url(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class StageLogger:
    """Writes events to the console (via tqdm.write, so progress bars stay intact) and JSONL."""

    def __init__(self, stage: str, log_dir: str | os.PathLike[str] | None = None, quiet: bool = False):
        self.stage = stage
        self.quiet = quiet
        self.path: Path | None = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(log_dir) / f"{stage}.jsonl"

    def event(self, name: str, message: str | None = None, **fields: Any) -> None:
        fields = {k: (MASK if isinstance(v, str) and is_secret_key(k) else v) for k, v in fields.items()}
        record = {
            "time": round(time.time(), 3),
            "stage": self.stage,
            "event": name,
            **({"message": masked_url(message)} if message else {}),
            **_plain(fields),
        }
        if self.path is not None:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk must not turn a log line into the run's error: the console goes on
                tqdm.write(
                    f"[{self.stage}] warning: {self.path} is not written from here on ({e.strerror})", file=sys.stderr
                )
                self.path = None
        if not self.quiet:
            text = message if message is not None else " ".join(f"{k}={short(v)}" for k, v in fields.items())
            text = masked_url(text)
            tqdm.write(f"[{self.stage}] {name}: {text}" if text else f"[{self.stage}] {name}", file=sys.stderr)

    def progress(self, iterable: Any = None, total: int | None = None, desc: str = "", unit: str = "it") -> tqdm:
        return tqdm(
            iterable,
            total=total,
            desc=f"[{self.stage}] {desc}",
            unit=unit,
            disable=self.quiet,
            dynamic_ncols=True,
            file=sys.stderr,
        )


def short(v: Any) -> str:
    """A value as a log line shows it: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def get_logger(stage: str, log_dir: str | os.PathLike[str] | None = None, quiet: bool = False) -> StageLogger:
    return StageLogger(stage, log_dir, quiet)
