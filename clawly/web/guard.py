"""What a page may ask of the server: everything typed into it is untrusted.

The operator starts `clawly-web` with settings (MODEL, --config, --category-preset) and decides,
with flags, what the page may change beyond them:

- **remote code**: `model.trust_remote_code` and `classifier.judge_trust_remote_code` are not in the
  form unless the server was started with `--allow-remote-code` (and the start settings may only
  turn them on with that flag);
- **paths**: a path typed into the page (`PATH_KEYS`) is read relative to the output directory and
  must resolve inside it or inside a directory the operator allowed (`--allow-path DIR`); `..` and
  absolute paths that leave them are refused with one message under the field. The start value of
  a key is always allowed (the operator chose it). Hub ids (a model, a dataset) stay hub ids, unless
  a local file of that name exists where the server runs;
- **databases**: `optimize.storage` may be a journal file inside the allowed directories, or the
  start value; an RDB URL can only come from the operator. A URL's password is shown masked and
  never sent back to the page.

`PagePolicy.check` returns the value the run uses (paths made absolute) or raises `SettingsError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clawly.model.loading import DEFAULT_MODEL
from clawly.redact import has_url_password, masked_url
from clawly.settings import SettingsError

REMOTE_CODE_KEYS = frozenset({"model.trust_remote_code", "classifier.judge_trust_remote_code"})

# Every settings key that names something on the server's disk, and what it may be.
PATH_KEYS = {
    "model.name": "model",  # a hub id, 'default', a model directory or a .gguf file
    "model.gguf_file": "file name",  # a file inside the model's directory or hub repo
    "model.cache_dir": "path",
    "data.templates": "path",
    "data.out_dir": "path",
    "data.harmful_files": "paths",
    "data.harmless_files": "paths",
    "data.harmful_datasets": "hub ids",
    "data.harmless_datasets": "hub ids",
    "optimize.storage": "storage",
    "classifier.train_file": "path",
    "classifier.test_file": "path",
    "classifier.embedder": "path",
    "classifier.judge_model": "model",
}


def _hub_id(text: str) -> bool:
    """'org/name' (or 'name'): no path separators beyond one, no dots or tilde up front, and no file of
    that name where the server runs (which the model and dataset loaders would read instead)."""
    parts = text.split("/")
    return (
        0 < len(parts) <= 2
        and all(parts)
        and not text.startswith((".", "~"))
        and ".." not in parts
        and not text.endswith(".gguf")
        and not Path(text).exists()
    )


@dataclass(frozen=True)
class PagePolicy:
    """The operator's decisions: where the page may point (the output directory and `allowed`),
    whether it may run a model repository's code, and the start settings (always allowed)."""

    output_dir: Path
    allowed: tuple[Path, ...] = ()
    allow_remote_code: bool = False
    start: dict[str, Any] = field(default_factory=dict)  # "section.key" -> the start value

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(p.resolve() for p in (self.output_dir, *self.allowed))

    @property
    def hidden(self) -> frozenset[str]:
        """Keys the form does not show: they keep their start values."""
        return frozenset() if self.allow_remote_code else REMOTE_CODE_KEYS

    def _inside(self, key: str, text: str) -> str:
        """`text` as a path read from the output directory, resolved; an error unless inside a root."""
        path = (self.output_dir / text).resolve()  # an absolute `text` replaces the output directory
        if not any(path == root or path.is_relative_to(root) for root in self.roots):
            where = ", ".join(str(r) for r in self.roots)
            raise SettingsError(
                f"invalid setting {key}={text!r}: outside the directories this server lets the page "
                f"use ({where}); name a path inside them (relative paths start there), or start "
                "clawly-web with --allow-path DIR"
            )
        return str(path)

    def check(self, key: str, value: Any) -> Any:
        """The value a run may use for `key` as typed into the page, or SettingsError naming the key."""
        if key in self.hidden and value != self.start.get(key):
            raise SettingsError(
                f"invalid setting {key}={value!r}: this server runs no model repository code "
                "(start clawly-web with --allow-remote-code to allow it)"
            )
        kind = PATH_KEYS.get(key)
        if kind is None or value is None or value == self.start.get(key):
            return value
        if kind in ("paths", "hub ids"):
            start = self.start.get(key) or []
            return [v if v in start else self.check_one(key, kind, v) for v in value]
        return self.check_one(key, kind, value)

    def check_one(self, key: str, kind: str, text: str) -> str:
        if kind == "file name":
            if Path(text).name != text or text in ("..", "."):
                raise SettingsError(
                    f"invalid setting {key}={text!r}: a file name inside the model's directory or hub repo (no path)"
                )
            return text
        if kind == "storage" and "://" in text:
            raise SettingsError(
                f"invalid setting {key}={masked_url(text)!r}: a database URL can only be set when "
                "the server starts (clawly-web --config FILE); the page may name a journal file "
                f"inside {self.output_dir}"
            )
        if kind in ("model", "hub ids"):
            if text == DEFAULT_MODEL and kind == "model":
                return text
            local = self.output_dir / text
            if not local.exists() and _hub_id(text.split(":")[0] if kind == "hub ids" else text):
                return text
        return self._inside(key, text)

    def shown(self, key: str, text: str) -> str:
        """A field's text as the page may see it: a URL's password masked."""
        return masked_url(text) if key == "optimize.storage" and isinstance(text, str) else text

    def unshown(self, key: str, text: Any) -> Any:
        """The page's text back: the masked start URL stands for the start URL."""
        start = self.start.get(key)
        if isinstance(start, str) and has_url_password(start) and text == masked_url(start):
            return start
        return text
