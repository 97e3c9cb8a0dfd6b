"""The shared entry point of every stage: Hydra config -> validated Settings -> library call.

User-fixable errors print one line (`clawly <stage>: error: ...`) and exit with status 2;
set CLAWLY_DEBUG=1 to see the traceback instead. An override of a key that does not exist is
caught before Hydra (whose own message is several lines), with the closest key suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from clawly.errors import ClawlyError
from clawly.log import StageLogger, get_logger
from clawly.settings import SECTIONS, Settings

# a URL's password, not yet an interpolation: scheme://user:PASSWORD@
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)(?!\$\{)([^@/\s]+)@")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "clawly" / "conf")
_VALUE_FLAGS = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--experimental-rerun"}


def override_keys() -> list[str]:
    """What a command-line override may name: every settings key, the config groups, artifacts_dir."""
    keys = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    groups = [p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()]
    return [*keys, *groups, "artifacts_dir"]


def unknown_override(argv: list[str]) -> str | None:
    """The first override naming no setting or group, as an error message with the closest key; else None."""
    known = override_keys()
    skip = False
    for arg in argv:
        if skip or arg.startswith("-"):
            skip = arg in _VALUE_FLAGS
            continue
        key = arg.lstrip("+~").split("=", 1)[0]
        if key.startswith("hydra") or key in known or key.startswith("categories.weights."):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        return (
            f"unknown setting {key!r} in the override {arg!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + " (clawly/conf/settings.yaml lists every key)"
        )
    return None


def passwords_to_environment(argv: list[str]) -> list[str]:
    """`argv` with the password of every URL in an override (optimize.storage=postgresql+psycopg://
    user:PASSWORD@host/db) replaced by `${oc.env:CLAWLY_URL_PASSWORD_N}`, the variable set here to
    the password. Hydra saves the overrides as given (outputs/.../overrides.yaml, a sweep's
    multirun.yaml, submitit's job files); the interpolation is resolved when the config is read, in
    this process or in a job that inherits its environment (local processes, Slurm's default
    --export=ALL), so the password is used but never saved."""
    out, names = [], {}
    for arg in argv:

        def to_env(m: re.Match) -> str:
            name = names.setdefault(m.group(2), f"CLAWLY_URL_PASSWORD_{len(names) + 1}")
            os.environ[name] = m.group(2)
            return f"{m.group(1)}${{oc.env:{name}}}@"

        out.append(arg if arg.startswith("-") else URL_PASSWORD.sub(to_env, arg))
    return out


def run_stage(name: str, step: Callable[[Settings, StageLogger], object], sweep: str | None = None) -> None:
    """Run `step` as the Hydra app of stage `name` (call from the stage module's __main__). With
    Hydra's --multirun, each job instead runs the `sweep` module's `run_job` (see clawly/sweep.py) in
    the job's own directory; a stage without one refuses to sweep."""
    problem = unknown_override(sys.argv[1:])
    if problem:
        print(f"clawly {name}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = passwords_to_environment(sys.argv[1:])

    # an absolute path: with `python -m`, a relative config_path would be read as a Python package
    @hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
    def main(cfg: DictConfig) -> None:
        values = OmegaConf.to_container(cfg, resolve=True)
        job = HydraConfig.get()
        try:
            if job.mode == RunMode.MULTIRUN:
                return sweep_job(name, sweep, values, Path(job.runtime.output_dir), list(job.overrides.task))
            settings = Settings.from_dict(values)  # type: ignore[arg-type]
            log = get_logger(name, os.path.join(settings.artifacts_dir, "logs"))
            log.event("start", "", config={k: v for k, v in values.items() if k != "hydra"})  # type: ignore[union-attr]
            step(settings, log)
            log.event("done")
        except ClawlyError as e:
            if os.environ.get("CLAWLY_DEBUG"):
                raise
            print(f"clawly {name}: error: {e}", file=sys.stderr)
            sys.exit(2)

    main()


def sweep_job(name: str, sweep: str | None, values: dict, job_dir: Path, overrides: list[str]) -> dict:
    """One job of a Hydra multirun: the `sweep` module's `run_job` in the job's directory, given its
    settings (`job_settings`) and overrides."""
    if sweep is None:
        raise ClawlyError(f"stage {name} does not sweep: run the sweep (-m/--multirun) with python -m stages.optimize")
    # by name, not an import: DVC never runs a sweep, so the stage's code deps (stages/deps.py) stay one run's
    module = importlib.import_module(sweep)
    values = module.job_settings({k: v for k, v in values.items() if k != "hydra"}, job_dir)
    settings = Settings.from_dict(values)
    log = get_logger(name, os.path.join(settings.artifacts_dir, "logs"))
    log.event("start", f"sweep job {job_dir}: {' '.join(overrides) or 'no overrides'}", config=values)
    out = module.run_job(settings, log, job_dir, overrides)
    log.event("done")
    return out
