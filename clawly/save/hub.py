"""Publish a folder (an adapter or a merged model) to the Hugging Face Hub with huggingface_hub: the token comes
from the argument, else HF_TOKEN or a stored `hf auth login`; it is handed to huggingface_hub only, never printed
or logged, and Hub or network failures become a one-line ClawlyError that never contains it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from clawly.errors import ClawlyError
from clawly.redact import redacted


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create the model repo `repo_id` if needed, upload every file of `folder`; return the repo URL."""
    folder = Path(folder)
    if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        raise ClawlyError(f"{folder} is missing or empty: nothing to upload to {repo_id}")
    token = token or huggingface_hub.get_token()
    if not token:
        raise ClawlyError("no Hugging Face token: set the HF_TOKEN environment variable or run `hf auth login`")

    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message or f"Upload {folder.name} with clawly",
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        detail = redacted(err.server_message or str(err).strip().split("\n")[0], token)
        hint = " (check that the token has write access: HF_TOKEN or `hf auth login`)" if status in (401, 403) else ""
        # from None here and below: the cause may echo the token (its first line, masked, is the message)
        raise ClawlyError(
            f"upload of {folder} to {repo_id} on {api.endpoint} failed: HTTP {status}: {detail}{hint}"
        ) from None
    except (OfflineModeIsEnabled, *_transport_errors()) as err:
        raise ClawlyError(
            f"cannot reach the Hugging Face Hub at {api.endpoint} to upload {repo_id}: "
            f"{type(err).__name__}: {redacted(err, token)}"
        ) from None
    return str(url)
