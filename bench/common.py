"""Shared helpers for the benchmarks: machine description, prompt files, peak memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        kib = int(line.split()[1])
        mem = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": mem,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def read_lines(path: Path) -> list[str]:
    return [x.strip() for x in Path(path).read_text().splitlines() if x.strip()]


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(x.replace("\n", " ").strip() + "\n" for x in lines))


def package_version(python: str, package: str) -> str | None:
    out = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version('{package}'))"], capture_output=True, text=True
    )
    return out.stdout.strip() or None


def dump(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def project_settings():
    """clawly Settings of the committed params.yaml (the demo run's configuration)."""
    import yaml

    from clawly.paths import project_file
    from clawly.settings import Settings

    return Settings.from_dict(yaml.safe_load(project_file("params.yaml").read_text()))
