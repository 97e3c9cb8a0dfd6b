"""Reliability: interruptions lose at most the running trial and never a previous output; bad input
at every door (CLI, stages, API) is one clear error, with nothing half-written.

The kill -9 tests run the real stages in subprocesses and kill them mid-work, several times.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from test_api import quiet, tiny_settings
from transformers import AutoModelForCausalLM

from clawly import Pipeline
from clawly.errors import ClawlyError

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the Optuna journal

def test_a_half_written_last_journal_line_is_dropped_and_the_study_goes_on(make_tiny_model, tmp_path):
    """A process killed while appending to the journal leaves a line without its newline; the next
    append would glue onto it and make the whole journal unreadable from then on."""
    model_dir = make_tiny_model("llama")
    pipe = Pipeline(tiny_settings(model_dir, tmp_path, n_trials=2), log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    pipe.close()
    journal = tmp_path / "artifacts" / "study" / "journal.log"
    with open(journal, "ab") as f:
        f.write(b'{"op_code": 4, "worker_id": "x", "trial_id"')
    for n_trials in (3, 4):  # resume twice: the second open reads what the first appended
        again = Pipeline(tiny_settings(model_dir, tmp_path, n_trials=n_trials), log=quiet(tmp_path))
        assert [t.index for t in again.run_optimization_iter()] == [n_trials - 1]
        assert [t.index for t in again.trials()] == list(range(n_trials))
        again.close()
    assert journal.read_bytes().endswith(b"\n")


def test_a_journal_damaged_elsewhere_is_one_error_naming_the_line(make_tiny_model, tmp_path):
    model_dir = make_tiny_model("llama")
    pipe = Pipeline(tiny_settings(model_dir, tmp_path, n_trials=1), log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    pipe.close()
    journal = tmp_path / "artifacts" / "study" / "journal.log"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:1] + [b"garbage\n"] + lines[1:]))
    again = Pipeline(tiny_settings(model_dir, tmp_path, n_trials=2), log=quiet(tmp_path))
    with pytest.raises(ClawlyError, match=r"journal.log is damaged at line 2 .*delete it to start the study again"):
        again.start_search()


# ---------------------------------------------------------------- kill -9

def _kill_config(tmp: Path, n_trials: int) -> Path:
    """Trials of about a second on the tiny model (160 prompts, 48 tokens), so kills land inside them."""
    config = tmp / "kill.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train_per_category": 8, "eval_per_category": 24, "harmless_train": 24, "harmless_eval": 24},
        "probe": {"max_per_category": 4, "batch_size": 8},
        "optimize": {"n_trials": n_trials, "n_startup_trials": 3, "harmful_prompts": 160, "harmless_prompts": 16,
                     "max_new_tokens": 48, "batch_size": 32, "refusal_markers": ["zzzz"]},
        "model": {"device": "cpu", "cache_dir": str(tmp / "cache")}, "merge": {"max_shard_size": "40KB"}}))
    return config


def _clawly(model_dir: Path, config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clawly.cli", str(model_dir), "--config", str(config), "--output", str(out),
            "--non-interactive", *extra]


def _trials(journal: Path) -> dict[int, tuple]:
    """Finished trials (number -> parameters and values) and the other trials' states, read with Optuna."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    return {t.number: (t.state.name, t.params, t.values) for t in study.get_trials()}


@pytest.mark.slow
def test_kill_9_of_the_optimization_at_any_moment_loses_at_most_the_running_trial(make_tiny_model, tmp_path):
    model_dir, out = make_tiny_model("llama"), tmp_path / "out"
    config = _kill_config(tmp_path, n_trials=8)
    journal = out / "work" / "study" / "journal.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    seen: dict[int, tuple] = {}
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(_clawly(model_dir, config, out, "--save", "none"), env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = len([t for t in (_trials(journal) if journal.exists() else {}).values() if t[0] == "COMPLETE"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # wait for a trial of this process
            if journal.exists() and sum(t[0] == "COMPLETE" for t in _trials(journal).values()) > before:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))  # then anywhere in the next trial
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        now = _trials(journal)
        for number, trial in seen.items():
            if trial[0] == "COMPLETE":
                assert now[number] == trial, f"trial {number} changed after a kill"
        seen = now
    assert kills >= 3
    done = subprocess.run(_clawly(model_dir, config, out, "--save", "none"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = _trials(journal)
    complete = [n for n, t in final.items() if t[0] == "COMPLETE"]
    assert len(complete) == 8 and all(final[n] == seen[n] for n in seen if seen[n][0] == "COMPLETE")
    lost = [n for n, t in final.items() if t[0] == "FAIL"]  # the trials running when killed, and no other
    assert len(lost) <= kills and all(t[0] in ("COMPLETE", "FAIL") for t in final.values())


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["export_lora", "merge"])
def test_kill_9_while_a_stage_writes_its_output_leaves_the_previous_one_whole(make_tiny_model, tmp_path, stage):
    """The stage runs on the outputs of a finished run and is killed as soon as its temp directory
    appears (mid-write), and at random moments after, several times; the previous output stays whole."""
    model_dir = make_tiny_model("llama", num_layers=3, hidden=64)
    out = tmp_path / "out"
    config = _kill_config(tmp_path, n_trials=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(_clawly(model_dir, config, out, "--save", "none"), env=env, cwd=tmp_path, check=True,
                   capture_output=True)
    work = out / "work"
    overrides = [f"model.name={model_dir}", "model.device=cpu", f"model.cache_dir={tmp_path / 'cache'}",
                 f"artifacts_dir={work}", f"data.out_dir={work / 'prompts'}", "merge.max_shard_size=40KB",
                 "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                 "hydra/hydra_logging=disabled"]

    def run_stage(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", f"stages.{name}", *overrides], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    for name in ("export_lora", "merge"):
        first = run_stage(name)
        assert first.wait(300) == 0, first.stderr.read().decode()[-2000:]
        if name == stage:
            break
    target = work / ("lora" if stage == "export_lora" else "model")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    rng = random.Random(1)
    for attempt in range(5):
        proc = run_stage(stage)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not list(work.glob(f".{target.name}.*.tmp")):
            time.sleep(0.001)
        if attempt:
            time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before, f"kill {attempt} changed {target}"
    if stage == "merge":
        AutoModelForCausalLM.from_pretrained(target)  # and it still loads
    again = run_stage(stage)
    assert again.wait(300) == 0
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # same inputs, same bytes
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(f".{target.name}")) == []  # no leftovers
