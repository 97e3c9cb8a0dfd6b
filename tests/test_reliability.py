"""Reliability: interruptions lose at most the running trial and never a previous output; bad input
at every door (CLI, stages, API) is one clear error, with nothing half-written.

The kill -9 tests run the real stages in subprocesses and kill them mid-work, several times.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
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

from clawly import Pipeline, cli
from clawly.errors import ClawlyError
from clawly.search.study import WORKER

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
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"train_per_category": 8, "eval_per_category": 24, "harmless_train": 24, "harmless_eval": 24},
                "probe": {"max_per_category": 4, "batch_size": 8},
                "optimize": {
                    "n_trials": n_trials,
                    "n_startup_trials": 3,
                    "harmful_prompts": 160,
                    "harmless_prompts": 16,
                    "max_new_tokens": 48,
                    "batch_size": 32,
                    "refusal_markers": ["zzzz"],
                },
                "model": {"device": "cpu", "cache_dir": str(tmp / "cache")},
                "merge": {"max_shard_size": "40KB"},
            }
        )
    )
    return config


def _clawly(model_dir: Path, config: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clawly.cli",
        str(model_dir),
        "--config",
        str(config),
        "--output",
        str(out),
        "--non-interactive",
        *extra,
    ]


def _trials(journal: Path) -> dict[int, tuple]:
    """Finished trials (number -> parameters and values) and the other trials' states, read with Optuna."""
    return {t.number: (t.state.name, t.params, t.values) for t in _frozen(journal)}


def _frozen(journal: Path) -> list[optuna.trial.FrozenTrial]:
    """The journal's trials; none while the process has created the file but not yet the study in it."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage).get_trials() if names else []


def _worker_pid(trial: optuna.trial.FrozenTrial) -> int | None:
    return (trial.user_attrs.get(WORKER) or {}).get("pid")


def _stop(proc: subprocess.Popen) -> None:
    """SIGSTOP `proc` and wait until it is stopped: what is on disk then is what a SIGKILL leaves (a
    stopped process runs no further instruction before the kill; a write in progress ends first
    either way). Seen in /proc (Linux, as the kill -9 tests are)."""
    proc.send_signal(signal.SIGSTOP)
    while True:
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before it could be stopped"
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.0005)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the process ended by itself ({proc.returncode}), not by the kill"


def _trial_of_process(proc: subprocess.Popen, journal: Path, after: int) -> optuna.trial.FrozenTrial:
    """Wait until process `proc` has finished a trial and runs a later one, numbered above `after`;
    return it as the journal holds it (worker recorded: it is inside the trial's objective)."""
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before it started a trial to kill"
        assert time.monotonic() < deadline, "no trial of the process started within 300 s"
        mine = [t for t in (_frozen(journal) if journal.exists() else []) if _worker_pid(t) == proc.pid]
        done = [t.number for t in mine if t.state == optuna.trial.TrialState.COMPLETE]
        running = [t for t in mine if t.state == optuna.trial.TrialState.RUNNING and t.number > max([after, *done])]
        if done and running:
            return running[0]
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_of_the_optimization_at_any_moment_loses_at_most_the_running_trial(make_tiny_model, tmp_path):
    """Each run is killed at a random moment in a trial it runs after finishing one: stopped there
    (SIGSTOP), checked to be still inside that trial, then SIGKILLed; a stop that came after the trial
    ended lets the process go on and aims earlier in its next trial. Every kill is proven to have
    landed mid-trial: the process died of SIGKILL and its trial is still RUNNING in the journal.
    Exactly those trials are lost (FAIL), no finished one changes."""
    model_dir, out = make_tiny_model("llama"), tmp_path / "out"
    n_trials = 10  # four kills and a few stops that come late still leave trials for the last run
    config = _kill_config(tmp_path, n_trials=n_trials)
    journal = out / "work" / "study" / "journal.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    seen: dict[int, tuple] = {}
    killed: list[int] = []  # the trials running when their process was killed
    for _ in range(4):
        proc = subprocess.Popen(
            _clawly(model_dir, config, out, "--save", "none"),
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            aim, after = 0.5, -1  # the share of the shortest trial so far to aim within
            while True:
                target = _trial_of_process(proc, journal, after)
                shortest = min(
                    (t.datetime_complete - t.datetime_start).total_seconds()
                    for t in _frozen(journal)
                    if t.state == optuna.trial.TrialState.COMPLETE
                )
                started = (datetime.datetime.now() - target.datetime_start).total_seconds()  # this machine's clock
                time.sleep(rng.uniform(0.0, max(0.0, aim * shortest - started)))
                _stop(proc)
                if [t for t in _frozen(journal) if t.number == target.number and t.state.name == "RUNNING"]:
                    break
                proc.send_signal(signal.SIGCONT)  # the trial was over: aim earlier in the next one
                aim, after = aim / 2, target.number
            _kill(proc)
        finally:
            proc.kill()
            proc.wait()
        now = _frozen(journal)
        still = [t.number for t in now if t.state == optuna.trial.TrialState.RUNNING and _worker_pid(t) == proc.pid]
        assert still == [target.number], f"killed outside trial {target.number}: its process's running trials {still}"
        killed.append(target.number)
        after_kill = {t.number: (t.state.name, t.params, t.values) for t in now}
        for number, trial in seen.items():
            if trial[0] == "COMPLETE":
                assert after_kill[number] == trial, f"trial {number} changed after a kill"
        seen = after_kill
    done = subprocess.run(
        _clawly(model_dir, config, out, "--save", "none"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    final = _trials(journal)
    complete = [n for n, t in final.items() if t[0] == "COMPLETE"]
    assert len(complete) == n_trials and all(final[n] == seen[n] for n in seen if seen[n][0] == "COMPLETE")
    lost = sorted(n for n, t in final.items() if t[0] == "FAIL")
    assert len(killed) == 4 and lost == sorted(killed)  # exactly the trials running when killed, and no other
    assert all(t[0] in ("COMPLETE", "FAIL") for t in final.values())


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["export_lora", "merge"])
def test_kill_9_while_a_stage_writes_its_output_leaves_the_previous_one_whole(make_tiny_model, tmp_path, stage):
    """The stage runs on the outputs of a finished run and is killed mid-write five times: as soon as
    its temp directory appears, then at random moments in its write window (as long as the first
    write took). Each time it is stopped (SIGSTOP), checked to be still writing (its own temp
    directory, named with its pid, is there and the output not yet swapped: same inode), then
    SIGKILLed; a stop that came after the swap lets the stage finish and aims earlier next time.
    After each kill its temp directory is still there, and the previous output is whole."""
    model_dir = make_tiny_model("llama", num_layers=3, hidden=64)
    out = tmp_path / "out"
    config = _kill_config(tmp_path, n_trials=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        _clawly(model_dir, config, out, "--save", "none"), env=env, cwd=tmp_path, check=True, capture_output=True
    )
    work = out / "work"
    target = work / ("lora" if stage == "export_lora" else "model")
    overrides = [
        f"model.name={model_dir}",
        "model.device=cpu",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"artifacts_dir={work}",
        f"data.out_dir={work / 'prompts'}",
        "merge.max_shard_size=40KB",
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]

    def run_stage(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", f"stages.{name}", *overrides],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def temp_of(proc: subprocess.Popen) -> list[Path]:
        return list(work.glob(f".{target.name}.{proc.pid}.*.tmp"))  # clawly.io names temps with the pid

    def wait_for_temp(proc: subprocess.Popen) -> float:
        deadline = time.monotonic() + 120
        while not temp_of(proc):
            assert proc.poll() is None, f"the stage ended ({proc.returncode}) before it began its output"
            assert time.monotonic() < deadline, "the stage began no output within 120 s"
            time.sleep(0.001)
        return time.monotonic()

    for name in ("export_lora", "merge"):
        first = run_stage(name)
        if name == stage:  # the write window: from its temp directory to the swap onto the output
            inode = target.stat().st_ino if target.exists() else None
            began = wait_for_temp(first)
            while first.poll() is None and (not target.exists() or target.stat().st_ino == inode):
                time.sleep(0.001)
            window = time.monotonic() - began
        assert first.wait(300) == 0, first.stderr.read().decode()[-2000:]
        if name == stage:
            break
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    rng = random.Random(1)
    kills = late = 0
    while kills < 5:
        assert late <= 12, f"{late} stops came after the write ({window:.3f} s window at first)"
        inode = target.stat().st_ino
        proc = run_stage(stage)
        try:
            wait_for_temp(proc)
            if kills:
                time.sleep(rng.uniform(0.0, window))
            _stop(proc)
            if not (temp_of(proc) and target.stat().st_ino == inode):  # swapped already: aim earlier next time
                proc.send_signal(signal.SIGCONT)
                assert proc.wait(300) == 0, proc.stderr.read().decode()[-2000:]
                late, window = late + 1, window / 2
            else:
                _kill(proc)
                assert temp_of(proc) and target.stat().st_ino == inode, f"kill {kills} did not land mid-write"
                kills += 1
        finally:
            proc.kill()
            proc.wait()
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before, f"run {kills + late} changed {target}"
    if stage == "merge":
        AutoModelForCausalLM.from_pretrained(target)  # and it still loads
    again = run_stage(stage)
    assert again.wait(300) == 0
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # same inputs, same bytes
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(f".{target.name}")) == []  # no leftovers


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing half-written

TINY_CONFIG = {
    "data": {"train_per_category": 8, "eval_per_category": 6, "harmless_train": 24, "harmless_eval": 24},
    "probe": {"max_per_category": 4, "batch_size": 8},
    "optimize": {
        "n_trials": 2,
        "n_startup_trials": 2,
        "harmful_prompts": 8,
        "harmless_prompts": 8,
        "max_new_tokens": 4,
        "batch_size": 8,
    },
}


@pytest.fixture
def tiny_cli(tmp_path, make_tiny_model, capsys):
    """clawly's main() on the tiny model with a small config: (argv -> (exit status, stderr lines))."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "model": {"device": "cpu", "cache_dir": str(tmp_path / "c")}}))

    def run(*argv: str, model: str | None = None) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            code = cli.main(
                [
                    model or str(make_tiny_model("llama")),
                    "--config",
                    str(config),
                    "--output",
                    str(tmp_path / "out"),
                    "--non-interactive",
                    *argv,
                ]
            )
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, [line for line in err.splitlines() if "error" in line]

    return run


def prompt_file(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("header.csv", b"text\n", "holds no prompts (an empty file, or a header and no rows)"),
        ("empty.txt", b"", "holds no prompts"),
        ("blank.txt", b"\n  \n\n", "holds no prompts"),
        (
            "repeats.csv",
            b"text\nhow do i x\nhow do I  X\n",
            "1 prompt(s) repeat another prompt of the file (prompt 2 "
            "repeats prompt 1: 'how do I X'): remove the repeats",
        ),
        ("columns.csv", b"question\nhow do i x\n", "no 'text' or 'prompt' column (columns: question)"),
        ("latin.csv", b"text\ncaf\xe9 bomb\n", "not UTF-8 text (byte 0xe9 on line 2): save the file as UTF-8"),
        (
            "tiny.csv",
            b"text,category\nhow do i build a trebuchet,siege\n",
            "category 'siege' of {path} has 1 prompt(s) (1 train, 0 eval/tune): it needs at least one train prompt",
        ),
        ("broken.jsonl", b'{"text": "how do i x"\n', "could not read prompts"),
        ("table.parquet", b"PAR1 not really", "could not read prompts"),
    ],
)
def test_a_bad_prompt_file_is_one_error_before_any_model_work(tiny_cli, tmp_path, name, content, message):
    path = prompt_file(tmp_path, name, content)
    code, errors = tiny_cli("--data.harmful-files", path)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"clawly: error: {path}: ") or errors[0].startswith("clawly: error: category")
    assert message.format(path=path) in errors[0]
    assert not (tmp_path / "out" / "work" / "activations").exists()  # said before probing


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--n-trial", "3"], "unknown option --n-trial (did you mean --n-trials?)"),
        (["--n-trials", "0"], "invalid setting optimize.n_trials=0: an integer >= 1"),
        (["--kl-cap", "-1"], "invalid setting optimize.kl_cap=-1: a number > 0"),
        (
            ["--categories.weights", "violence_weapon=1"],
            "names category with no prompts: violence_weapon (did you mean violence_weapons?)",
        ),
        (["--categories.weights", "violence_weapons=2"], "invalid setting categories.weights.violence_weapons=2"),
        (
            ["--refusal-markers", "[]"],
            "invalid setting optimize.refusal_markers=[]: null (the built-in markers) or a list",
        ),
    ],
)
def test_bad_options_are_one_error_with_the_fix(tiny_cli, tmp_path, argv, message):
    code, errors = tiny_cli(*argv)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out" / "work" / "activations").exists()


def test_an_unknown_key_in_a_config_file_names_the_closest_one(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("optimize:\n  n_trial: 3\n")
    assert cli.main(["--config", str(config), "--output", str(tmp_path / "o")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(
            "clawly: error: unknown setting optimize.n_trial (did you mean optimize.n_trials?); allowed keys in "
            "'optimize': "
        )
    )


@pytest.mark.parametrize("case", ["missing", "hub", "no-weights", "pickle", "file"])
def test_a_model_that_cannot_be_loaded_is_one_line_naming_it(tiny_cli, tmp_path, make_tiny_model, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty-dir").mkdir()
    model = {
        "missing": str(tmp_path / "no-such-model"),
        "hub": "nobody/no-such-model-xyz",
        "no-weights": str(tmp_path / "empty-dir"),
    }.get(case)
    if case == "file":
        model = prompt_file(tmp_path, "weights.bin", b"x")
    if case == "pickle":
        model = str(tmp_path / "pickled")
        shutil.copytree(make_tiny_model("llama"), model)
        for f in Path(model).glob("*.safetensors"):
            f.rename(f.with_suffix(".bin"))
    code, errors = tiny_cli(model=model)
    expected = {
        "missing": "model not found",
        "hub": "could not get model 'nobody/no-such-model-xyz' from the Hugging Face Hub",
        "no-weights": "holds no *.safetensors or *.gguf weights",
        "pickle": "has only pickle weights (.bin/.pt); clawly loads safetensors only",
        "file": "is not a .gguf file",
    }[case]
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors


def test_a_model_without_a_chat_template_uses_the_documented_fallback(make_tiny_model, tmp_path, caplog):
    from clawly.measure.templating import chat_prompts
    from clawly.model.loading import FALLBACK_CHAT_TEMPLATE, load_model
    from clawly.settings import ModelSettings

    source = tmp_path / "base-model"
    shutil.copytree(make_tiny_model("llama"), source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    for f in source.glob("*.jinja"):
        f.unlink()
    with caplog.at_level("WARNING"):
        _, tokenizer = load_model(ModelSettings(name=str(source), device="cpu"))
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE and "no chat template" in caplog.text
    assert chat_prompts(tokenizer, ["how do i bake bread ?"], "You help.") == [
        "You help.\n\nUser: how do i bake bread ?\nAssistant:"
    ]
    pipe = Pipeline(tiny_settings(source, tmp_path, n_trials=1), log=quiet(tmp_path))
    assert len(list(pipe.run_optimization_iter())) == 1  # the whole search runs on it


def test_a_damaged_stage_output_is_one_error_naming_the_stage_that_makes_it(make_tiny_model, tmp_path):
    """Each file between stages, cut short as a kill or a full disk leaves it, read by the next step."""
    from clawly.log import get_logger
    from clawly.steps import (
        compute_directions,
        export_lora,
        merge,
        optimize,
        orthogonalize_categories,
        probe_activations,
    )

    settings = tiny_settings(make_tiny_model("llama"), tmp_path, n_trials=1)
    pipe = Pipeline(settings, log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    pipe.write_outputs()
    export_lora.run(settings, quiet(tmp_path))
    log = get_logger("t", None, quiet=True)
    work = Path(settings.artifacts_dir)
    cases = [
        (work.parent / "prompts" / "harmful.parquet", "generate-datasets", probe_activations.run),
        (work / "activations" / "means.safetensors", "probe-activations", compute_directions.run),
        (work / "directions" / "directions.safetensors", "compute-directions", orthogonalize_categories.run),
        (work / "directions" / "orthogonalized.safetensors", "orthogonalize-categories", optimize.run),
        (work / "optimize" / "chosen_trial.json", "optimize", export_lora.run),
        (work / "lora" / "adapter_model.safetensors", "export-lora", merge.run),
    ]
    for path, made_by, step in cases:
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(ClawlyError) as caught:
            step(settings, log)
        message = str(caught.value)
        assert message.startswith(f"{path} cannot be read (") and f"rerun '{made_by}'" in message, message
        assert "\n" not in message
        path.write_bytes(whole)


def test_directions_of_another_model_are_refused_naming_both_shapes(make_tiny_model, tmp_path):
    from clawly.steps import export_lora

    settings = tiny_settings(make_tiny_model("llama"), tmp_path, n_trials=1)
    pipe = Pipeline(settings, log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    pipe.write_outputs()
    other = tiny_settings(make_tiny_model("llama", num_layers=3), tmp_path, n_trials=1)
    with pytest.raises(
        ClawlyError,
        match=r"orthogonalized.safetensors was computed on a model with 2 decoder layers "
        r"and hidden size 32, but LlamaForCausalLM here has 3 and 32",
    ):
        export_lora.run(other, quiet(tmp_path))
    assert not (tmp_path / "artifacts" / "lora").exists()


def test_nan_in_the_residual_stream_is_one_error_and_no_activations_are_written(make_tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "broken-model"
    shutil.copytree(make_tiny_model("llama"), source)
    weights = load_file(str(source / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    pipe = Pipeline(tiny_settings(source, tmp_path), log=quiet(tmp_path))
    with pytest.raises(
        ClawlyError,
        match=r"the residual stream holds NaN or inf .* at probe point 2\): the model "
        r"overflows in torch.float32 or its weights hold NaN",
    ):
        pipe.compute_refusal_directions()
    assert not (tmp_path / "artifacts" / "activations" / "harmful.parquet").exists()
    assert list((tmp_path / "artifacts" / "activations").glob("*")) == []


def test_a_full_disk_while_saving_the_model_is_one_line_and_leaves_no_output(make_tiny_model, tmp_path):
    """A real write failure in a real run: the process may write files of 60 KB at most, enough for
    the prompts, activations and study, not for the merged model's weights."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "model": {"device": "cpu", "cache_dir": str(tmp_path / "c")}}))
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); "
    code = limit + "import sys; from clawly.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(make_tiny_model("llama")),
            "--config",
            str(config),
            "--output",
            str(tmp_path / "out"),
            "--non-interactive",
            "--save",
            "model",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert errors == [
        f"clawly: error: could not write {tmp_path / 'out' / 'model'}: File too large; free disk "
        "space (or write elsewhere) and run again: nothing was half-written"
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["work"]


STAGE_OVERRIDES = [
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled",
]


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["optimize.n_trial=3"],
            "unknown setting 'optimize.n_trial' in the override 'optimize.n_trial=3'; did you mean "
            "'optimize.n_trials'?",
        ),
        (
            ["+optimze.n_trials=3"],
            "unknown setting 'optimze.n_trials' in the override '+optimze.n_trials=3'; did you "
            "mean 'optimize.n_trials'?",
        ),
        (["optimize.n_trials=0"], "invalid setting optimize.n_trials=0: an integer >= 1"),
        (
            ["artifacts_dir={tmp}"],
            "{tmp}/directions/orthogonalized.safetensors does not exist: run the "
            "'orthogonalize-categories' stage first",
        ),
    ],
)
def test_a_stage_says_what_is_wrong_in_one_line(tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "stages.optimize", *argv, *STAGE_OVERRIDES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"clawly optimize: error: {message.format(tmp=tmp_path)}")
