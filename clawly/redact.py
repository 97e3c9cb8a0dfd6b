"""Secrets and local file layout out of what clawly writes, prints, shows or uploads.

- `masked_url`: the password of every URL in a text (`scheme://user:password@host`) becomes `***`;
- `masked`: the same through nested mappings and lists, and values under secret-named keys
  (token, password, secret, api_key) replaced whole;
- `redacted`: one known secret (a Hub token typed into the web page) out of a message, on one line;
- `shown_path`: a local path as a file that leaves the machine may name it (`~` for the home directory).

Every door (logs, the web page, records, model cards, sweep job files) goes through these; passwords
and tokens themselves are only ever handed to the library that needs them (SQLAlchemy, huggingface_hub).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]+@")
SECRET_KEYS = ("token", "password", "secret", "api_key")
MASK = "***"


def masked_url(text: str) -> str:
    """`text` with the password of any URL in it (scheme://user:password@host) replaced by ***."""
    return _URL_PASSWORD.sub(rf"\1{MASK}@", text)


def has_url_password(text: str) -> bool:
    return bool(_URL_PASSWORD.search(text))


def is_secret_key(name: str) -> bool:
    """Does a field's name say that its value is a secret (an API token, a password)?"""
    return any(s in str(name).lower() for s in SECRET_KEYS)


def masked(value: Any) -> Any:
    """`value` with URL passwords masked in every string, and secret-named keys' string values
    replaced whole, through nested mappings, lists and tuples (the containers are copied)."""
    if isinstance(value, str):
        return masked_url(value)
    if isinstance(value, dict):
        return {k: MASK if isinstance(v, str) and v and is_secret_key(k) else masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(masked(v) for v in value)
    return value


def redacted(text: Any, secret: str | None) -> str:
    """`text` on one line, URL passwords masked and `secret` (when given) replaced by ***."""
    text = " ".join(str(text).split())
    if secret and secret.strip():
        text = text.replace(secret.strip(), MASK)
    return masked_url(text)


def shown_path(path: str | os.PathLike[str]) -> str:
    """A local path as a shared file may show it: under the home directory as `~/...` (which
    `Path.expanduser` reads back on the same machine), anything else unchanged."""
    text = str(path)
    home = str(Path.home())
    if home not in ("", "/") and (text == home or text.startswith(home + os.sep)):
        return "~" + text[len(home) :]
    return text
