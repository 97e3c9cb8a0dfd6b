import json
import os

import pytest

from clawly.io import atomic_dir, atomic_path, write_json
from clawly.log import get_logger


def test_atomic_path_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1


def test_atomic_dir_replaces_the_whole_directory_only_on_success(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.bin").write_text("new")
            raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["old.bin"]
    with atomic_dir(target) as tmp:
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_logger_writes_one_json_event_per_line_and_masks_secrets(tmp_path, capsys):
    log = get_logger("optimize", tmp_path)
    log.event("trial", number=3, kl=0.25, hf_token="hf_secret", obj=object(), nan=float("nan"))
    log.event("done")
    log.event("warning", "little of the direction survives", category="drugs")
    lines = (tmp_path / "optimize.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["stage"] == "optimize" and first["event"] == "trial" and first["number"] == 3
    assert first["hf_token"] == "***" and first["nan"] == "nan" and isinstance(first["obj"], str)
    assert json.loads(lines[1])["event"] == "done" and "message" not in json.loads(lines[1])
    assert json.loads(lines[2]) | {"time": 0} == {
        "time": 0,
        "stage": "optimize",
        "event": "warning",
        "message": "little of the direction survives",
        "category": "drugs",
    }
    err = capsys.readouterr().err
    assert "[optimize] trial" in err and "hf_secret" not in err


def test_safetensors_are_written_byte_for_byte_the_same_in_every_process(tmp_path):
    """safetensors writes its metadata in a hash map's order, which changes from one process to the
    next: the same directions gave other bytes on every run, so DVC saw a changed output and the
    study fingerprint a new study. write_safetensors sorts the header."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from clawly.io import write_safetensors; "
        "write_safetensors(sys.argv[1], {'b': torch.arange(6.).view(2, 3), "
        "'a': torch.ones(4, dtype=torch.float64)}, "
        "{'mode': 'global', 'names': '[1]', 'kept': '[]', 'weights': '[1.0]'})"
    )
    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"mode": "global", "names": "[1]", "kept": "[]", "weights": "[1.0]"}
        assert f.get_tensor("b").tolist() == [[0, 1, 2], [3, 4, 5]] and f.get_tensor("a").dtype.is_floating_point


def test_a_directory_is_swapped_in_one_step_so_there_is_never_none(tmp_path):
    from clawly.io import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    assert exchange(a, b)  # Linux: renameat2(RENAME_EXCHANGE)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_an_old_directory_renamed_aside_by_a_killed_writer_comes_back(tmp_path, monkeypatch):
    """Without an exchange (another OS or file system) the old directory is renamed aside before the new
    one moves in; a writer killed between the two renames leaves `.model.old` and no `model`."""
    import clawly.io as io

    target = tmp_path / "model"
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "weights").write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_dir(target):
            raise RuntimeError  # the next writer fails, yet the previous output is back
    assert (target / "weights").read_text() == "previous" and not (tmp_path / ".model.old").exists()
    monkeypatch.setattr(io, "exchange", lambda a, b: False)
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_temp_outputs_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / f".out.json.{dead}.abc.tmp").write_text("half")
    (tmp_path / f".model.{dead}.abc.tmp").mkdir()
    live = tmp_path / f".out.json.{os.getpid()}.xyz.tmp"
    live.write_text("another writer, still running")
    write_json(tmp_path / "out.json", {"a": 1})
    with atomic_dir(tmp_path / "model"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json", "model", live.name])


def test_outputs_get_the_usual_file_modes_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "w").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_full_disk_is_one_error_and_leaves_the_previous_output(tmp_path, kind):
    """A real write failure: the child process may write at most 64 KiB per file (RLIMIT_FSIZE; Python
    ignores SIGXFSZ, so write() fails with EFBIG as it would with ENOSPC on a full disk)."""
    import subprocess
    import sys

    target = tmp_path / ("big.json" if kind == "file" else "model")
    if kind == "file":
        target.write_text("previous")
        body = "from clawly.io import write_json; write_json(sys.argv[1], {'x': 'y' * 200_000})"
    else:
        target.mkdir()
        (target / "weights").write_text("previous")
        body = (
            "from clawly.io import atomic_dir\nwith atomic_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'weights').write_bytes(b'0' * 200_000)"
        )
    code = (
        "import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "from clawly.errors import ClawlyError\ntry:\n"
        + "\n".join("    " + line for line in body.splitlines())
        + "\nexcept ClawlyError as e:\n    print(type(e).__name__, e)\n    sys.exit(2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith(f"DiskFullError could not write {target}: File too large; free disk space")
    assert (target.read_text() if kind == "file" else (target / "weights").read_text()) == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
