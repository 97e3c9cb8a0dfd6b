"""Run temaq-abliterated (PyPI, MIT) without a terminal, for the benchmark: its own CLI, from its own
venv, on the benchmark's model and prompt files, choosing its candidate automatically (`--select
auto`; with stdin not a terminal it asks nothing). Results are read back from what it writes: its
run summary (`report/run_summary.json`) and its checkpoint's per-trial history.

temaq writes one model, at the end; before that a user has nothing to load. Its time to quality is
therefore its wall time when that model passes the held-out bar, and not reached otherwise.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import dump  # noqa: E402


def checkpoint_history(workdir: Path) -> list[dict]:
    """The per-trial history temaq checkpoints after every trial (the newest JSON that holds one)."""
    for path in sorted(workdir.rglob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if isinstance(data, dict) and isinstance(data.get("history"), list) and data["history"]:
            return data["history"]
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--temaq", required=True, help="the temaq-abliterated executable of its venv")
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True, help="dir with harmful_train.txt, harmless_train.txt")
    ap.add_argument("--trials", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    work = a.workdir.resolve()
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: use a fresh --workdir (temaq resumes from a checkpoint there)")
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        a.temaq,
        a.model,
        "--workdir",
        str(work),
        "--output",
        str(work / "model"),
        "--device",
        "cpu",
        "--eval-dtype",
        "float32",
        "--select",
        "auto",
        "--trials",
        str(a.trials),
        "--seed",
        str(a.seed),
        "--harmful-file",
        str((a.prompts / "harmful_train.txt").resolve()),
        "--harmless-file",
        str((a.prompts / "harmless_train.txt").resolve()),
    ]  # not --no-report: it would skip report/run_summary.json as well as the PNGs
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with (work / "temaq.log").open("w") as log:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    summary_path = work / "report" / "run_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    history = checkpoint_history(work)
    seconds = [h["eval_seconds"] for h in history if not h.get("cached") and isinstance(h.get("eval_seconds"), float)]
    model = work / "model"
    # the attempt --select auto wrote: a verified candidate, or (none passed its gate) its best-objective trial
    chosen = [c["attempt"] for c in summary.get("candidates", []) if c.get("selected")]
    chosen += [(summary.get("best_metrics") or {}).get("attempt", -1)]
    dump(
        a.out,
        {
            "tool": "temaq-abliterated",
            "argv": cmd[1:],
            "exit_code": proc.returncode,
            "trials": [
                {
                    "trial": h.get("attempt"),
                    # screened: stopped early by its bound on the objective (Optuna would call it pruned)
                    "state": "PRUNED" if h.get("screened") else "COMPLETE",
                    "refusals": h.get("refusal_first"),  # its own first-token refusal ratio, not a count
                    "kl_divergence": h.get("kl"),  # its own KL over --kl-tokens answer tokens
                    "seconds": None if h.get("cached") else h.get("eval_seconds"),  # a repeat costs nothing
                    "phase": h.get("phase"),
                }
                for h in history
            ],
            "median_eval_seconds": round(statistics.median(seconds), 2) if seconds else None,
            "search_seconds": summary.get("search_seconds"),
            "attempts": summary.get("attempts"),
            "summary": summary,
            "saved_model": str(model) if (model / "config.json").is_file() else None,
            "chosen_trial": chosen[0] if chosen else -1,  # the attempt its --select auto picked
            "final_model_only": True,  # no model before the end: time to quality is the wall time or none
            "started": t0,
            "wall_seconds": round(wall, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        },
    )
    if proc.returncode:
        raise SystemExit(f"temaq-abliterated failed (exit {proc.returncode}); see {work / 'temaq.log'}")


if __name__ == "__main__":
    main()
