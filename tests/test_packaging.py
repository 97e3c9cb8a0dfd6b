"""The wheel: built with `python -m build`, installed non-editable in a fresh virtual environment,
it runs from a directory that is not the checkout, with the templates, presets and labelled
responses it ships (importlib.resources), not the ones beside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_api import tiny_settings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [
    "clawly/conf/config.yaml",
    "clawly/conf/settings.yaml",
    "clawly/conf/preset/default.yaml",
    "clawly/conf/hydra/launcher/slurm.yaml",
    "clawly/data/templates.yaml",
    "clawly/measure/responses/train.jsonl",
    "clawly/measure/responses/test.jsonl",
]


# the installed environment only: nothing of the checkout on the path
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (its dependencies from this environment's
    site-packages, put on the path by a .pth file: nothing of the checkout is importable)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    for name in ("pyproject.toml", "README.md", "LICENSE", "clawly"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, source / name)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(source)], tmp)
    (wheel,) = (tmp / "dist").glob("clawly-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    )
    deps = [p for p in sys.path if p.endswith("site-packages")] or [sysconfig.get_paths()["purelib"]]
    (purelib / "deps.pth").write_text("\n".join(deps) + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        tmp,
    )
    return venv


@pytest.mark.slow
def test_the_wheel_ships_the_data_files_the_package_reads(installed):
    wheels = list(installed.parent.joinpath("dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    missing = [f for f in SHIPPED if f not in names]
    assert not missing, f"not in the wheel: {missing}"


@pytest.mark.slow
def test_the_installed_wheel_runs_the_commands_and_a_one_trial_run_outside_the_checkout(
    installed, make_tiny_model, tmp_path
):
    bin_ = installed / "bin"
    where = _run([str(bin_ / "python"), "-c", "import clawly; print(clawly.__file__)"], tmp_path).stdout.strip()
    assert Path(where).is_relative_to(installed), f"clawly imported from {where}, not the wheel"
    assert "--category-preset" in _run([str(bin_ / "clawly"), "--help"], tmp_path).stdout
    assert "--host" in _run([str(bin_ / "clawly-web"), "--help"], tmp_path).stdout

    # a preset that does not exist: one error line that lists the presets shipped in the package, and
    # none of the libraries' import-time chatter (bitsandbytes' failed Hub kernel fetch on AVX512-BF16 CPUs)
    proc = subprocess.run(
        [str(bin_ / "clawly"), "--category-preset", "nope", "--non-interactive"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    shipped = ", ".join(sorted(f.stem for f in (ROOT / "clawly" / "conf" / "preset").glob("*.yaml")))
    assert "default, full" in shipped  # the checkout's presets, which the wheel must ship
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"clawly: error: --category-preset nope: no such preset; available: {shipped} (or pass a YAML file)"
    ], proc.stderr

    # one trial on a tiny model, from a directory without templates or labelled responses
    values = tiny_settings(make_tiny_model("llama"), tmp_path, n_trials=1, n_startup_trials=1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(values.to_dict()))
    assert not (tmp_path / "clawly").exists()
    _run(
        [
            str(bin_ / "clawly"),
            "--config",
            str(config),
            "--category-preset",
            "keep_self_harm_and_hate",
            "--non-interactive",
            "--output",
            str(tmp_path / "out"),
        ],
        tmp_path,
        timeout=900,
    )
    prompts = pd.read_parquet(tmp_path / "prompts" / "harmful.parquet")
    templates = yaml.safe_load((ROOT / "clawly" / "data" / "templates.yaml").read_text())
    assert set(prompts.category) == set(templates["categories"]), "the prompts do not come from the shipped templates"
    report = json.loads((tmp_path / "artifacts" / "reports" / "optimize.json").read_text())
    assert report["trials"] == 1 and report["mode"] == "category"
