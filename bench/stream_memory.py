"""Peak memory of probe-activations and of the optimize stage at 1x and 4x the prompts.

Each measurement runs in a fresh process: load the model with clawly's loader (`model.name`,
default: the packaged Qwen2.5-Coder-0.5B), read every weight once (safetensors are memory-mapped:
unread weights are not resident yet), read its resident memory (VmRSS), reset the process's
high-water mark (`/proc/self/clear_refs`), run the step, and read the peak (VmHWM) and
`ru_maxrss`. "above model" is the step's peak minus the loaded model's RSS: what the step itself
holds, which should be about one batch whatever the prompt count.

- probe-activations: `probe.max_per_category` N and 4N train prompts per category (default 8, 32);
- optimize: `optimize.harmful_prompts` = `harmless_prompts` = M and 4M (default 48, 192: the
  stage's default and four times it), the base model's scores and `--trials` trials (default 2).

The prompts are the project's templates (`clawly/data/templates.yaml`, generate-datasets' defaults); the
directions the trials ablate are computed from each size's own probe.

    python bench/stream_memory.py [--probe-per-category N] [--prompts M] [--trials T] [--src DIR]

`--src` imports clawly from another checkout (e.g. an older commit, for a before/after figure).
Writes bench/results/stream-memory.json (or `--out`) and prints a table. Work files go to
bench/work/stream-memory/.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_mib(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise KeyError(key)


def settings_for(work: Path, stage: str, k: int, a: argparse.Namespace):
    from clawly.settings import Settings

    keys = {
        "data.out_dir": str(work / "prompts"),
        "model.device": "cpu",
        "probe.max_per_category": a.probe_per_category * k,
        "optimize.harmful_prompts": a.prompts * k,
        "optimize.harmless_prompts": a.prompts * k,
        "optimize.n_trials": a.trials,
        "optimize.n_startup_trials": a.trials,
        "optimize.batch_size": 48,
    }
    return Settings(model=a.model, artifacts_dir=str(work / f"{k}x"), **keys)


def child(stage: str, work: Path, k: int, a: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    from clawly.log import get_logger
    from clawly.model.loading import load_model
    from clawly.steps import optimize, probe_activations

    settings = settings_for(work, stage, k, a)
    log = get_logger(stage, work / "logs", quiet=True)
    model, tok = load_model(settings.model, log)
    with torch.no_grad():  # page in every weight (safetensors are memory-mapped): the model's RSS is all of it
        for t in (*model.parameters(), *model.buffers()):
            float(t.float().sum())
    gc.collect()
    model_rss = status_mib("VmRSS")
    load_peak = status_mib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
    t0 = time.perf_counter()
    if stage == "probe-activations":
        probe_activations.run(settings, log, model, tok)
        import pandas as pd

        p = Path(settings.artifacts_dir) / "activations"
        prompts = {
            n: int(pd.read_parquet(p / f"{n}.parquet", columns=["id"]).id.nunique()) for n in ("harmful", "harmless")
        }
    else:
        summary = optimize.run(settings, log, model, tok)
        prompts = {
            "harmful": summary["harmful_prompts"],
            "harmless": summary["harmless_prompts"],
            "trials": summary["trials"] + summary["pruned_trials"],
        }
    seconds = time.perf_counter() - t0
    peak = status_mib("VmHWM")
    print(
        json.dumps(
            {
                "model_rss_mib": model_rss,
                "peak_mib": peak,
                "above_model_mib": round(peak - model_rss, 1),
                "load_peak_mib": load_peak,
                "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "prompts": prompts,
                "seconds": round(seconds, 1),
            }
        )
    )


def run_child(stage: str, work: Path, k: int, argv: list[str], src: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", stage, str(work), str(k), *argv],
        capture_output=True,
        text=True,
        env=_env(src),
    )
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{stage} at {k}x failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(src: Path) -> dict:
    import os

    return {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}


def main(a: argparse.Namespace, argv: list[str]) -> None:
    sys.path.insert(0, str(a.src))
    sys.path.insert(1, str(ROOT))
    from bench.common import dump, machine
    from clawly.log import get_logger
    from clawly.steps import compute_directions, generate_datasets, orthogonalize_categories

    work = a.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = get_logger("bench", work / "logs", quiet=True)
    generate_datasets.run(settings_for(work, "data", 1, a), log)
    rows = []
    for k in (1, 4):
        for stage in ("probe-activations", "optimize"):
            if stage == "optimize":  # the directions the trials ablate, from this size's probe (no model)
                s = settings_for(work, stage, k, a)
                compute_directions.run(s, log)
                orthogonalize_categories.run(s, log)
            row = {"stage": stage, "size": f"{k}x", **run_child(stage, work, k, argv, a.src)}
            print(row, flush=True)
            rows.append(row)
    commit = subprocess.run(
        ["git", "-C", str(a.src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dump(
        a.out,
        {
            "model": a.model,
            "clawly_commit": commit,
            "probe_per_category": a.probe_per_category,
            "optimize_prompts": a.prompts,
            "trials": a.trials,
            "machine": machine(),
            "rows": rows,
        },
    )
    print(f"\n{'stage':<18} {'size':>4} {'prompts':>22} {'model RSS':>10} {'peak':>8} {'peak-model':>11} {'s':>6}")
    for r in rows:
        print(
            f"{r['stage']:<18} {r['size']:>4} {json.dumps(r['prompts']):>22} {r['model_rss_mib']:>8.0f}Mi "
            f"{r['peak_mib']:>6.0f}Mi {r['above_model_mib']:>9.0f}Mi {r['seconds']:>6.0f}"
        )


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="model.name (default: the packaged default model)")
    ap.add_argument("--probe-per-category", type=int, default=8, help="probe.max_per_category at 1x")
    ap.add_argument("--prompts", type=int, default=48, help="optimize harmful and harmless prompts at 1x")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--src", type=Path, default=ROOT, help="the checkout clawly is imported from")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "stream-memory")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stream-memory.json")
    return ap.parse_args(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        stage, work, k = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
        child(stage, work, k, parse(sys.argv[5:]))
    else:
        main(parse(sys.argv[1:]), sys.argv[1:])
