"""clawly.save.hub.push_to_hub against a stand-in Hub HTTP server on 127.0.0.1 (tests/hub_server.py), offline.

huggingface_hub reads its settings (endpoint, token path, Xet switch) into `huggingface_hub.constants` at import,
so besides the environment the tests patch those constants: a stray call to the default endpoint lands on the
stand-in (and shows up in `hub.unexpected`), and no stored login of the developer is ever used.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, running_hub
from safetensors.torch import save_file

from clawly.errors import ClawlyError
from clawly.save.hub import push_to_hub

TOKEN = "hf_StandInToken0123456789abcdef"
WRONG_TOKEN = "hf_WrongToken9876543210fedcba"
REPO = "clawly-test/tiny-adapter"


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No token in the environment, an empty HF home (no stored login), telemetry off."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf-home"
    home.mkdir()
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return home


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as constants

    with running_hub(TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        yield server


@pytest.fixture(params=["xet-pipeline", "single-commit"])
def upload_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """upload_folder's two code paths: hf_xet installed (the default) or HF_HUB_DISABLE_XET=1."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", request.param == "single-commit")
    return request.param


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["o_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: peft\n---\n# Tiny adapter\n")
    torch.manual_seed(0)
    save_file(
        {
            "base_model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.randn(2, 8),
            "base_model.model.layers.0.self_attn.o_proj.lora_B.weight": torch.randn(8, 2),
        },
        folder / "adapter_model.safetensors",
    )
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_upload_creates_private_repo_with_identical_files(hub: HubServer, adapter_dir: Path, upload_path: str):
    url = push_to_hub(adapter_dir, REPO, token=TOKEN, private=True, endpoint=hub.url, commit_message="Add adapter")

    assert url == f"{hub.url}/{REPO}"
    assert hub.repos == {REPO: {"private": True}}
    assert hub.files[REPO] == folder_bytes(adapter_dir)
    assert [(c["summary"], c["paths"]) for c in hub.commits] == [("Add adapter", sorted(folder_bytes(adapter_dir)))]
    assert hub.unexpected == []

    # Pushing the same folder again: the repo exists (409 is fine) and nothing changed, so no new commit.
    assert push_to_hub(adapter_dir, REPO, token=TOKEN, private=True, endpoint=hub.url) == url
    assert len(hub.commits) == 1 and hub.repos == {REPO: {"private": True}}
    assert hub.unexpected == []


def test_public_by_default(hub: HubServer, adapter_dir: Path):
    push_to_hub(adapter_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.repos == {REPO: {"private": False}}
    assert hub.files[REPO] == folder_bytes(adapter_dir)


def test_token_from_env_is_sent_and_never_shown(
    hub: HubServer, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_to_hub(adapter_dir, REPO, endpoint=hub.url)
    assert hub.files[REPO] == folder_bytes(adapter_dir)
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}

    # A failing upload whose server message even echoes the token: the error must not repeat it.
    hub.fail_commits = (403, f"token {TOKEN} may not write to {REPO}")
    (adapter_dir / "extra.txt").write_text("changed")
    with pytest.raises(ClawlyError) as info:
        push_to_hub(adapter_dir, REPO, endpoint=hub.url)
    message = str(info.value)
    assert "403" in message and "may not write" in message and "\n" not in message
    assert TOKEN not in message

    out, err = capfd.readouterr()
    assert TOKEN not in out and TOKEN not in err


def test_wrong_token_gives_one_line_error_without_token(
    hub: HubServer, adapter_dir: Path, capfd: pytest.CaptureFixture[str]
):
    with pytest.raises(ClawlyError) as info:
        push_to_hub(adapter_dir, REPO, token=WRONG_TOKEN, endpoint=hub.url)
    message = str(info.value)
    assert "401" in message and "Invalid credentials" in message
    assert "\n" not in message and WRONG_TOKEN not in message
    assert hub.repos == {} and hub.files == {}
    out, err = capfd.readouterr()
    assert WRONG_TOKEN not in out and WRONG_TOKEN not in err


def test_no_token_anywhere_names_the_fix(hub: HubServer, adapter_dir: Path, isolated_hf: Path):
    assert not any(isolated_hf.iterdir())  # no stored login
    with pytest.raises(ClawlyError, match="HF_TOKEN") as info:
        push_to_hub(adapter_dir, REPO, endpoint=hub.url)
    assert "hf auth login" in str(info.value)
    assert hub.requests == []


def test_missing_or_empty_folder_is_named(hub: HubServer, tmp_path: Path):
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(ClawlyError, match="no-such-adapter") as info:
        push_to_hub(missing, REPO, token=TOKEN, endpoint=hub.url)
    assert str(missing) in str(info.value)

    empty = tmp_path / "empty-adapter"
    empty.mkdir()
    with pytest.raises(ClawlyError, match="empty-adapter"):
        push_to_hub(empty, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_unreachable_hub_gives_one_line_error(adapter_dir: Path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ClawlyError, match="cannot reach") as info:
        push_to_hub(adapter_dir, REPO, token=TOKEN, endpoint=f"http://127.0.0.1:{port}")
    assert "\n" not in str(info.value) and TOKEN not in str(info.value)
