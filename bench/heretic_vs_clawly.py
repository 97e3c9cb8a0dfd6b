"""clawly vs Heretic, side by side: same model, same prompt files, same seed, same trial count.

    python bench/heretic_vs_clawly.py --heretic-python /path/to/heretic-venv/bin/python

Steps (--steps, default all): prepare (the fixed prompt tables, generated once and committed, exported as text files),
heretic, clawly, rescore (each tool's chosen trial on held-out prompts, one scorer for both),
report (per-trial median seconds, total time, peak memory, Pareto fronts, held-out figures).
Figures go to --out (committed); models, studies and answers to --work (not committed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.clawly_runner import settings_for  # noqa: E402
from bench.common import dump, machine, package_version, write_lines  # noqa: E402

STEPS = ("prepare", "heretic", "clawly", "rescore", "report")


def fixed_prompt_tables(tables: Path, paths, generate, regenerate: bool = False) -> bool:
    """The benchmark's fixed prompt set: the committed harmful and harmless tables in `tables` are
    copied into the workspace (`paths`), so runs of different code score the same prompts even when
    the templates changed. Without them, or with `regenerate`, `generate()` writes new tables into
    the workspace and they are kept in `tables`. True when the tables are new."""
    pairs = {tables / "harmful.parquet": paths.harmful_prompts, tables / "harmless.parquet": paths.harmless_prompts}
    new = regenerate or not all(fixed.is_file() for fixed in pairs)
    if new:
        generate()
    for fixed, used in pairs.items():
        src, dst = (used, fixed) if new else (fixed, used)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return new


def prepare(a) -> None:
    import pandas as pd

    from clawly.data.prompts import read_prompts
    from clawly.log import get_logger
    from clawly.model.loading import resolve_model_source
    from clawly.paths import Paths
    from clawly.settings import ModelSettings
    from clawly.steps import generate_datasets, optimize
    from clawly.steps.compute_directions import contrast_filter
    from clawly.steps.probe_activations import capped

    ws = a.work / "clawly"
    s = settings_for(ws, seed=a.seed)
    paths = Paths.of(s)
    tables = a.out / "prompts" / "tables"
    if fixed_prompt_tables(
        tables, paths, lambda: generate_datasets.run(s, get_logger("bench-prepare", quiet=True)), a.regenerate_prompts
    ):
        print(f"new prompt tables in {tables} (from the templates of this code): commit them")
    else:
        print(f"prompt tables from {tables} (--regenerate-prompts makes new ones)")
    harmful, harmless = read_prompts(paths)
    train_h = capped(harmful[harmful.split == "train"], s.probe.max_per_category)
    train_g = capped(harmless[harmless.split == "train"], s.probe.max_per_category)
    train_g = train_g[train_g.category.map(contrast_filter(s.directions.contrast))]
    eval_h, eval_g = optimize.optimizer_prompts(s)
    rest_h = harmful[(harmful.split == "eval") & ~harmful.id.isin(eval_h.id)]
    rest_g = harmless[(harmless.split == "eval") & ~harmless.id.isin(eval_g.id)]
    held_h = optimize.stratified_sample(rest_h, 100, a.seed)
    held_g = rest_g.sample(n=min(100, len(rest_g)), random_state=a.seed)
    d = a.out / "prompts"
    for name, df in (
        ("harmful_train", train_h),
        ("harmless_train", train_g),
        ("harmful_eval", eval_h),
        ("harmless_eval", eval_g),
        ("harmful_heldout", held_h),
        ("harmless_heldout", held_g),
    ):
        write_lines(d / f"{name}.txt", df.text.tolist())
    held_h[["id", "category", "text"]].to_csv(d / "harmful_heldout.csv", index=False)
    source = resolve_model_source(ModelSettings())
    dump(a.work / "prepared.json", {"model_dir": str(source)})
    print(
        f"prompt files in {d}: "
        + ", ".join(f"{p.stem} {len(p.read_text().splitlines())}" for p in sorted(d.glob("*.txt")))
    )
    assert set(eval_h.text) == set(pd.Series((d / "harmful_eval.txt").read_text().splitlines()))


def _run(cmd: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"failed (exit {proc.returncode}); see {log}")
    return time.time() - t0


def model_dir(a) -> str:
    return json.loads((a.work / "prepared.json").read_text())["model_dir"]


def heretic(a) -> None:
    work = a.work / "heretic"
    if work.exists():
        shutil.rmtree(work)
    wall = _run(
        [
            a.heretic_python,
            str(ROOT / "bench" / "heretic_runner.py"),
            "--model",
            model_dir(a),
            "--workdir",
            str(work),
            "--prompts",
            str(a.out / "prompts"),
            "--n-trials",
            str(a.trials),
            "--n-startup-trials",
            str(a.startup),
            "--seed",
            str(a.seed),
            "--batch-size",
            str(a.heretic_batch_size),
            "--max-response-length",
            "100",
            "--response-prefix",
            "",
            "--kl-cap",
            str(a.kl_cap),
            "--save-dir",
            str(work / "model"),
        ],
        a.work / "heretic.log",
    )
    r = json.loads((work / "results.json").read_text())
    r["wall_seconds"] = round(wall, 1)
    dump(a.out / "heretic.json", r)
    dump(a.out / "heretic_markers.json", {"markers": r["settings_used"].get("refusal_markers")})


def clawly(a, name: str = "clawly", prune_kl: float | None = None) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "clawly_runner.py"),
        "--workspace",
        str(a.work / "clawly"),
        "--n-trials",
        str(a.trials),
        "--n-startup-trials",
        str(a.startup),
        "--seed",
        str(a.seed),
        "--max-new-tokens",
        str(a.clawly_max_new_tokens),
        "--batch-size",
        str(a.clawly_batch_size),
        "--out",
        str(a.out / f"{name}.json"),
        "--harmful-choice",
        a.clawly_harmful_choice,
    ]
    if prune_kl is not None:
        cmd += ["--prune-kl", str(prune_kl)]
    wall = _run(cmd, a.work / f"{name}.log")
    r = json.loads((a.out / f"{name}.json").read_text())
    r["wall_seconds"] = round(wall, 1)
    dump(a.out / f"{name}.json", r)


def rescore(a) -> None:
    markers = a.work / "heretic_markers.json"
    markers.write_text(json.dumps(json.loads((a.out / "heretic_markers.json").read_text())["markers"]))
    h = json.loads((a.out / "heretic.json").read_text())["saved_model"]
    c = json.loads((a.out / "clawly.json").read_text())["saved_model"]
    _run(
        [
            sys.executable,
            str(ROOT / "bench" / "rescore.py"),
            "--base",
            "default",
            "--models",
            f"heretic={h}",
            f"clawly={c}",
            "--prompts",
            str(a.out / "prompts"),
            "--heretic-markers",
            str(markers),
            "--out",
            str(a.out / "heldout.json"),
            "--responses",
            str(a.work / "heldout_responses.parquet"),
        ],
        a.work / "rescore.log",
    )


def pareto(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Non-dominated (refusals, KL) points, both minimized, sorted by KL."""
    front = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front), key=lambda p: (p[1], p[0]))


def dominated(front: list[tuple[int, float]], by: list[tuple[int, float]]) -> int:
    return sum(any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in by) for p in front)


def report(a) -> dict:
    tools = {
        n: json.loads((a.out / f"{n}.json").read_text())
        for n in ("heretic", "clawly")
        if (a.out / f"{n}.json").exists()
    }
    held = json.loads((a.out / "heldout.json").read_text()) if (a.out / "heldout.json").exists() else None
    summary: dict = {
        "machine": machine(),
        "trials": a.trials,
        "startup_trials": a.startup,
        "seed": a.seed,
        "heretic_version": package_version(a.heretic_python, "heretic-llm"),
        "tools": {},
    }
    fronts = {}
    for name, r in tools.items():
        done = [t for t in r["trials"] if t["state"] == "COMPLETE"]
        secs = [t["seconds"] for t in r["trials"] if t["seconds"] is not None and t["state"] in ("COMPLETE", "PRUNED")]
        fronts[name] = pareto([(t["refusals"], t["kl_divergence"]) for t in done])
        summary["tools"][name] = {
            "median_seconds_per_trial": round(statistics.median(secs), 1),
            "mean_seconds_per_trial": round(statistics.fmean(secs), 1),
            "trials": len(secs),
            "pruned": sum(t["state"] == "PRUNED" for t in r["trials"]),
            "total_seconds": r.get("wall_seconds"),
            "setup_seconds": r["timing"].get("setup_seconds"),
            "peak_rss_mib": r["peak_rss_mib"],
            "chosen_trial": r["chosen_trial"],
            "pareto_front": [{"refusals": p[0], "kl_divergence": round(p[1], 4)} for p in fronts[name]],
        }
        phases = [t["phase_seconds"] for t in r["trials"] if t.get("phase_seconds")]
        if phases:  # clawly's trials: where the time goes (median seconds of each phase)
            summary["tools"][name]["median_phase_seconds"] = {
                k: round(statistics.median(p.get(k, 0.0) for p in phases), 2) for k in phases[0]
            }
    if len(fronts) == 2:
        h, c = summary["tools"]["heretic"], summary["tools"]["clawly"]
        summary["speed_ratio"] = round(c["median_seconds_per_trial"] / h["median_seconds_per_trial"], 3)
        summary["heretic_front_points_dominated_by_clawly"] = dominated(fronts["heretic"], fronts["clawly"])
        summary["clawly_front_points_dominated_by_heretic"] = dominated(fronts["clawly"], fronts["heretic"])
    if held:
        summary["heldout"] = held
    dump(a.out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heretic-python", default="heretic-venv/bin/python")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--startup", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heretic-batch-size", type=int, default=64)
    ap.add_argument("--clawly-batch-size", default="auto")
    ap.add_argument("--clawly-max-new-tokens", type=int, default=24)
    ap.add_argument("--clawly-harmful-choice", default="sample", choices=("sample", "base_refusals"))
    ap.add_argument("--kl-cap", type=float, default=0.5)
    ap.add_argument(
        "--regenerate-prompts",
        action="store_true",
        help="write new prompt tables from the templates (default: reuse the committed ones, so runs of "
        "different code score the same prompts)",
    )
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heretic-vs-clawly")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    a = ap.parse_args()
    a.out, a.work = a.out.resolve(), a.work.resolve()
    for step in a.steps.split(","):
        if step not in STEPS:
            raise SystemExit(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
        print(f"== {step}", flush=True)
        t0 = time.time()
        {"prepare": prepare, "heretic": heretic, "clawly": clawly, "rescore": rescore, "report": report}[step](a)
        print(f"== {step} done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
