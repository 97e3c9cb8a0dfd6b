"""Wall time of N trials on one study with 1 and with 2 worker processes (optimize.workers).

On the default model with the demo's settings (params.yaml), the directions computed once in a
work directory; then, for each worker count, a fresh study (its own optimize.study_name) runs
optimize.n_trials trials, timed from the start of the optimization to its last trial. The time
includes what each extra worker pays before its first trial: loading the model and scoring the
base model once. Each count runs in a fresh process, so the model and thread settings start cold.

    python bench/workers.py [--trials 8] [--workers 1 2]

Writes bench/results/workers.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from bench.common import dump, machine, project_settings  # noqa: E402

WORK = ROOT / "work" / "workers"


def settings(workers: int, trials: int):
    from clawly.settings import Settings

    values = project_settings().to_dict()
    values["artifacts_dir"] = str(WORK / "artifacts")
    values["data"]["out_dir"] = str(WORK / "prompts")
    values["optimize"].update(n_trials=trials, workers=workers, study_name=f"bench-{workers}w-{time.time_ns()}")
    return Settings.from_dict(values)


def measure(workers: int, trials: int) -> None:
    """Child process: directions (reused after the first run), then the timed optimization."""
    from clawly import Pipeline
    from clawly.log import get_logger
    from clawly.search.study import WORKER

    s = settings(workers, trials)
    pipe = Pipeline(s, log=get_logger("bench-workers", WORK / "logs", quiet=True))
    pipe.compute_refusal_directions()
    pipe.load_model()
    start = time.perf_counter()
    mine = sum(1 for _ in pipe.run_optimization_iter())
    seconds = time.perf_counter() - start
    study = pipe.search.study
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    by_worker: dict[int, int] = {}
    for t in done:
        by_worker[t.user_attrs[WORKER]["pid"]] = by_worker.get(t.user_attrs[WORKER]["pid"], 0) + 1
    trial_seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    print(
        json.dumps(
            {
                "workers": workers,
                "trials": len(done),
                "seconds": round(seconds, 1),
                "trials_per_worker": sorted(by_worker.values(), reverse=True),
                "this_process": mine,
                "mean_trial_seconds": round(sum(trial_seconds) / len(trial_seconds), 1),
                "numbers": sorted(t.number for t in done),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.trials)
        return
    rows = []
    for n in args.workers:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--trials", str(args.trials)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise SystemExit(f"workers={n} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"{n} worker(s): {rows[-1]['trials']} trials in {rows[-1]['seconds']} s "
            f"(split {rows[-1]['trials_per_worker']}, {rows[-1]['mean_trial_seconds']} s a trial)"
        )
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = round(base / r["seconds"], 2)
    dump(
        ROOT / "results" / "workers.json", {"machine": machine(), "model": project_settings().model.name, "runs": rows}
    )


if __name__ == "__main__":
    main()
