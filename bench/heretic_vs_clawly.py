"""clawly vs Heretic, side by side: same model, same prompt files, same seed, same trial count.

    python bench/heretic_vs_clawly.py --heretic-python /path/to/heretic-venv/bin/python

Steps (--steps, default all): prepare (the fixed prompt tables, generated once and committed, exported as text files),
heretic, clawly, temaq (temaq-abliterated, from its own venv: --temaq), rescore (every tool's candidates and chosen
model on held-out prompts, one scorer for all), report (per-trial median seconds, time to quality, total time, peak
memory, Pareto fronts, held-out figures).
Figures go to --out (committed); models, studies and answers to --work (not committed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
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
from bench.time_to_quality import final_model_quality, quality_threshold, time_to_quality  # noqa: E402

QUALITY_KL = 0.1  # time to quality: the first-token KL a good model stays within

STEPS = ("prepare", "heretic", "clawly", "temaq", "rescore", "report")


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


def study_args(a) -> list[str]:
    """What every tool's runner is given alike: trials, random start-up trials, seed."""
    return ["--n-trials", str(a.trials), "--n-startup-trials", str(a.startup), "--seed", str(a.seed)]


def model_dir(a) -> str:
    return json.loads((a.work / "prepared.json").read_text())["model_dir"]


def fresh_workdir_args(a, work: Path) -> list[str]:
    """What each external tool's runner is told alike: the model, its workdir (emptied first: a
    leftover checkpoint would resume an earlier run) and the prompt files."""
    if work.exists():
        shutil.rmtree(work)
    return ["--model", model_dir(a), "--workdir", str(work), "--prompts", str(a.out / "prompts")]


def heretic_runs(a) -> dict[str, int]:
    """Heretic's runs by name: `heretic-own` at the batch size its own probe picks on this machine
    (probed once with batch size 0, then cached in --out), and `heretic-N` for each fixed N."""
    runs = {}
    for b in a.heretic_batch_sizes.split(","):
        if b == "own":
            cache = a.out / "heretic_batch_size.json"
            runs["heretic-own"] = json.loads(cache.read_text())["batch_size"] if cache.is_file() else 0
        else:
            runs[f"heretic-{int(b)}"] = int(b)
    return runs


def chosen_batch_size(log: Path) -> int | None:
    """The batch size Heretic's own probe chose, from its log ("Chosen batch size: N")."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))  # a terminal's colours
    found = re.findall(r"Chosen batch size:\W*(\d+)", text)
    return int(found[-1]) if found else None


def selected(a, name: str) -> bool:
    """Whether the heretic, clawly, temaq and rescore steps take the run `name` (--runs; default: every
    run). A run not selected keeps the results it has in --out, and the report takes them as they are."""
    return not a.runs or name in a.runs.split(",")


def heretic(a) -> None:
    for name, batch in heretic_runs(a).items():
        if not selected(a, name):
            continue
        work = a.work / name
        log = a.work / f"{name}.log"
        wall = _run(
            [
                a.heretic_python,
                str(ROOT / "bench" / "heretic_runner.py"),
                *fresh_workdir_args(a, work),
                *study_args(a),
                "--batch-size",
                str(batch),
                "--max-response-length",
                "100",
                "--response-prefix",
                "",
                "--kl-cap",
                str(a.kl_cap),
                "--save-dir",
                str(work / "model"),
                "--save-candidates",
                str(work / "candidates"),
            ],
            log,
        )
        r = json.loads((work / "results.json").read_text())
        r["wall_seconds"] = round(wall, 1)
        r["batch_size"] = batch or chosen_batch_size(log)
        if batch == 0:  # Heretic probed: keep what it chose (and what the probe cost, in setup_seconds)
            dump(a.out / "heretic_batch_size.json", {"batch_size": r["batch_size"], "probed_in": name})
        dump(a.out / f"{name}.json", r)
        dump(a.out / "heretic_markers.json", {"markers": r["settings_used"].get("refusal_markers")})


def clawly_variants(a) -> dict[str, list[str]]:
    """clawly's runs by name: `clawly` (the settings below) and each --clawly-variant NAME:KEY=VALUE,...
    (optimize settings on top of those; a dotted KEY is another section's, e.g. edit.method=least_squares)."""
    runs = {"clawly": []}
    for v in a.clawly_variant:
        name, _, sets = v.partition(":")
        if not name.startswith("clawly-") or not sets:
            raise SystemExit(f"--clawly-variant {v!r}: expected clawly-NAME:KEY=VALUE[,KEY=VALUE...]")
        runs[name] = sets.split(",")
    return runs


def clawly(a) -> None:
    for name, sets in clawly_variants(a).items():
        if not selected(a, name):
            continue
        ws = a.work / name
        if name != "clawly":  # the same prompt tables as the first run, its own artifacts
            if ws.exists():
                shutil.rmtree(ws)
            shutil.copytree(a.work / "clawly" / "prompts", ws / "prompts")
        clawly_run(a, name, ws, sets)


def clawly_run(a, name: str, ws: Path, sets: list[str]) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "clawly_runner.py"),
        "--workspace",
        str(ws),
        *study_args(a),
        "--max-new-tokens",
        str(a.clawly_max_new_tokens),
        "--batch-size",
        str(a.clawly_batch_size),
        "--out",
        str(a.out / f"{name}.json"),
        "--harmful-choice",
        a.clawly_harmful_choice,
        "--save-candidates",
        str(a.work / name / "candidates"),
    ]
    for kv in sets:  # edit.method=... is another section's setting, the rest optimize ones
        cmd += ["--set" if "." in kv.partition("=")[0] else "--optimize", kv]
    wall = _run(cmd, a.work / f"{name}.log")
    r = json.loads((a.out / f"{name}.json").read_text())
    r["wall_seconds"] = round(wall, 1)
    dump(a.out / f"{name}.json", r)


def temaq(a) -> None:
    if not selected(a, "temaq"):
        return
    _run(
        [
            sys.executable,
            str(ROOT / "bench" / "temaq_runner.py"),
            "--temaq",
            a.temaq,
            *fresh_workdir_args(a, a.work / "temaq"),
            "--trials",
            str(a.trials),
            "--seed",
            str(a.seed),
            "--out",
            str(a.out / "temaq.json"),
        ],
        a.work / "temaq.log",
    )


def tool_results(a) -> dict[str, dict]:
    """Each tool's run of this benchmark (its runner's results.json), by name."""
    names = [*heretic_runs(a), *clawly_variants(a), "temaq"]
    return {n: json.loads((a.out / f"{n}.json").read_text()) for n in names if (a.out / f"{n}.json").exists()}


def models_to_rescore(tools: dict[str, dict]) -> dict[str, str]:
    """'TOOL:N' -> the saved model of trial N: every time-to-quality candidate of every tool, and its
    chosen trial where that is not one (saved as its `saved_model`)."""
    out = {}
    for name, r in tools.items():
        for trial, path in sorted((r.get("saved_candidates") or {}).items(), key=lambda kv: int(kv[0])):
            out[f"{name}:{int(trial)}"] = path
        if r.get("saved_model") and f"{name}:{r['chosen_trial']}" not in out:
            out[f"{name}:{r['chosen_trial']}"] = r["saved_model"]
    return out


def interleaved(models: dict[str, str]) -> dict[str, str]:
    """'TOOL:N' keys taken in turn from each tool (each tool's own order kept): a re-score stopped
    early has moved every tool's time to quality along, not finished one tool."""
    by_tool: dict[str, list[str]] = {}
    for key in models:
        by_tool.setdefault(key.split(":", 1)[0], []).append(key)
    order = [k for row in itertools.zip_longest(*by_tool.values()) for k in row if k is not None]
    return {k: models[k] for k in order}


def rescore(a) -> None:
    markers = a.work / "heretic_markers.json"
    markers.write_text(json.dumps(json.loads((a.out / "heretic_markers.json").read_text())["markers"]))
    tools = {n: r for n, r in tool_results(a).items() if selected(a, n)}
    models = interleaved(models_to_rescore(tools))
    chosen = [f"{n}:{r['chosen_trial']}" for n, r in tools.items()]
    _run(
        [
            sys.executable,
            str(ROOT / "bench" / "rescore.py"),
            "--base",
            "default",
            "--models",
            *(f"{k}={v}" for k, v in models.items()),
            "--prompts",
            str(a.out / "prompts"),
            "--heretic-markers",
            str(markers),
            "--until-good",
            *chosen,
            "--max-kl",
            str(QUALITY_KL),
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


def reached(trials, rescored, started, max_refusals, max_kl) -> dict | None:
    """time_to_quality, or, when the re-score stopped before a candidate it needs, what is known."""
    try:
        return time_to_quality(trials, rescored, started, max_refusals, max_kl)
    except KeyError as e:
        return {"unknown": str(e).strip("'\"")}


def first_trial_at(trials: list[dict], started: float | None) -> float | None:
    """Seconds from the tool's start to the start of its first trial (its set-up as a user waits for it)."""
    starts = [t["end"] - t["seconds"] for t in trials if t.get("end") is not None and t.get("seconds") is not None]
    return round(min(starts) - started, 1) if starts and started is not None else None


def heretic_version(a) -> str | None:
    """The Heretic version its runs recorded (a report of finished runs needs no Heretic venv), else
    the one installed in --heretic-python."""
    for f in sorted(a.out.glob("heretic-*.json")):
        if f.name != "heretic_batch_size.json" and (v := json.loads(f.read_text()).get("version")):
            return v
    return package_version(a.heretic_python, "heretic-llm") if Path(a.heretic_python).exists() else None


def report(a) -> dict:
    tools = tool_results(a)
    held = json.loads((a.out / "heldout.json").read_text()) if (a.out / "heldout.json").exists() else None
    summary: dict = {
        "machine": machine(),
        "trials": a.trials,
        "startup_trials": a.startup,
        "seed": a.seed,
        "heretic_version": heretic_version(a),
        "tools": {},
    }
    if held:
        base = held["models"]["base"]
        bar = {"refusals": quality_threshold(base["refusals"]), "kl_divergence": QUALITY_KL}
        summary["quality"] = {
            **bar,
            "rule": f"held-out five-way refusals <= a third of the base model's ({base['refusals']} of "
            f"{held['harmful_prompts']}) at first-token KL <= {QUALITY_KL}",
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
            "batch_size": r.get("batch_size"),
            "total_seconds": r.get("wall_seconds") or r.get("timing", {}).get("total_seconds"),
            "setup_seconds": r.get("timing", {}).get("setup_seconds"),
            "first_trial_at_seconds": first_trial_at(r["trials"], r.get("started")),
            "peak_rss_mib": r["peak_rss_mib"],
            "chosen_trial": r["chosen_trial"],
            "pareto_front": [{"refusals": p[0], "kl_divergence": round(p[1], 4)} for p in fronts[name]],
        }
        phases = [t["phase_seconds"] for t in r["trials"] if t.get("phase_seconds")]
        if phases:  # clawly's trials: where the time goes (median seconds of each phase)
            summary["tools"][name]["median_phase_seconds"] = {
                k: round(statistics.median(p.get(k, 0.0) for p in phases), 2) for k in phases[0]
            }
        if held and r.get("started"):
            rescored = {int(k.split(":", 1)[1]): m for k, m in held["models"].items() if k.split(":", 1)[0] == name}
            summary["tools"][name]["chosen_heldout"] = rescored.get(r["chosen_trial"])
            summary["tools"][name]["time_to_quality"] = (
                final_model_quality(
                    rescored.get(r["chosen_trial"]), r["wall_seconds"], bar["refusals"], bar["kl_divergence"]
                )
                if r.get("final_model_only")
                else reached(r["trials"], rescored, r["started"], bar["refusals"], bar["kl_divergence"])
            )
            summary["tools"][name]["candidates_rescored"] = len(rescored)
    for name in heretic_runs(a):
        for c in summary["tools"]:  # "clawly / heretic-own": a tool's median trial over Heretic's
            if c != name and not c.startswith("heretic") and name in summary["tools"]:
                summary.setdefault("speed_ratio", {})[f"{c} / {name}"] = round(
                    summary["tools"][c]["median_seconds_per_trial"]
                    / summary["tools"][name]["median_seconds_per_trial"],
                    3,
                )
        if "clawly" in fronts and name in fronts:
            summary.setdefault("front_points_dominated", {})[name] = {
                f"{name} by clawly": dominated(fronts[name], fronts["clawly"]),
                f"clawly by {name}": dominated(fronts["clawly"], fronts[name]),
            }
    if held:
        summary["heldout"] = held
    dump(a.out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("machine", "heldout")}, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heretic-python", default="heretic-venv/bin/python")
    ap.add_argument("--temaq", default="temaq-venv/bin/temaq-abliterated", help="temaq-abliterated in its own venv")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--startup", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--heretic-batch-sizes",
        default="own,128",
        help="Heretic's runs: 'own' (the batch size its probe picks, cached after the first run) and/or numbers",
    )
    ap.add_argument("--clawly-batch-size", default="auto")
    ap.add_argument("--clawly-max-new-tokens", type=int, default=24)
    ap.add_argument("--clawly-harmful-choice", default="sample", choices=("sample", "base_refusals"))
    ap.add_argument(
        "--clawly-variant",
        action="append",
        default=[],
        metavar="clawly-NAME:KEY=VALUE,...",
        help="another clawly run in the same benchmark, with these optimize settings on top (a dotted KEY "
        "sets another section, e.g. edit.method=least_squares; repeatable)",
    )
    ap.add_argument("--kl-cap", type=float, default=0.5)
    ap.add_argument(
        "--regenerate-prompts",
        action="store_true",
        help="write new prompt tables from the templates (default: reuse the committed ones, so runs of "
        "different code score the same prompts)",
    )
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument(
        "--runs",
        default="",
        help="comma-separated runs (heretic-own, heretic-128, clawly, clawly-NAME, temaq) that the heretic, "
        "clawly, temaq and rescore steps take; the others keep their results in --out (default: all)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heretic-vs-clawly")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    a = ap.parse_args()
    a.out, a.work = a.out.resolve(), a.work.resolve()
    for step in a.steps.split(","):
        if step not in STEPS:
            raise SystemExit(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
        print(f"== {step}", flush=True)
        t0 = time.time()
        {
            "prepare": prepare,
            "heretic": heretic,
            "clawly": clawly,
            "temaq": temaq,
            "rescore": rescore,
            "report": report,
        }[step](a)
        print(f"== {step} done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
