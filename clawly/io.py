"""Atomic file writes: a reader never sees a half-written output, and a process killed at any
moment leaves the previous output whole.

A file is written to a temp file beside it and renamed onto it. A directory (an adapter, a merged
model) is written to a temp directory and swapped with the old one in one `renameat2(RENAME_EXCHANGE)`
call where the kernel has it (Linux), so there is no moment without one complete directory; elsewhere
the old one is renamed aside first and brought back by the next writer if the process died between
the two renames. Temp names carry the writer's pid: the next writer of the same output removes those
of processes that are gone. A full disk (or a file-size limit) becomes one `DiskFullError` naming
the output, with nothing half-written left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from clawly.errors import ClawlyError

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


class DiskFullError(ClawlyError, OSError):
    """An output could not be written for lack of space; nothing half-written is left."""

    def __str__(self) -> str:
        return self.strerror  # the whole message, without OSError's "[Errno N]"


def current_umask() -> int:
    """The process umask, read without changing it: `os.umask` can only read it by setting it, which
    for a moment makes every file another thread creates (the web server runs jobs in threads)
    world-writable. Linux says it in /proc/self/status; elsewhere a directory made with mode 0o777
    in a private temp directory shows which bits the umask clears."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory() as private:
        probe = os.path.join(private, "probe")
        os.mkdir(probe, 0o777)
        return 0o777 & ~os.stat(probe).st_mode


def umask_mode(mode: int) -> int:
    """`mode` less the process umask (mkstemp and mkdtemp make owner-only files and directories; outputs
    and the model cache get the modes a plain open or mkdir would give)."""
    return mode & ~current_umask()


def pid_alive(pid: int) -> bool:
    """Is process `pid` (on this machine) alive? Another user's process counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(path: Path) -> None:
    """Remove temp files and directories of `path` left by writers that were killed, and bring back an
    old directory renamed aside by one that died before the new one was in place."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _full_errno(error: BaseException) -> int | None:
    """The errno of a failed write for lack of space: an OSError's, or one a library (safetensors' Rust
    writer) names in its message as "(os error N)"."""
    if isinstance(error, DiskFullError):
        return None
    if isinstance(error, OSError) and error.errno in _FULL:
        return error.errno
    found = re.search(r"os error (\d+)", str(error))
    return int(found.group(1)) if found and int(found.group(1)) in _FULL else None


@contextlib.contextmanager
def _disk_full_is_one_error(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        code = _full_errno(e)
        if code is None:
            raise
        raise DiskFullError(
            code,
            f"could not write {path}: {os.strerror(code)}; free disk space (or write "
            "elsewhere) and run again: nothing was half-written",
        ) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _disk_full_is_one_error(path):
            yield tmp_path
            if tmp_path.exists():
                os.chmod(tmp_path, umask_mode(0o666))
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temp directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        with _disk_full_is_one_error(path):
            yield tmp
            os.chmod(tmp, umask_mode(0o777))
            if not path.exists():
                os.replace(tmp, path)
            elif not exchange(tmp, path):
                old = path.with_name(f".{path.name}.old")
                os.replace(path, old)  # killed right here: the next writer (or _clean_stale) puts it back
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old directory


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file, atomically, with the same bytes for the same tensors and metadata in every
    process. (safetensors writes its metadata in a hash map's order, which changes per process: the
    same content would look changed to DVC and to the study fingerprint.)"""
    raw = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data keeps its 8-byte alignment
    with atomic_path(path) as tmp:
        tmp.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])
