"""Run clawly's engine on a benchmark workspace (the same library functions `dvc repro` runs):
probe, directions, optimize, export, merge. Writes results.json with per-trial figures,
phase timings and peak memory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import dump, machine, peak_rss_mib  # noqa: E402


def settings_for(workspace: Path, model: str = "default", sections: dict | None = None, **optimize) -> Settings:  # noqa: F821
    """The benchmark's settings: `optimize` on top of its optimize defaults, `sections` other settings
    by section ({"edit": {"method": "least_squares"}}), none of the sections the benchmark fixes."""
    from clawly.settings import Settings

    fixed = {
        "model": {"name": model},
        "artifacts_dir": str(workspace / "artifacts"),
        "data": {"out_dir": str(workspace / "prompts")},
        "probe": {"max_per_category": 50, "batch_size": 16},
        "optimize": {"harmful_prompts": 100, "harmless_prompts": 100, "kl_cap": 0.5, **optimize},
        "evaluate": {"per_category": 13},
    }
    if clash := sorted(set(sections or {}) & set(fixed)):
        raise SystemExit(f"--set {', '.join(clash)}.*: the benchmark fixes these sections (optimize ones: --optimize)")
    return Settings.from_dict({**(sections or {}), **fixed})


def sections_of(sets: list[str]) -> dict[str, dict]:
    """SECTION.KEY=VALUE strings (YAML values) as {section: {key: value}}."""
    import yaml

    out: dict[str, dict] = {}
    for s in sets:
        key, sep, value = s.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise SystemExit(f"--set {s!r}: expected SECTION.KEY=VALUE, e.g. edit.method=least_squares")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def save_candidates(settings, log, model, tok, study, trials: list[dict], out: Path) -> dict[int, str]:
    """Each time-to-quality candidate saved as the Pipeline API saves a trial, from the directions and
    prompt tables this run wrote (nothing is probed or generated again): as its PEFT LoRA adapter (a few
    MB, where a merged copy of a 0.5B model takes 2.4 GB), or as a merged model where no adapter holds
    the change. Either way it is the model the merge stage would write for that trial (the merged
    model is the base plus the adapter's B A)."""
    from bench.time_to_quality import candidates
    from clawly.ablate.ablation import AblationPlan
    from clawly.ablate.directions import read_ablation_directions
    from clawly.ablate.edits import load_writer_inputs
    from clawly.api import Pipeline
    from clawly.data.prompts import read_prompts
    from clawly.paths import Paths

    p = Paths.of(settings)
    pipe = Pipeline(settings, log)
    pipe.model, pipe.tokenizer = model, tok
    pipe.harmful, pipe.harmless = read_prompts(p)
    pipe.directions, pipe.inputs = read_ablation_directions(p.orthogonalized), load_writer_inputs(settings)
    plans = {t.number: t.user_attrs["plan"] for t in study.get_trials(deepcopy=False) if "plan" in t.user_attrs}
    saved = {}
    for t in candidates(trials):
        pipe.restore_trial(AblationPlan.from_dict(plans[t["trial"]]))
        save = pipe.save_model if pipe._change.exact else pipe.save_adapter
        saved[t["trial"]] = str(save(out / f"trial-{t['trial']}"))
    pipe.close()  # the base weights back in the model the caller still holds
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--model", default="default", help="the model (the benchmark's: the packaged default)")
    ap.add_argument("--n-trials", type=int, required=True)
    ap.add_argument("--n-startup-trials", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--prune-kl", type=float, default=None)
    ap.add_argument(
        "--harmful-choice",
        default="sample",
        choices=("sample", "base_refusals"),
        help="optimize.harmful_choice: score trials on a sample, or on requests the base model refuses",
    )
    ap.add_argument(
        "--optimize",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other optimize setting (a YAML value), e.g. harmful_pool=136; repeat for more",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a setting of another section, e.g. edit.method=least_squares (its probe-writers stage then "
        "runs in the setup); repeat for more",
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--save-candidates",
        type=Path,
        help="save every time-to-quality candidate (bench/time_to_quality.py) as a merged model in DIR/trial-N",
    )
    a = ap.parse_args()
    t0 = time.time()
    import optuna
    import yaml

    from clawly.log import get_logger
    from clawly.model.loading import load_model
    from clawly.steps import (
        compute_directions,
        export_lora,
        merge,
        optimize,
        orthogonalize_categories,
        probe_activations,
        probe_writers,
    )

    bs = int(a.batch_size) if a.batch_size.isdigit() else a.batch_size
    extra = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in a.optimize)}
    given = {
        "n_trials": a.n_trials,
        "n_startup_trials": a.n_startup_trials,
        "seed": a.seed,
        "max_new_tokens": a.max_new_tokens,
        "batch_size": bs,
        "prune_kl": a.prune_kl,
        "harmful_choice": a.harmful_choice,
        "storage": str(a.workspace / "artifacts" / "study" / f"journal-{a.out.stem}.log"),
    }
    sections = sections_of(a.set)
    settings = settings_for(a.workspace, a.model, sections, **{**given, **extra})  # --optimize KEY=VALUE wins
    log = get_logger("bench", a.workspace / "logs")
    timing = {}
    t = time.time()
    model, tok = load_model(settings.model, log)
    timing["load_seconds"] = round(time.time() - t, 1)
    t = time.time()
    probe_activations.run(settings, log, model, tok)
    compute_directions.run(settings, log)
    orthogonalize_categories.run(settings, log)
    probe_writers.run(settings, log, model, tok)  # what input-conditional edits read (nothing otherwise)
    timing["probe_and_directions_seconds"] = round(time.time() - t, 1)
    t = time.time()
    metrics = optimize.run(settings, log, model, tok)
    timing["optimize_seconds"] = round(time.time() - t, 1)
    import pandas as pd

    from clawly.paths import Paths
    from clawly.search.study import _storage

    used = pd.read_parquet(Paths.of(settings).optimizer_prompts)  # the prompts scored, in the order scored
    harmful, harmless = (used[used.set == k].reset_index(drop=True) for k in ("harmful", "harmless"))
    fingerprint = optimize.study_fingerprint(settings, harmful, harmless)
    name = f"{settings.optimize.study_name}-{fingerprint}"
    study = optuna.load_study(study_name=name, storage=_storage(settings.optimize.storage))
    trials = [
        {
            "trial": t.number,
            "state": t.state.name,
            "refusals": int(t.values[0]) if t.values else None,
            "kl_divergence": t.user_attrs.get("kl_divergence", t.values[1] if t.values else None),
            "tokens": t.user_attrs.get("tokens"),
            "phase_seconds": t.user_attrs.get("phase_seconds"),
            "params": t.params,
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
            "end": t.datetime_complete.timestamp(),
        }
        for t in study.get_trials(deepcopy=False)
        if t.datetime_complete
    ]
    t = time.time()
    export_lora.run(settings, log, model, tok)
    timing["export_and_merge_seconds"] = round(time.time() - t, 1)
    if a.save_candidates:  # after the clock of the run: what a user would save, for the held-out re-score
        t = time.time()
        saved = save_candidates(settings, log, model, tok, study, trials, a.save_candidates)
        timing["save_candidates_seconds"] = round(time.time() - t, 1)
    t = time.time()
    del model
    merge.run(settings, log)
    timing["export_and_merge_seconds"] += round(time.time() - t, 1)
    timing["setup_seconds"] = round(timing["load_seconds"] + timing["probe_and_directions_seconds"], 1)
    timing["total_seconds"] = round(time.time() - t0, 1)
    from importlib.metadata import version

    dump(
        a.out,
        {
            "tool": "clawly",
            "version": version("clawly"),
            "transformers": version("transformers"),
            "optuna": version("optuna"),
            "settings": settings.to_dict(),
            "trials": trials,
            "baseline_refusals": metrics["base"]["refusals"],
            "chosen_trial": metrics["chosen_trial"],
            "batch_size": metrics["batch_size"],
            "response_prefix": metrics["response_prefix"],
            "pruned_trials": metrics["pruned_trials"],
            "saved_model": str(Path(settings.artifacts_dir) / "model"),
            "saved_candidates": saved if a.save_candidates else None,
            "started": t0,
            "timing": timing,
            "peak_rss_mib": peak_rss_mib(),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
