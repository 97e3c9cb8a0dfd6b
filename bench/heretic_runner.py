"""Run Heretic (PyPI `heretic-llm`) without a terminal, for the benchmark. Run it with the
interpreter of a venv that has heretic-llm installed (see bench/README.md).

Heretic's own code does all the work: this script builds its command line, calls
`heretic.main.run()` and answers its menus (pick the trial by the benchmark's rule, save it
merged, exit). Results are read back from Heretic's Optuna journal into results.json:
per-trial refusals, KL and wall time, the settings Heretic resolved, phase timings and peak memory.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--prompts", required=True, help="dir with {harmful,harmless}_{train,eval}.txt")
    ap.add_argument("--n-trials", type=int, required=True)
    ap.add_argument("--n-startup-trials", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, required=True, help="0: Heretic's own search (slow)")
    ap.add_argument("--max-response-length", type=int, default=100)
    ap.add_argument("--system-prompt", default="You are a helpful assistant.")
    ap.add_argument("--response-prefix", default=None, help="'' skips Heretic's prefix detection")
    ap.add_argument("--kl-cap", type=float, default=0.5)
    ap.add_argument("--save-dir", required=True)
    ap.add_argument(
        "--save-candidates",
        help="also save every time-to-quality candidate (bench/time_to_quality.py) in DIR/trial-N, through "
        "Heretic's own menus (the candidates are read from its study journal: they need not be on its final front)",
    )
    return ap.parse_args()


def choose(trials: list, kl_cap: float):
    """The benchmark's rule (the same as clawly's): fewest refusals with KL <= kl_cap, else lowest KL."""
    under = [t for t in trials if t.user_attrs["kl_divergence"] <= kl_cap]
    if under:
        return min(under, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"]))
    return min(trials, key=lambda t: t.user_attrs["kl_divergence"])


def journal_study(ckpt: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = glob.glob(os.path.join(ckpt, "*.jsonl"))[0]
    return optuna.load_study(
        study_name="heretic", storage=JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    )


def trial_row(t) -> dict:
    """One trial of Heretic's journal as the benchmark reports it (its own index, counts and times)."""
    ua = t.user_attrs
    return {
        "trial": ua.get("index"),
        "state": t.state.name,
        "refusals": ua.get("refusals"),
        "kl_divergence": ua.get("kl_divergence"),
        "prompts": ua.get("n_bad_prompts"),
        "base_refusals": ua.get("base_refusals"),
        "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
        if t.datetime_complete and t.datetime_start
        else None,
        "start": t.datetime_start.timestamp() if t.datetime_start else None,
        "end": t.datetime_complete.timestamp() if t.datetime_complete else None,
    }


def candidate_trials(ckpt: str) -> list:
    """Heretic's trials that were on its own front when they completed (bench/time_to_quality.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from time_to_quality import candidates

    frozen = {t.user_attrs.get("index"): t for t in journal_study(ckpt).get_trials(deepcopy=False)}
    return [frozen[r["trial"]] for r in candidates([trial_row(t) for t in frozen.values()])]


def main() -> None:
    a = parse_args()
    t0 = time.time()
    work = os.path.abspath(a.workdir)
    ckpt = os.path.join(work, "checkpoints")
    if glob.glob(os.path.join(ckpt, "*.jsonl")):
        raise SystemExit(f"{ckpt} already holds a study: use a fresh --workdir")
    os.makedirs(work, exist_ok=True)
    prompts = os.path.abspath(a.prompts)
    argv = [
        "heretic",
        "--model",
        os.path.abspath(a.model),
        "--dtypes",
        '["float32"]',
        "--device-map",
        "cpu",
        "--batch-size",
        str(a.batch_size),
        "--max-response-length",
        str(a.max_response_length),
        "--n-trials",
        str(a.n_trials),
        "--n-startup-trials",
        str(a.n_startup_trials),
        "--seed",
        str(a.seed),
        "--system-prompt",
        a.system_prompt,
        "--study-checkpoint-dir",
        ckpt,
        "--export-strategy",
        "merge",
    ]
    for flag, name in (
        ("good-prompts", "harmless_train"),
        ("bad-prompts", "harmful_train"),
        ("good-evaluation-prompts", "harmless_eval"),
        ("bad-evaluation-prompts", "harmful_eval"),
    ):
        argv += [f"--{flag}.dataset", os.path.join(prompts, f"{name}.txt")]
    if a.response_prefix is not None:
        argv += ["--response-prefix", a.response_prefix]
    os.chdir(work)  # Heretic reads config.toml from the working directory
    sys.argv = argv

    import heretic.main as hm

    t_imported = time.time()
    state: dict = {"picked": None, "saved": False, "menu": None, "save": [None, None], "queue": None, "dir": None}
    state["candidates"] = {}  # Heretic's trial index -> the directory it was saved in

    def select(message, choices):
        values = [getattr(c, "value", c) for c in choices]
        if message.startswith("Which trial do you want to use?"):
            state["menu"] = state["menu"] or time.time()
            if state["picked"] is None:
                state["picked"] = choose([v for v in values if not isinstance(v, str)], a.kl_cap)
                state["dir"], state["saved"] = os.path.abspath(a.save_dir), False
                state["queue"] = candidate_trials(ckpt) if a.save_candidates else []
                return state["picked"]
            if state["queue"]:  # the next candidate, restored and saved by Heretic's own code
                t = state["queue"].pop(0)
                index = t.user_attrs["index"]
                state["dir"], state["saved"] = os.path.join(os.path.abspath(a.save_candidates), f"trial-{index}"), False
                state["candidates"][index] = state["dir"]
                return t
            return ""  # exit
        if message.startswith("What do you want to do with the decensored model?"):
            if not state["saved"]:
                state["saved"] = True
                state["save"][0] = state["save"][0] or time.time()
                return "Save the model to a local folder"
            state["save"][1] = state["save"][1] or time.time()  # the chosen trial's save
            return ""
        raise RuntimeError(f"unexpected Heretic question: {message!r}")

    hm.prompt_select = select
    hm.prompt_path = lambda message: state["dir"]
    hm.prompt_text = lambda *args, **kw: ""
    error = None
    try:
        hm.run()
    except BaseException as e:  # still report what the journal holds
        error = f"{type(e).__name__}: {e}"
    t_end = time.time()

    study = journal_study(ckpt)
    trials = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    starts = [t["start"] for t in trials if t["start"]]
    import importlib.metadata as md

    result = {
        "tool": "heretic",
        "version": md.version("heretic-llm"),
        "transformers": md.version("transformers"),
        "optuna": md.version("optuna"),
        "argv": argv[1:],
        "error": error,
        "settings_used": json.loads(study.user_attrs.get("settings", "{}")),
        "trials": trials,
        "chosen_trial": state["picked"].user_attrs["index"] if state["picked"] else None,
        "saved_model": os.path.abspath(a.save_dir) if state["save"][0] else None,
        "saved_candidates": state["candidates"] if a.save_candidates else None,
        "started": t0,
        "timing": {
            "import_seconds": round(t_imported - t0, 1),
            "setup_seconds": round(min(starts) - t_imported, 1) if starts else None,
            "optimization_seconds": round(state["menu"] - t_imported, 1) if state["menu"] else None,
            "save_seconds": round(state["save"][1] - state["save"][0], 1) if all(state["save"]) else None,
            "total_seconds": round(t_end - t0, 1),
        },
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    if error:
        raise SystemExit(f"heretic failed: {error}")


if __name__ == "__main__":
    main()
