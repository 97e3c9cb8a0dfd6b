"""The quick loop (`pytest -m "not slow"`) runs anywhere without root: no test it collects needs the
real PostgreSQL/Slurm services or a browser. Checked on pytest's own collection, in a subprocess,
of the whole suite and of a few stand-in tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE_FIXTURES = {"postgres_url", "slurm_cluster"}

# a plugin for the subprocess: what -m kept and what it deselected, with each test's fixtures and markers
PROBE = """
import json, os

deselected = []


def _row(item):
    return {"id": item.nodeid, "fixtures": sorted(getattr(item, "fixturenames", ())),
            "markers": sorted({m.name for m in item.iter_markers()})}


def pytest_deselected(items):
    deselected.extend(_row(i) for i in items)


def pytest_collection_finish(session):
    with open(os.environ["MARKERS_PROBE_OUT"], "w") as f:
        json.dump({"selected": [_row(i) for i in session.items], "deselected": deselected}, f)
"""

STAND_INS = """
import pytest


@pytest.mark.browser
def test_stand_in_browser():
    pass


def test_stand_in_postgres(postgres_url):
    pass


@pytest.fixture
def cluster_job(slurm_cluster):
    return slurm_cluster


def test_stand_in_slurm_through_another_fixture(cluster_job):
    pass


def test_stand_in_plain():
    pass
"""


def needs_services_or_browser(row: dict) -> bool:
    return bool(SERVICE_FIXTURES & set(row["fixtures"])) or "browser" in row["markers"]


def test_the_quick_loop_collects_no_test_that_needs_the_services_or_a_browser(tmp_path):
    (tmp_path / "markers_probe.py").write_text(PROBE)
    stand_ins = tmp_path / "stand_ins" / "test_stand_ins.py"  # collected with the suite: its conftest's hooks apply
    stand_ins.parent.mkdir()
    stand_ins.write_text(STAND_INS)
    out = tmp_path / "collected.json"
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "MARKERS_PROBE_OUT": str(out)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-m",
            "not slow",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            "-p",
            "markers_probe",
            "-p",
            "no:cacheprovider",
            "tests",
            str(stand_ins),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = json.loads(out.read_text())
    selected, deselected = collected["selected"], collected["deselected"]
    assert not [r["id"] for r in selected if needs_services_or_browser(r)]
    # not vacuous: the suite's service tests and the stand-ins were there, and -m left them out
    names = {r["id"].rsplit("::", 1)[-1] for r in selected}
    gone = {r["id"].rsplit("::", 1)[-1] for r in deselected if needs_services_or_browser(r)}
    assert "test_stand_in_plain" in names
    assert {
        "test_stand_in_browser",
        "test_stand_in_postgres",
        "test_stand_in_slurm_through_another_fixture",
        "test_postgres_answers_over_tcp_on_loopback",
        "test_sbatch_wait_job_writes_its_output",
    } <= gone
    for row in deselected:
        if SERVICE_FIXTURES & set(row["fixtures"]):
            assert {"services", "slow"} <= set(row["markers"]), row
    assert len(selected) > 100  # the quick loop is still the bulk of the suite
