import json

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
    assert json.loads(lines[2]) | {"time": 0} == {"time": 0, "stage": "optimize", "event": "warning",
                                                  "message": "little of the direction survives", "category": "drugs"}
    err = capsys.readouterr().err
    assert "[optimize] trial" in err and "hf_secret" not in err


def test_safetensors_are_written_byte_for_byte_the_same_in_every_process(tmp_path):
    """safetensors writes its metadata in a hash map's order, which changes from one process to the
    next: the same directions gave other bytes on every run, so DVC saw a changed output and the
    study fingerprint a new study. write_safetensors sorts the header."""
    import subprocess
    import sys

    code = ("import sys, torch; from clawly.io import write_safetensors; "
            "write_safetensors(sys.argv[1], {'b': torch.arange(6.).view(2, 3), "
            "'a': torch.ones(4, dtype=torch.float64)}, "
            "{'mode': 'global', 'names': '[1]', 'kept': '[]', 'weights': '[1.0]'})")
    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"mode": "global", "names": "[1]", "kept": "[]", "weights": "[1.0]"}
        assert f.get_tensor("b").tolist() == [[0, 1, 2], [3, 4, 5]] and f.get_tensor("a").dtype.is_floating_point
