"""Real services for the tests: a PostgreSQL server and a single-node Slurm cluster on 127.0.0.1.

Session-scoped fixtures (registered in conftest.py, so one instance serves the whole run):
- `postgres_url` -> SQLAlchemy URL `postgresql+psycopg://clawly:...@127.0.0.1:PORT/clawly`;
- `slurm_cluster` -> an environment dict (os.environ plus SLURM_CONF) to pass as `env=` to
  sbatch/squeue/scancel subprocesses.

Each starts its service through `.ci/services/{postgres,slurm}.sh start` at first use and stops it at
the end of the session. Each run gets its own directory and free ports, so two test runs on one
machine (or a hand-started server on the default port) do not collide. A test that asks for one of
them and cannot have it FAILS, with the script's stderr: these tests exist to prove that the real
service works, and a skip would hide that it does not. `.ci/run` installs the packages
(`postgres.sh install`, `slurm.sh install`); the fixtures do not install anything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[1] / ".ci" / "services"
START_TIMEOUT = 180  # seconds; a start takes 1-4 s when the packages are installed


def free_port() -> int:
    """A port that nothing listens on at 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_dir(name: str) -> str:
    """A fresh path for a service's files. Under /tmp, not pytest's tmp_path: that one is mode 0700
    and owned by root, and the PostgreSQL server runs as user postgres, who must reach its dir."""
    return os.path.join(tempfile.gettempdir(), f"clawly-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def run_script(script: str, action: str, env: dict[str, str], timeout: float = START_TIMEOUT):
    return subprocess.run(
        ["bash", str(SERVICES / script), action],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def start_service(script: str, env_for_ports) -> tuple[dict[str, str], str]:
    """Run `script start`, with a retry on fresh ports should another process take a port between
    picking it and binding it. Returns (the env it ran with, its stdout). pytest.fail otherwise."""
    last = None
    for _ in range(3):
        env = env_for_ports()
        try:
            r = run_script(script, "start", env)
        except FileNotFoundError as e:  # no bash
            pytest.fail(f"{script} start could not run: {e}", pytrace=False)
        except subprocess.TimeoutExpired as e:
            run_script(script, "stop", env, timeout=60)
            pytest.fail(f"{script} start did not finish in {START_TIMEOUT}s\n--- stderr ---\n{e.stderr}", pytrace=False)
        if r.returncode == 0:
            return env, r.stdout
        last = r
        run_script(script, "stop", env, timeout=60)
        if "in use" not in r.stderr:
            break
    pytest.fail(
        f"{script} start failed (exit {last.returncode}); is the service installed? "
        f"(bash .ci/services/{script} install)\n--- stderr ---\n{last.stderr}\n--- stdout ---\n{last.stdout}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A running PostgreSQL server; its SQLAlchemy URL (psycopg 3 driver)."""

    def env():
        return {
            **os.environ,
            "CLAWLY_PG_DIR": service_dir("pg"),
            "CLAWLY_PG_PORT": str(free_port()),
            "CLAWLY_PG_PASSWORD": f"pw{uuid.uuid4().hex}",
        }  # one no log line can hold by chance

    env, out = start_service("postgres.sh", env)
    url = out.strip().splitlines()[-1]
    if not url.startswith("postgresql+psycopg://"):
        run_script("postgres.sh", "stop", env, timeout=60)
        pytest.fail(f"postgres.sh start printed no URL: {out!r}", pytrace=False)
    try:
        yield url
    finally:
        run_script("postgres.sh", "stop", env, timeout=60)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """A running single-node Slurm cluster; the environment (with SLURM_CONF) to run its clients in."""

    def env():
        ctld = free_port()
        slurmd = free_port()
        while slurmd == ctld:
            slurmd = free_port()
        return {
            **os.environ,
            "CLAWLY_SLURM_DIR": service_dir("slurm"),
            "CLAWLY_SLURM_CTLD_PORT": str(ctld),
            "CLAWLY_SLURM_SLURMD_PORT": str(slurmd),
        }

    env, out = start_service("slurm.sh", env)
    conf = [line.split("=", 1)[1] for line in out.splitlines() if line.startswith("SLURM_CONF=")]
    if not conf or not Path(conf[-1]).is_file():
        run_script("slurm.sh", "stop", env, timeout=60)
        pytest.fail(f"slurm.sh start printed no SLURM_CONF: {out!r}", pytrace=False)
    env["SLURM_CONF"] = conf[-1]
    try:
        yield env
    finally:
        run_script("slurm.sh", "stop", env, timeout=60)
