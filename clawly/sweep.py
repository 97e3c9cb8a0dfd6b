"""Hydra multirun sweeps: Hydra runs the outer grid (presets, seeds, methods), Optuna each job's trials.

    python -m stages.optimize -m +preset=default,full optimize.seed=0,1                  # 4 jobs here, in turn
    python -m stages.optimize -m hydra/launcher=submitit_local +preset=default,full      # 2 processes at once
    python -m stages.optimize -m hydra/launcher=slurm hydra.launcher.partition=gpu ...   # Slurm jobs
    python -m clawly.sweep multirun/2026-12-04/21-30-00                                  # the sweep's table

A job's settings may change its prompts (data.*), directions (a preset, directions.method) and
search, so each job runs the chain from prompts to the chosen trial in its own directory,
`<sweep dir>/<job number>/`: `prompts/`, `artifacts/` (probe, directions, study, the optimize
stage's files) and `job.json` (its overrides, chosen trial and metrics). `stages/_common.py` hands
a multirun job here by name: DVC never runs a sweep, so the optimize stage's DVC deps stay the code
of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

from clawly.errors import ClawlyError
from clawly.io import atomic_path, write_json
from clawly.log import StageLogger
from clawly.redact import masked
from clawly.settings import Settings

JOB_FILE = "job.json"


def job_settings(values: dict, job_dir: Path) -> dict:
    """A job's settings: its work files (prompts, artifacts) in its own directory."""
    return {
        **values,
        "artifacts_dir": str(job_dir / "artifacts"),
        "data": {**values.get("data", {}), "out_dir": str(job_dir / "prompts")},
    }


def run_job(settings: Settings, log: StageLogger, job_dir: Path, overrides: list[str]) -> dict:
    """One sweep job: prompts, directions, the study's trials (optimize.workers processes), outputs;
    writes and returns `job.json`."""
    from clawly.api import Pipeline  # deferred: the engine (torch, transformers) loads in the job, not the sweep

    pipe = Pipeline(settings, log=log)
    try:
        pipe.compute_refusal_directions()
        for _ in pipe.run_optimization_iter():
            pass
        summary = pipe.write_outputs()
    finally:
        pipe.close()
    job = {
        "job": job_dir.name,
        "overrides": masked(overrides),
        "artifacts_dir": settings.artifacts_dir,
        "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID")),  # null outside Slurm
        "slurm_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "model": settings.model.name,
        "trials": summary["trials"],
        "chosen_trial": summary["chosen_trial"],
        "refusal_measure": summary["refusal_measure"],
        "targeted_prompts": summary["targeted_prompts"],
        "base_refusals": summary["base"]["refusals"],
        "refusals": summary["chosen"]["refusals"],
        "kl_divergence": summary["chosen"]["kl_divergence"],
        "keeps_kept_refusals": summary["chosen"]["keeps_kept_refusals"],
        "by_category": {k: [v["base_refusals"], v["after_refusals"]] for k, v in summary["by_category"].items()},
    }
    write_json(job_dir / JOB_FILE, job)
    log.event(
        "sweep_job",
        f"job {job_dir.name} ({' '.join(overrides) or 'no overrides'}): chose trial "
        f"{job['chosen_trial']}, {job['refusals']}/{job['targeted_prompts']} refusals (base "
        f"{job['base_refusals']}), KL {job['kl_divergence']:.4f}",
    )
    return job


def sweep_table(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per finished job of a sweep directory (jobs still running or failed have no job.json)."""
    files = sorted(Path(sweep_dir).glob(f"*/{JOB_FILE}"), key=lambda f: (len(f.parent.name), f.parent.name))
    if not files:
        raise ClawlyError(
            f"{sweep_dir}: no finished sweep jobs (no */{JOB_FILE}); is it a multirun directory "
            "such as multirun/DATE/TIME?"
        )
    jobs = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    common = set.intersection(*(set(job["overrides"]) for job in jobs))
    rows = []
    for job in jobs:
        by_category = {f"{k} base→after": f"{b}→{a}" for k, (b, a) in job.pop("by_category").items()}
        rows.append(
            {
                "job": job.pop("job"),
                "swept": " ".join(o for o in job["overrides"] if o not in common),
                **{k: v for k, v in job.items() if k not in ("artifacts_dir", "model", "overrides", "slurm_task")},
                "overrides": " ".join(job["overrides"]),
                **by_category,
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clawly.sweep",
        description="The table of a Hydra multirun "
        "sweep's jobs (each job's chosen trial); also written as SWEEP_DIR/sweep.csv.",
    )
    parser.add_argument("sweep_dir", help="the sweep's directory, e.g. multirun/2026-12-04/21-30-00")
    args = parser.parse_args(argv)
    try:
        table = sweep_table(args.sweep_dir)
    except ClawlyError as e:
        print(f"clawly sweep: error: {e}", file=sys.stderr)
        return 2
    with atomic_path(Path(args.sweep_dir) / "sweep.csv") as tmp:
        table.to_csv(tmp, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=[c for c in table.columns if "→" in c or c == "overrides"]).to_string(index=False))
    print(f"per-category refusals and every column: {Path(args.sweep_dir) / 'sweep.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
