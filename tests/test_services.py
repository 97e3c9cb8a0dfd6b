"""The services of .ci/services are real: a PostgreSQL server that psycopg and Optuna's RDBStorage
use over TCP on 127.0.0.1, and a Slurm cluster that runs batch jobs, two at once, with the project's
own Python. These tests fail (never skip) when a service cannot be started: see tests/services.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.services


# -- PostgreSQL -------------------------------------------------------------------------------------


def test_postgres_answers_over_tcp_on_loopback(postgres_url: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    assert url.drivername == "postgresql+psycopg" and url.host == "127.0.0.1"
    with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
        version, user, db, addr, port = conn.execute(
            "select version(), current_user, current_database(), host(inet_server_addr()), inet_server_port()"
        ).fetchone()
    assert version.startswith("PostgreSQL ")
    assert (user, db, addr, port) == ("clawly", "clawly", "127.0.0.1", url.port)


@pytest.mark.filterwarnings("ignore:Argument ``heartbeat_interval`` is an experimental feature")
def test_optuna_rdb_storage_on_postgres(postgres_url: str) -> None:
    import optuna
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"services-{uuid.uuid4().hex[:8]}"
    storage = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=30, grace_period=60)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    study.optimize(lambda t: (t.suggest_float("x", -1.0, 1.0) - 0.25) ** 2, n_trials=2)

    # a second storage object (a new engine) reads back what the first one wrote
    again = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(postgres_url))
    trials = again.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert again.best_value == min(t.value for t in trials)

    # and the rows are in PostgreSQL's tables, not in some local file
    plain = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as conn:
        (n,) = conn.execute(
            "select count(*) from trials join studies using (study_id) where studies.study_name = %s", (name,)
        ).fetchone()
    assert n == 2
    optuna.delete_study(study_name=name, storage=storage)
    storage.engine.dispose()


# -- Slurm ------------------------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}\n{r.stderr}"
    return r.stdout


def _wait_job(job: str, env: dict[str, str], timeout: float = 120) -> str:
    """Poll until the job ends; its final state. (`sbatch --wait` polls at a growing interval.)"""
    end = time.monotonic() + timeout
    state = ""
    while time.monotonic() < end:
        out = _run(["scontrol", "show", "job", "-o", job], env)
        state = out.split("JobState=", 1)[1].split()[0] if "JobState=" in out else ""
        if state not in ("", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
            return state
        time.sleep(0.1)
    pytest.fail(f"job {job} still {state} after {timeout}s")


def test_sbatch_wait_job_writes_its_output(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    job = (
        _run(
            ["sbatch", "--parsable", "--wait", "-o", str(out), "--wrap", "hostname; echo job=$SLURM_JOB_ID"],
            slurm_cluster,
        )
        .strip()
        .split(";")[0]
    )
    assert job.isdigit()
    assert out.read_text().split() == [subprocess.check_output(["hostname"], text=True).strip(), f"job={job}"]
    assert "JobState=COMPLETED" in _run(["scontrol", "show", "job", "-o", job], slurm_cluster)


def test_two_one_cpu_jobs_run_at_the_same_time(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    script = "date +%s.%N; sleep 4; date +%s.%N"
    jobs = [
        _run(
            ["sbatch", "--parsable", "-n", "1", "-c", "1", "-o", str(tmp_path / f"{i}.out"), "--wrap", script],
            slurm_cluster,
        )
        .strip()
        .split(";")[0]
        for i in range(2)
    ]
    seen_both_running = False
    end = time.monotonic() + 60
    while time.monotonic() < end:
        running = _run(["squeue", "-h", "-t", "RUNNING", "-j", ",".join(jobs), "-o", "%i"], slurm_cluster).split()
        if sorted(running) == sorted(jobs):
            seen_both_running = True
            break
        time.sleep(0.2)
    assert [_wait_job(j, slurm_cluster) for j in jobs] == ["COMPLETED", "COMPLETED"]
    assert seen_both_running, "squeue never showed both jobs RUNNING"
    (s0, e0), (s1, e1) = ([float(x) for x in (tmp_path / f"{i}.out").read_text().split()] for i in range(2))
    assert max(s0, s1) < min(e0, e1), f"the jobs did not overlap: {(s0, e0)} {(s1, e1)}"


def test_slurm_job_runs_the_project_python(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    """Jobs run as root on this machine and filesystem, so the venv's interpreter, with torch, works."""
    import torch

    out = tmp_path / "py.out"
    code = "import sys, torch; print(sys.prefix); print(torch.__version__)"
    job = (
        _run(["sbatch", "--parsable", "-o", str(out), "--wrap", f"{sys.executable} -c '{code}'"], slurm_cluster)
        .strip()
        .split(";")[0]
    )
    assert _wait_job(job, slurm_cluster) == "COMPLETED", out.read_text() if out.exists() else "no output"
    assert out.read_text().split() == [sys.prefix, torch.__version__]
